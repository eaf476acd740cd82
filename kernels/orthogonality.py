"""Blocked margin-orthogonality penalty between the two decoders, forward and backward.

    c = W_dec1 W_dec2ᵀ                                   (m1, m2), never stored
    L = s · Σ_(selected tiles) Σ max(0, |c_ij| − ρ)²     s = 1/(m1·m2) · n_tiles/n_sel

over the ORTH_TILE × ORTH_TILE tiles of c: all of them (exact), or the subset ``tiles``
((n_sel, 2) int32 tile coordinates, e.g. from ``esosae.reference.sample_tiles``), rescaled
so that the estimate is unbiased. One program handles one whole tile, which is what makes
the subset semantics exact: the kernels' tile is ORTH_TILE.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from esosae.kernels.utils import (ORTH_TILE, alloc, check_inputs, dot_precision, interp_bf16, interpreted,
                                  mma, nvtx_range, round_to)


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
    ti, tj = _tile_coords(tiles_ptr, n_cols_tiles, HAS_TILES)
    rows = ti * TILE + tl.arange(0, TILE)
    cols = tj * TILE + tl.arange(0, TILE)
    row_ok = rows < m1
    col_ok = cols < m2
    c = _cosine_tile(w1_ptr, w2_ptr, rows, cols, row_ok, col_ok, d, TILE, BLOCK_K, INTERP_BF16, PRECISION)
    excess = tl.where(row_ok[:, None] & col_ok[None, :], tl.maximum(tl.abs(c) - margin, 0.0), 0.0)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(excess * excess, axis=1), axis=0))


@triton.jit
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
    ti, tj = _tile_coords(tiles_ptr, n_cols_tiles, HAS_TILES)
    rows = ti * TILE + tl.arange(0, TILE)
    cols = tj * TILE + tl.arange(0, TILE)
    row_ok = rows < m1
    col_ok = cols < m2
    c = _cosine_tile(w1_ptr, w2_ptr, rows, cols, row_ok, col_ok, d, TILE, BLOCK_K, INTERP_BF16, PRECISION)
    excess = tl.where(row_ok[:, None] & col_ok[None, :], tl.maximum(tl.abs(c) - margin, 0.0), 0.0)
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


def _block_k(d: int, interpret: bool) -> int:
    """Reduction chunk over d: 64 compiled; 32 interpreted, so small test widths take several steps."""
    return max(16, min(32 if interpret else 64, triton.next_power_of_2(d)))


def _check_tiles(tiles: torch.Tensor | None, n1: int, n2: int, device: torch.device) -> None:
    """A tile subset must be (n_sel, 2) int32, contiguous, on the weights' device, in range and
    without repeats (a repeat would be counted twice, unlike the reference's selection mask).
    One host sync on this small tensor, the price of never misreading an index."""
    if tiles is None:
        return
    if not isinstance(tiles, torch.Tensor) or tiles.dtype != torch.int32:
        raise TypeError(f"orth_penalty: tiles must be an int32 tensor (got {getattr(tiles, 'dtype', type(tiles))})")
    if tiles.dim() != 2 or tiles.shape[1] != 2 or tiles.shape[0] == 0:
        raise ValueError(f"orth_penalty: tiles must have shape (n_sel, 2) with n_sel ≥ 1 (got {tuple(tiles.shape)})")
    if not tiles.is_contiguous():
        raise ValueError("orth_penalty: tiles must be contiguous (call .contiguous() first)")
    if tiles.device != device:
        raise ValueError(f"orth_penalty: tiles are on {tiles.device} but the weights on {device}")
    flat = (tiles[:, 0].long() * n2 + tiles[:, 1]).sort().values
    ok = (tiles >= 0).all() & (tiles[:, 0] < n1).all() & (tiles[:, 1] < n2).all() & (flat[1:] != flat[:-1]).all()
    if not ok:  # host sync
        raise ValueError(f"orth_penalty: tiles must be distinct (row, col) tile indices within the "
                         f"{n1}×{n2} grid of {ORTH_TILE}-sized tiles")


def _launch_args(W1: torch.Tensor, W2: torch.Tensor, tiles: torch.Tensor | None) -> tuple:
    """(grid, n_cols_tiles, scale s, tiles pointer) shared by the two launchers."""
    m1, m2 = W1.shape[0], W2.shape[0]
    n1, n2 = triton.cdiv(m1, ORTH_TILE), triton.cdiv(m2, ORTH_TILE)
    n_sel = n1 * n2 if tiles is None else tiles.shape[0]
    scale = (n1 * n2) / (n_sel * m1 * m2)
    return (n_sel,), n2, scale, W1 if tiles is None else tiles  # the pointer is unread without tiles


@nvtx_range("esosae.orth.fwd")
def orth_forward(W1: torch.Tensor, W2: torch.Tensor, margin: float, tiles: torch.Tensor | None) -> torch.Tensor:
    """L (0-dim fp32); see the module doc."""
    dtype, n = check_inputs("orth_penalty", _orth_fwd_kernel, {"W_dec1": W1, "W_dec2": W2},
                            {"W_dec1": ("m1", "d"), "W_dec2": ("m2", "d")}, ("W_dec1", "W_dec2"))
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"orth_penalty: margin ρ must be a finite number (got {margin})")
    _check_tiles(tiles, triton.cdiv(n["m1"], ORTH_TILE), triton.cdiv(n["m2"], ORTH_TILE), W1.device)
    grid, n2, scale, tiles_arg = _launch_args(W1, W2, tiles)
    part = alloc(grid, torch.float32, W1.device)
    interpret = interpreted(_orth_fwd_kernel)
    _orth_fwd_kernel[grid](
        W1, W2, tiles_arg, part, n["m1"], n["m2"], n["d"], n2, margin,
        TILE=ORTH_TILE, BLOCK_K=_block_k(n["d"], interpret), HAS_TILES=tiles is not None,
        INTERP_BF16=interp_bf16(_orth_fwd_kernel, dtype), PRECISION=dot_precision(dtype), num_warps=4, num_stages=3)
    return part.sum() * scale


@nvtx_range("esosae.orth.bwd")
def orth_backward(grad_out: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, margin: float,
                  tiles: torch.Tensor | None, need: tuple[bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(grad_W1, grad_W2) in the weights' dtype, None where not needed."""
    grid, n2, scale, tiles_arg = _launch_args(W1, W2, tiles)
    g1 = torch.zeros(W1.shape, dtype=torch.float32, device=W1.device)  # atomics accumulate into zeros
    g2 = torch.zeros(W2.shape, dtype=torch.float32, device=W2.device)
    interpret = interpreted(_orth_bwd_kernel)
    _orth_bwd_kernel[grid](
        W1, W2, tiles_arg, grad_out.to(torch.float32).contiguous(), g1, g2, W1.shape[0], W2.shape[0], W1.shape[1],
        n2, margin, scale, TILE=ORTH_TILE, BLOCK_K=_block_k(W1.shape[1], interpret), HAS_TILES=tiles is not None,
        NEED_W1=need[0], NEED_W2=need[1], INTERP_BF16=interp_bf16(_orth_bwd_kernel, W1.dtype),
        PRECISION=dot_precision(W1.dtype), num_warps=4, num_stages=3)
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
        loss = orth_forward(W1, W2, margin, tiles)
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
