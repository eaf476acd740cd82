"""Blocked margin-orthogonality penalty between the two decoders, forward and backward.

    c = W_dec1 W_dec2ᵀ                                   (m1, m2), never stored
    L = s · Σ_(selected tiles) Σ max(0, |c_ij| − ρ)²     s = 1/(m1·m2) · n_tiles/n_sel

over the ORTH_TILE × ORTH_TILE tiles of c: all of them (exact), or the subset ``tiles``
((n_sel, 2) int32 tile coordinates, e.g. from ``esosae.sae.reference.sample_tiles``), rescaled
so that the estimate is unbiased. One program handles one whole tile, which is what makes
the subset semantics exact: the kernels' tile is ORTH_TILE.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from esosae.kernels.utils import ORTH_TILE, alloc, check_inputs, launch, mma, nvtx_range, round_to, tile_config


@triton.jit
def _tile_coords(tiles_ptr, n_cols_tiles, HAS_TILES: tl.constexpr):
    """(row tile, column tile) of this program: the pid-th entry of ``tiles``, or the pid-th
    tile of the full grid in row-major order."""
    pid = tl.program_id(0)
    if HAS_TILES:
        return tl.load(tiles_ptr + 2 * pid), tl.load(tiles_ptr + 2 * pid + 1)
    return pid // n_cols_tiles, pid % n_cols_tiles


@triton.jit
def _cosine_tile(w1_ptr, w2_ptr, rows, cols, row_ok, col_ok, d,
                 TILE: tl.constexpr, BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """c[rows, cols] = W1[rows] W2[cols]ᵀ for one (TILE, TILE) tile, fp32, reducing over d."""
    ks = tl.arange(0, BLOCK_K)
    w1_ptrs = w1_ptr + rows.to(tl.int64)[:, None] * d + ks[None, :]  # (TILE, BLOCK_K)
    w2_ptrs = w2_ptr + cols.to(tl.int64)[None, :] * d + ks[:, None]  # (BLOCK_K, TILE) of W2ᵀ
    c = tl.zeros((TILE, TILE), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_ok = k0 + ks < d
        a = tl.load(w1_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        c = mma(c, a, b, INTERP_BF16, PRECISION)
        w1_ptrs += BLOCK_K
        w2_ptrs += BLOCK_K
    return c


@triton.jit
def _excess_tile(w1_ptr, w2_ptr, tiles_ptr, m1, m2, d, n_cols_tiles, margin,
                 TILE: tl.constexpr, BLOCK_K: tl.constexpr, HAS_TILES: tl.constexpr,
                 INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """The prologue of both kernels: this program's tile of c = W1 W2ᵀ (fp32) and its
    clamped excess max(0, |c| − ρ), 0 outside the matrix. Returns rows, cols, their masks,
    c and the excess."""
    ti, tj = _tile_coords(tiles_ptr, n_cols_tiles, HAS_TILES)
    rows = ti * TILE + tl.arange(0, TILE)
    cols = tj * TILE + tl.arange(0, TILE)
    row_ok = rows < m1
    col_ok = cols < m2
    c = _cosine_tile(w1_ptr, w2_ptr, rows, cols, row_ok, col_ok, d, TILE, BLOCK_K, INTERP_BF16, PRECISION)
    excess = tl.where(row_ok[:, None] & col_ok[None, :], tl.maximum(tl.abs(c) - margin, 0.0), 0.0)
    return rows, cols, row_ok, col_ok, c, excess


@triton.jit(do_not_specialize=["n_cols_tiles"])  # one compilation whatever the width
def _orth_fwd_kernel(
    # pointers
    w1_ptr,  # (m1, d) W_dec1
    w2_ptr,  # (m2, d) W_dec2
    tiles_ptr,  # (n_sel, 2) int32 tile coordinates (read when HAS_TILES)
    part_ptr,  # (n_programs,) fp32 out: Σ over this tile of max(0, |c| − ρ)²
    # sizes and scalars
    m1, m2, d, n_cols_tiles, margin,
    # meta-parameters
    TILE: tl.constexpr, BLOCK_K: tl.constexpr, HAS_TILES: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Σ max(0, |c_ij| − ρ)² over one tile of c = W1 W2ᵀ, reduced in registers."""
    rows, cols, row_ok, col_ok, c, excess = _excess_tile(w1_ptr, w2_ptr, tiles_ptr, m1, m2, d, n_cols_tiles, margin,
                                                         TILE, BLOCK_K, HAS_TILES, INTERP_BF16, PRECISION)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(excess * excess, axis=1), axis=0))


@triton.jit(do_not_specialize=["n_cols_tiles"])
def _orth_bwd_kernel(
    # pointers
    w1_ptr,  # (m1, d) W_dec1
    w2_ptr,  # (m2, d) W_dec2
    tiles_ptr,  # (n_sel, 2) int32 tile coordinates (read when HAS_TILES)
    g_out_ptr,  # () fp32 upstream grad of L, read on the device (no host sync)
    g1_ptr,  # (m1, d) fp32, zeroed: grad_W1 accumulates here (atomics)
    g2_ptr,  # (m2, d) fp32, zeroed: grad_W2 accumulates here (atomics)
    # sizes and scalars
    m1, m2, d, n_cols_tiles, margin, scale,
    # meta-parameters
    TILE: tl.constexpr, BLOCK_K: tl.constexpr, HAS_TILES: tl.constexpr,
    NEED_W1: tl.constexpr, NEED_W2: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute one tile of c, form G = grad_L · s · 2·max(0, |c| − ρ)·sign(c), and add
    G W2[cols] to grad_W1[rows] and Gᵀ W1[rows] to grad_W2[cols], d-chunk by d-chunk.
    A tile whose pairs all lie within the margin has G = 0 and skips the products."""
    rows, cols, row_ok, col_ok, c, excess = _excess_tile(w1_ptr, w2_ptr, tiles_ptr, m1, m2, d, n_cols_tiles, margin,
                                                         TILE, BLOCK_K, HAS_TILES, INTERP_BF16, PRECISION)
    if tl.max(tl.max(excess, axis=1), axis=0) > 0:
        g_out = tl.load(g_out_ptr)
        G = tl.where(c > 0, 2.0, -2.0) * excess * (scale * g_out)
        G = round_to(G, w1_ptr.dtype.element_ty, INTERP_BF16)
        ks = tl.arange(0, BLOCK_K)
        r_offs = rows.to(tl.int64)[:, None] * d + ks[None, :]  # (TILE, BLOCK_K) into W1
        c_offs = cols.to(tl.int64)[:, None] * d + ks[None, :]  # (TILE, BLOCK_K) into W2
        for k0 in range(0, d, BLOCK_K):
            k_ok = k0 + ks < d
            r_ok = row_ok[:, None] & k_ok[None, :]
            c_ok = col_ok[:, None] & k_ok[None, :]
            if NEED_W1:
                w2 = tl.load(w2_ptr + c_offs, mask=c_ok, other=0.0)
                tl.atomic_add(g1_ptr + r_offs, mma(tl.zeros((TILE, BLOCK_K), tl.float32), G, w2, INTERP_BF16, PRECISION),
                              mask=r_ok, sem="relaxed")
            if NEED_W2:
                w1 = tl.load(w1_ptr + r_offs, mask=r_ok, other=0.0)
                tl.atomic_add(g2_ptr + c_offs, mma(tl.zeros((TILE, BLOCK_K), tl.float32), tl.trans(G), w1, INTERP_BF16,
                                                   PRECISION), mask=c_ok, sem="relaxed")
            r_offs += BLOCK_K
            c_offs += BLOCK_K


def _check_tiles(tiles: torch.Tensor | None, n1: int, n2: int, device: torch.device) -> torch.Tensor | None:
    """A tile subset must be (n_sel, 2) int32 and contiguous, its entries distinct (row, col)
    tile indices in range (a repeat would be counted twice, unlike the reference's selection
    mask). Returns it on the weights' device. Never syncs host and device: tiles on the CPU
    (the trainer's, from ``esosae.sae.reference.sample_tiles``) are checked there, then copied
    without blocking; tiles already on the GPU are checked by a device-side assert."""
    if tiles is None:
        return None
    if not isinstance(tiles, torch.Tensor) or tiles.dtype != torch.int32:
        raise TypeError(f"orth_penalty: tiles must be an int32 tensor (got {getattr(tiles, 'dtype', type(tiles))})")
    if tiles.dim() != 2 or tiles.shape[1] != 2 or tiles.shape[0] == 0:
        raise ValueError(f"orth_penalty: tiles must have shape (n_sel, 2) with n_sel ≥ 1 (got {tuple(tiles.shape)})")
    if not tiles.is_contiguous():
        raise ValueError("orth_penalty: tiles must be contiguous (call .contiguous() first)")
    if tiles.device.type != "cpu" and tiles.device != device:
        raise ValueError(f"orth_penalty: tiles are on {tiles.device}; pass them on the CPU or on {device}")
    flat = (tiles[:, 0].long() * n2 + tiles[:, 1]).sort().values
    ok = (tiles >= 0).all() & (tiles[:, 0] < n1).all() & (tiles[:, 1] < n2).all() & (flat[1:] != flat[:-1]).all()
    message = (f"orth_penalty: tiles must be distinct (row, col) tile indices within the "
               f"{n1}×{n2} grid of {ORTH_TILE}-sized tiles")
    if tiles.device.type == "cpu":
        if not ok:  # a CPU tensor: no device involved
            raise ValueError(message)
        return tiles.to(device, non_blocking=True)
    torch._assert_async(ok, message)
    return tiles


def _n_selected(m1: int, m2: int, tiles: torch.Tensor | None) -> int:
    """Programs of a launch: the selected tiles, or every tile of the n1 × n2 grid."""
    return triton.cdiv(m1, ORTH_TILE) * triton.cdiv(m2, ORTH_TILE) if tiles is None else tiles.shape[0]


def _orth_launch(kernel: object, W1: torch.Tensor, W2: torch.Tensor, tiles: torch.Tensor | None,
                 *args: object, **consts: object) -> None:
    """Launch an orthogonality kernel: one program per selected tile (all tiles without
    ``tiles``), the architecture's reduction chunk and launch options."""
    m1, m2, d = W1.shape[0], W2.shape[0], W1.shape[1]
    kind = "orth_fwd" if kernel is _orth_fwd_kernel else "orth_bwd"
    cfg = tile_config(kind, W1.dtype, kernel, W1.device, ORTH_TILE, ORTH_TILE, d)
    tiles_arg = W1 if tiles is None else tiles  # the pointer is unread without tiles
    launch(kernel, _n_selected(m1, m2, tiles), cfg, W1.dtype, W1, W2, tiles_arg, *args,
           m1, m2, d, triton.cdiv(m2, ORTH_TILE), **consts, TILE=ORTH_TILE, HAS_TILES=tiles is not None)


def _scale(m1: int, m2: int, tiles: torch.Tensor | None) -> float:
    """s = 1/(m1·m2) · n_tiles/n_sel."""
    return _n_selected(m1, m2, None) / (_n_selected(m1, m2, tiles) * m1 * m2)


@nvtx_range("esosae.orth.fwd")
def orth_forward(W1: torch.Tensor, W2: torch.Tensor, margin: float,
                 tiles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L (0-dim fp32), and the tiles on the weights' device for the backward; see the module doc."""
    _, n = check_inputs("orth_penalty", _orth_fwd_kernel, {"W_dec1": W1, "W_dec2": W2},
                        {"W_dec1": ("m1", "d"), "W_dec2": ("m2", "d")}, ("W_dec1", "W_dec2"))
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"orth_penalty: margin ρ must be a finite number (got {margin})")
    tiles = _check_tiles(tiles, triton.cdiv(n["m1"], ORTH_TILE), triton.cdiv(n["m2"], ORTH_TILE), W1.device)
    part = alloc((_n_selected(n["m1"], n["m2"], tiles),), torch.float32, W1.device)
    _orth_launch(_orth_fwd_kernel, W1, W2, tiles, part, margin=margin)
    return part.sum() * _scale(n["m1"], n["m2"], tiles), tiles


@nvtx_range("esosae.orth.bwd")
def orth_backward(grad_out: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, margin: float,
                  tiles: torch.Tensor | None, need: tuple[bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(grad_W1, grad_W2) in the weights' dtype, None where not needed."""
    g1 = torch.zeros(W1.shape, dtype=torch.float32, device=W1.device)  # atomics accumulate into zeros
    g2 = torch.zeros(W2.shape, dtype=torch.float32, device=W2.device)
    _orth_launch(_orth_bwd_kernel, W1, W2, tiles, grad_out.to(torch.float32).contiguous(), g1, g2,
                 margin=margin, scale=_scale(W1.shape[0], W2.shape[0], tiles), NEED_W1=need[0], NEED_W2=need[1])
    return tuple(g.to(W.dtype) if wanted else None for g, W, wanted in ((g1, W1, need[0]), (g2, W2, need[1])))


class OrthPenaltyFunction(torch.autograd.Function):
    """Autograd for ``orth_penalty``. With c = W1 W2ᵀ and s the scale of the module doc,

        G_ij = 2·s·max(0, |c_ij| − ρ)·sign(c_ij)   (0 outside the selected tiles)
        grad_W1 = G W2        grad_W2 = Gᵀ W1       (times the upstream grad of L)

    No m1×m2 buffer ever exists: the forward reduces each tile of c in registers; the
    backward recomputes each tile of c (flash-attention style), forms its G in registers and
    multiplies it into both gradients. A tile's contribution spans all d columns, which do
    not fit in registers for d in the thousands, so it is added d-chunk by d-chunk to fp32
    gradient buffers with atomics: the summation order varies between runs at the level of
    fp32 rounding, well inside the tests' tolerance. With ρ > 0 and nearly orthogonal
    dictionaries most tiles have G = 0 and skip that work.

    Cost: the forward is one c GEMM (2·m1·m2·d FLOPs over the selected tiles); the backward
    recomputes c and, for tiles with pairs beyond the margin, runs the two gradient products.
    Memory: two fp32 accumulators of the weights' shapes. With the trainer's fp32 weights they
    are the gradients themselves; with 16-bit weights they are cast down at the end, so
    (m1 + m2)·d·4 bytes are extra while the backward runs.
    """

    @staticmethod
    def forward(ctx, W1, W2, margin, tiles):
        loss, tiles = orth_forward(W1, W2, margin, tiles)
        ctx.save_for_backward(W1, W2)
        ctx.margin, ctx.tiles = margin, tiles
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        W1, W2 = ctx.saved_tensors
        grads = orth_backward(grad_out, W1, W2, ctx.margin, ctx.tiles, ctx.needs_input_grad[:2])
        return (*grads, None, None)


def orth_penalty(W_dec1: torch.Tensor, W_dec2: torch.Tensor, margin: float,
                 tiles: torch.Tensor | None = None) -> torch.Tensor:
    """L_orth of W_dec1 (m1, d) and W_dec2 (m2, d) with margin ρ over all tiles or ``tiles``."""
    return OrthPenaltyFunction.apply(W_dec1, W_dec2, margin, tiles)
