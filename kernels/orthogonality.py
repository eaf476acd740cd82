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
def _orth_grad_tile_kernel(
    # pointers
    w1_ptr,  # (m1, d) W_dec1
    w2_ptr,  # (m2, d) W_dec2
    tiles_ptr,  # (n_sel, 2) int32 tile coordinates (read when HAS_TILES)
    g_out_ptr,  # () fp32 upstream grad of L, read on the device (no host sync)
    g_ptr,  # (n_sel, TILE, TILE) out, the weights' dtype: this program's tile of G
    live_ptr,  # (n_sel,) int32 out: 1 where the tile has a pair past the margin (G ≠ 0), else 0
    # sizes and scalars
    m1, m2, d, n_cols_tiles, margin, scale,
    # meta-parameters
    TILE: tl.constexpr, BLOCK_K: tl.constexpr, HAS_TILES: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute one tile of c and store G = grad_L · s · 2·max(0, |c| − ρ)·sign(c), rounded
    to the weights' dtype, with a flag saying whether any of it is non-zero. A tile whose
    pairs all lie within the margin writes only its flag (0); its G is never read."""
    rows, cols, row_ok, col_ok, c, excess = _excess_tile(w1_ptr, w2_ptr, tiles_ptr, m1, m2, d, n_cols_tiles, margin,
                                                         TILE, BLOCK_K, HAS_TILES, INTERP_BF16, PRECISION)
    pid = tl.program_id(0)
    live = tl.max(tl.max(excess, axis=1), axis=0) > 0
    tl.store(live_ptr + pid, live.to(tl.int32))
    if live:
        G = tl.where(c > 0, 2.0, -2.0) * excess * (scale * tl.load(g_out_ptr))
        idx = tl.arange(0, TILE)
        offs = pid.to(tl.int64) * TILE * TILE + idx[:, None] * TILE + idx[None, :]
        tl.store(g_ptr + offs, round_to(G, g_ptr.dtype.element_ty, INTERP_BF16))


@triton.jit
def _orth_reduce_kernel(
    # pointers
    g_ptr,  # (n_sel, TILE, TILE) G tiles from _orth_grad_tile_kernel
    live_ptr,  # (n_sel,) int32: which G tiles are non-zero
    tiles_ptr,  # (n_sel, 2) int32 tile coordinates (row tile, column tile)
    order_ptr,  # (n_sel,) int32: tile indices grouped by this launch's side, ascending within a group
    seg_ptr,  # (n_out_tiles + 1,) int32: group t spans order[seg[t]:seg[t + 1]]
    w_ptr,  # (m_other, d) the other decoder
    out_ptr,  # (m_out, d) out: this decoder's gradient, the weights' dtype
    # sizes
    m_out, m_other, d,
    # meta-parameters
    SIDE: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (TILE, BLOCK_N) block of grad_W1 = G W2 (SIDE 0: rows of tile row t) or
    grad_W2 = Gᵀ W1 (SIDE 1: rows of tile column t): the sum over the group's live tiles of
    G_tile (or its transpose) times the other decoder's TILE rows, in ``order``'s fixed
    order, accumulated in fp32 and written once. A group without live tiles writes zeros."""
    n_n = tl.cdiv(d, BLOCK_N)
    pid = tl.program_id(0)
    t = pid // n_n
    dcols = (pid % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = tl.arange(0, TILE)
    d_ok = dcols < d
    acc = tl.zeros((TILE, BLOCK_N), tl.float32)
    for s in range(tl.load(seg_ptr + t), tl.load(seg_ptr + t + 1)):
        k = tl.load(order_ptr + s)
        if tl.load(live_ptr + k) != 0:
            other = tl.load(tiles_ptr + 2 * k + 1 - SIDE) * TILE + idx  # (TILE,) rows of the other decoder
            base = g_ptr + k.to(tl.int64) * TILE * TILE
            if SIDE == 0:
                G = tl.load(base + idx[:, None] * TILE + idx[None, :])  # (TILE, TILE) G
            else:
                G = tl.load(base + idx[None, :] * TILE + idx[:, None])  # (TILE, TILE) Gᵀ
            w = tl.load(w_ptr + other.to(tl.int64)[:, None] * d + dcols[None, :],
                        mask=(other < m_other)[:, None] & d_ok[None, :], other=0.0)
            acc = mma(acc, G, w, INTERP_BF16, PRECISION)
    rows = t * TILE + idx
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * d + dcols[None, :],
             round_to(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=(rows < m_out)[:, None] & d_ok[None, :])


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


def _tile_groups(tiles: torch.Tensor | None, n1: int, n2: int,
                 device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """The selected tiles (all of them, row-major, without ``tiles``) and, for each side, the
    tile indices grouped by row tile (side 0) or column tile (side 1), ascending within a
    group, with the groups' offsets: (tiles, (order0, seg0), (order1, seg1)). Device-side
    sorts and binary searches, so no host sync."""
    if tiles is None:
        r = torch.arange(n1, dtype=torch.int32, device=device).repeat_interleave(n2)
        c = torch.arange(n2, dtype=torch.int32, device=device).repeat(n1)
        tiles = torch.stack([r, c], dim=1)  # (n1·n2, 2)
    groups = []
    for side, (n_out, n_other) in enumerate(((n1, n2), (n2, n1))):
        key = tiles[:, side].long() * n_other + tiles[:, 1 - side]  # group, then position in the group
        order = torch.argsort(key, stable=True)
        bounds = torch.arange(n_out + 1, dtype=torch.int64, device=device) * n_other
        groups.append((order.int(), torch.searchsorted(key[order], bounds).int()))
    return tiles, groups[0], groups[1]


def backward_extra_bytes(m1: int, m2: int, n_sel: int | None, dtype: torch.dtype) -> int:
    """Memory the backward allocates beyond the two gradients: the G tiles in the weights'
    dtype (n_sel·ORTH_TILE² values; n_sel = all n1·n2 tiles in exact mode, m1·m2 values
    rounded up to whole tiles) and int32 bookkeeping (a flag, two orders, the tile list)."""
    n1, n2 = triton.cdiv(m1, ORTH_TILE), triton.cdiv(m2, ORTH_TILE)
    n = n1 * n2 if n_sel is None else n_sel
    return n * ORTH_TILE * ORTH_TILE * dtype.itemsize + 4 * (6 * n + n1 + n2 + 2)


@nvtx_range("esosae.orth.bwd")
def orth_backward(grad_out: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, margin: float,
                  tiles: torch.Tensor | None, need: tuple[bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(grad_W1, grad_W2) in the weights' dtype, None where not needed. Two launches: the
    G tiles, then per side a fixed-order reduction over each row (column) tile's G tiles."""
    m1, m2, d = W1.shape[0], W2.shape[0], W1.shape[1]
    n_sel = _n_selected(m1, m2, tiles)
    g_tiles = alloc((n_sel, ORTH_TILE, ORTH_TILE), W1.dtype, W1.device)  # only live tiles are written and read
    live = alloc((n_sel,), torch.int32, W1.device)
    _orth_launch(_orth_grad_tile_kernel, W1, W2, tiles, grad_out.to(torch.float32).contiguous(), g_tiles, live,
                 margin=margin, scale=_scale(m1, m2, tiles))
    all_tiles, *groups = _tile_groups(tiles, triton.cdiv(m1, ORTH_TILE), triton.cdiv(m2, ORTH_TILE), W1.device)
    cfg = tile_config("orth_reduce", W1.dtype, _orth_reduce_kernel, W1.device, ORTH_TILE, d, ORTH_TILE)
    grads: list[torch.Tensor | None] = [None, None]
    for side, (W, other) in enumerate(((W1, W2), (W2, W1))):
        if need[side]:
            order, seg = groups[side]
            grads[side] = alloc(W.shape, W.dtype, W.device)
            n_prog = triton.cdiv(W.shape[0], ORTH_TILE) * triton.cdiv(d, cfg.BLOCK_N)
            launch(_orth_reduce_kernel, n_prog, cfg, W.dtype, g_tiles, live, all_tiles, order, seg, other, grads[side],
                   W.shape[0], other.shape[0], d, SIDE=side, TILE=ORTH_TILE)
    return tuple(grads)


class OrthPenaltyFunction(torch.autograd.Function):
    """Autograd for ``orth_penalty``. With c = W1 W2ᵀ and s the scale of the module doc,

        G_ij = 2·s·max(0, |c_ij| − ρ)·sign(c_ij)   (0 outside the selected tiles)
        grad_W1 = G W2        grad_W2 = Gᵀ W1       (times the upstream grad of L)

    The forward never builds c: it reduces each tile of c in registers. The backward
    recomputes each selected tile of c (flash-attention style) and stores its G tile in the
    weights' dtype (the operand precision of the products either way), flagged live or not;
    then one program per (row tile of W1, d-chunk) sums G·W2 over that row tile's live tiles,
    and one per (row tile of W2, d-chunk) sums Gᵀ·W1 over its column tile's, each group in
    ascending tile order. Every gradient element is written once from an fp32 register sum
    in a fixed order: no atomics, bit-identical across runs and independent of the order of
    ``tiles``. With ρ > 0 and nearly orthogonal dictionaries most tiles are not live and
    cost neither the G write nor the products.

    Cost: the forward is one c GEMM (2·m1·m2·d FLOPs over the selected tiles); the backward
    recomputes c and runs the two gradient products over the live tiles.
    Extra memory (``backward_extra_bytes``): the G tiles, n_sel·64²·(2 or 4) bytes. At
    m1 = m2 = 16,384 (65,536 tiles), d = 2,304 with the default fraction min(1, B/(3·m2)):
    B = 1,024 → 1,366 tiles, 21 MiB in fp32 and 11 MiB in bf16; B = 4,096 → 5,462 tiles,
    85 MiB fp32 and 43 MiB bf16. Exact mode (all tiles) holds m1·m2 values: 1 GiB fp32,
    512 MiB bf16 at that width, which is why the trainer samples tiles at large widths.
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
