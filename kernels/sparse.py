"""Encoder and decoder on the active pairs of f: gathers and segment reductions, no dense
product but the encoder's forward.

The encoder forward stays the dense fused kernel (``encoder.py``): every pre-activation is
needed to know which fire. When f's density is at most ``pairs.PAIRS_MAX_DENSITY`` its
pairs (``pairs.Pairs``) ride on f, and the other products of the step run on them:

    x̂[b]        = Σ_(b,j) f_bj · W_dec[j] + bias                row gather      2·nnz·d FLOPs
    grad_f_bj    = ⟨G[b], W_dec[j]⟩ on the pairs only            pair dot        2·nnz·d
    grad_W_dec[j] = Σ_(b,j) f_bj · G[b]                           segment sum     2·nnz·d
    grad_x[b]    = Σ_(b,j) grad_a_bj · W_encᵀ[j]                  row gather      2·nnz·d
    grad_W_encᵀ[j] = Σ_(b,j) grad_a_bj · (x − b_dec)[b]           segment sum     2·nnz·d

with G = grad_x̂ − 2·grad_sq·(target − x̂) and grad_a = grad_f + grad_row_l1 on the pairs
(zero elsewhere, since f ≠ 0 exactly where a > θ). Against 2·B·m·d FLOPs per dense product
that is the density's fraction, paid in gathered bytes (nnz·d per pass) instead of tensor-
core FLOPs. Each program sums its pairs in a fixed order in fp32 registers and writes its
output once: no atomics, bit-identical runs. Rows without pairs get x̂ = bias and zero
gradients; features without pairs zero gradient rows.

Layouts: W_enc is (d, m), so its columns are strided; grad_x gathers rows of W_encᵀ, a
contiguous copy made once per backward (m·d elements), and grad_W_encᵀ (m, d) is returned
transposed (autograd lays it out as W_enc's gradient: one more m·d pass). Both are
memory-bound passes, about 1/B of a dense product's FLOPs each.

grad_f from the pair decoder is a sparse COO tensor on the pairs: exact for the step,
because f's producer, this encoder, reads grad_f only there (grad_a = grad_f·1[a > θ]);
the decoder checks that f is that encoder's unmodified output and otherwise returns the
dense grad_f through the dense kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from esosae.kernels import decoder, encoder
from esosae.kernels.pairs import Pairs, attached, density_limit
from esosae.kernels.utils import alloc, check_inputs, launch, nvtx_range, round_to, tile_config


@triton.jit
def _weighted_rows(t_ptr, idx, v, ok, dcols, d_ok, d, INTERP_BF16: tl.constexpr):
    """Σ_k v_k · table[idx_k, dcols] in fp32 over BLOCK_K pairs (masked by ok), each weight
    rounded to the table's dtype first: the inner step of both sparse products."""
    v = round_to(v, t_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32)
    rows = tl.load(t_ptr + idx.to(tl.int64)[:, None] * d + dcols[None, :], mask=ok[:, None] & d_ok[None, :],
                   other=0.0)  # (BLOCK_K, BLOCK_N)
    return tl.sum(v[:, None] * rows.to(tl.float32), axis=0)


@triton.jit
def _row_gather_kernel(
    # pointers
    row_ptr,  # (B + 1,) int32: row b's pairs are [row_ptr[b], row_ptr[b + 1])
    cols_ptr,  # (nnz,) int32 features of the pairs, row-major
    v_ptr,  # (nnz,) weights of the pairs (any float dtype)
    t_ptr,  # (m, d) table whose rows are gathered
    bias_ptr,  # (d,) added when HAS_BIAS
    target_ptr,  # (B, d) target when SQ_ERR
    out_ptr,  # (B, d) out: Σ_pairs v · table[j] (+ bias), the table's dtype
    sq_part_ptr,  # (n_d_chunks, B) fp32 out when SQ_ERR: Σ over the chunk of (target − out)²
    # sizes
    B, d,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SQ_ERR: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (row, BLOCK_N columns) block of out = S·table for the sparse S of the pairs,
    BLOCK_K pairs at a time, weights rounded to the table's dtype and products summed in
    fp32; with SQ_ERR the decoder's epilogue (x̂ as stored, its squared error)."""
    n_n = tl.cdiv(d, BLOCK_N)
    pid = tl.program_id(0)
    b = pid // n_n
    dchunk = pid % n_n
    dcols = dchunk * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dcols < d
    ps = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for p0 in range(tl.load(row_ptr + b), tl.load(row_ptr + b + 1), BLOCK_K):
        p_ok = p0 + ps < tl.load(row_ptr + b + 1)
        j = tl.load(cols_ptr + p0 + ps, mask=p_ok, other=0)
        v = tl.load(v_ptr + p0 + ps, mask=p_ok, other=0.0).to(tl.float32)
        acc += _weighted_rows(t_ptr, j, v, p_ok, dcols, d_ok, d, INTERP_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + dcols, mask=d_ok, other=0.0).to(tl.float32)
    out = round_to(acc, out_ptr.dtype.element_ty, INTERP_BF16)
    offs = b.to(tl.int64) * d + dcols
    tl.store(out_ptr + offs, out, mask=d_ok)
    if SQ_ERR:
        diff = tl.where(d_ok, tl.load(target_ptr + offs, mask=d_ok, other=0.0).to(tl.float32) - out.to(tl.float32),
                        0.0)
        tl.store(sq_part_ptr + dchunk.to(tl.int64) * B + b, tl.sum(diff * diff, axis=0))


@triton.jit
def _pair_dot_kernel(
    # pointers
    rows_ptr,  # (nnz,) int32 rows of the pairs
    cols_ptr,  # (nnz,) int32 features of the pairs
    g_ptr,  # (B, d) G, the operand dtype
    w_ptr,  # (m, d) W_dec
    out_ptr,  # (nnz,) out: ⟨G[b], W_dec[j]⟩ per pair, the operand dtype
    # sizes
    nnz, d,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """BLOCK_M pairs of grad_f = G W_decᵀ sampled on the pairs, reducing over d in BLOCK_K chunks in fp32."""
    ps = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = ps < nnz
    b = tl.load(rows_ptr + ps, mask=p_ok, other=0).to(tl.int64)
    j = tl.load(cols_ptr + ps, mask=p_ok, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ok = p_ok[:, None] & (k0 + ks < d)[None, :]
        g = tl.load(g_ptr + b[:, None] * d + k0 + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + j[:, None] * d + k0 + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(g * w, axis=1)
    tl.store(out_ptr + ps, round_to(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=p_ok)


@triton.jit
def _segment_sum_kernel(
    # pointers
    col_ptr,  # (m + 1,) int32: feature j's pairs are order[col_ptr[j]:col_ptr[j + 1]]
    order_ptr,  # (nnz,) int32 pair indices by feature
    rows_ptr,  # (nnz,) int32 rows of the pairs
    v_ptr,  # (nnz,) weights of the pairs (any float dtype)
    a_ptr,  # (B, d) rows that are summed
    out_ptr,  # (m, d) out: Σ_pairs of j v · a[b], a's dtype
    colsum_ptr,  # (m,) fp32 out when COL_SUM: Σ_pairs of j v (unrounded), written by the d-chunk-0 programs
    # sizes
    d,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COL_SUM: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (feature, BLOCK_N columns) block of out = Sᵀ·a: the feature's pairs BLOCK_K at a
    time in ascending row order, weights rounded to a's dtype, products summed in fp32."""
    n_n = tl.cdiv(d, BLOCK_N)
    pid = tl.program_id(0)
    j = pid // n_n
    dchunk = pid % n_n
    dcols = dchunk * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dcols < d
    qs = tl.arange(0, BLOCK_K)
    end = tl.load(col_ptr + j + 1)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    total = tl.zeros((BLOCK_K,), tl.float32)
    for q0 in range(tl.load(col_ptr + j), end, BLOCK_K):
        q_ok = q0 + qs < end
        p = tl.load(order_ptr + q0 + qs, mask=q_ok, other=0)
        b = tl.load(rows_ptr + p, mask=q_ok, other=0)
        v = tl.load(v_ptr + p, mask=q_ok, other=0.0).to(tl.float32)
        total += v
        acc += _weighted_rows(a_ptr, b, v, q_ok, dcols, d_ok, d, INTERP_BF16)
    tl.store(out_ptr + j.to(tl.int64) * d + dcols, round_to(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=d_ok)
    if COL_SUM:
        if dchunk == 0:
            tl.store(colsum_ptr + j, tl.sum(total, axis=0))


def row_gather(pairs: Pairs, weights: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None = None,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, d) Σ_pairs weights · table[j] (+ bias), and with ``target`` its per-row squared error (B,) fp32."""
    B, d = pairs.shape[0], table.shape[1]
    kernel = _row_gather_kernel
    cfg = tile_config("gather", table.dtype, kernel, table.device, 16, d, 16)
    n_n = triton.cdiv(d, cfg.BLOCK_N)
    out = alloc((B, d), table.dtype, table.device)
    sq_part = alloc((n_n, B), torch.float32, table.device) if target is not None else out
    launch(kernel, B * n_n, cfg, table.dtype, pairs.row_ptr, pairs.cols, weights, table,
           out if bias is None else bias, out if target is None else target, out, sq_part, B, d,
           HAS_BIAS=bias is not None, SQ_ERR=target is not None)
    return out, (sq_part.sum(0) if target is not None else None)


def segment_sum(pairs: Pairs, weights: torch.Tensor, rows: torch.Tensor,
                col_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(m, d) Σ_pairs of j weights · rows[b] in ``rows``' dtype, and with ``col_sum`` the fp32 (m,) Σ_pairs of j weights."""
    m, d = pairs.shape[1], rows.shape[1]
    kernel = _segment_sum_kernel
    cfg = tile_config("gather", rows.dtype, kernel, rows.device, 16, d, 16)
    out = alloc((m, d), rows.dtype, rows.device)
    sums = alloc((m,), torch.float32, rows.device) if col_sum else out
    launch(kernel, m * triton.cdiv(d, cfg.BLOCK_N), cfg, rows.dtype, pairs.col_ptr, pairs.order, pairs.rows,
           weights, rows, out, sums, d, COL_SUM=col_sum)
    return out, (sums if col_sum else None)


def pair_dot(pairs: Pairs, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(nnz,) ⟨G[b], W[j]⟩ on the pairs, in G's dtype."""
    kernel = _pair_dot_kernel
    d = G.shape[1]
    cfg = tile_config("pair_dot", G.dtype, kernel, G.device, pairs.nnz, 16, d)
    out = alloc((pairs.nnz,), G.dtype, G.device)
    launch(kernel, triton.cdiv(pairs.nnz, cfg.BLOCK_M), cfg, G.dtype, pairs.rows, pairs.cols, G, W, out, pairs.nnz, d)
    return out


# -- encoder -----------------------------------------------------------------------------


class PairEncodeFunction(torch.autograd.Function):
    """``encoder.encode`` whose backward runs on f's pairs when it has them (see the module
    doc); the dense kernels' backward otherwise. θ gets no gradient."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, theta, max_density, box):
        f, row_l1, fire = encoder.encode_forward(x, W_enc, b_enc, b_dec, theta)
        pairs, limit = None, density_limit(max_density)
        if limit > 0:  # else always dense: no count, no sync
            nnz = int(fire.sum(dtype=torch.int64))  # host sync: picks the path
            pairs = Pairs.of(f) if 0 < nnz <= limit * f.numel() else None
        ctx.pairs = box[0] = pairs
        ctx.save_for_backward(x, W_enc, b_dec, f)
        ctx.mark_non_differentiable(fire)
        return f, row_l1, fire

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_l1, _grad_fire):
        x, W_enc, b_dec, f = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        pairs = ctx.pairs
        if pairs is None:  # autograd passes zeros for an unused output
            return (*encoder.encode_backward(grad_f, grad_l1, x, W_enc, b_dec, f, need), None, None, None)
        return (*encode_backward_pairs(pairs, grad_f, grad_l1, x, W_enc, b_dec, need), None, None, None)


@nvtx_range("esosae.encode.bwd.pairs")
def encode_backward_pairs(pairs: Pairs, grad_f: torch.Tensor, grad_l1: torch.Tensor, x: torch.Tensor,
                          W_enc: torch.Tensor, b_dec: torch.Tensor,
                          need: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_dec) from the pairs; None where not needed."""
    dtype = x.dtype
    ga = pairs.values_of(grad_f) + grad_l1.float()[pairs.rows.long()]  # (nnz,) fp32 grad_a on the pairs
    grad_x = grad_W = grad_b = grad_bd = None
    if need[0]:
        grad_x, _ = row_gather(pairs, ga, W_enc.T.contiguous())  # (B, d)
    if any(need[1:]):
        grad_Wt, col_sum = segment_sum(pairs, ga, x - b_dec, col_sum=True)  # (m, d), (m,) fp32
        grad_W = grad_Wt.T if need[1] else None  # (d, m) view; autograd lays it out as W_enc's gradient
        grad_b = col_sum.to(dtype) if need[2] else None
        grad_bd = (-(W_enc.float() @ col_sum)).to(dtype) if need[3] else None  # −Σ_rows grad_x = −W_enc Σ_b grad_a
    return grad_x, grad_W, grad_b, grad_bd


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, theta: torch.Tensor,
           max_density: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``encoder.encode``; f carries its pairs when its density is at most ``max_density``
    (``pairs.PAIRS_MAX_DENSITY`` by default), and then the step's other products use them."""
    box: list[Pairs | None] = [None]
    f, row_l1, fire = PairEncodeFunction.apply(x, W_enc, b_enc, b_dec, theta, max_density, box)
    if box[0] is not None:
        box[0].version = f._version
        f._esosae_pairs = box[0]
    return f, row_l1, fire


# -- decoder -----------------------------------------------------------------------------


class PairDecodeFunction(torch.autograd.Function):
    """``decoder.decode`` on f's pairs (see the module doc). Backward, with
    G = grad_x̂ − 2·grad_sq·(target − x̂):

        grad_f = G W_decᵀ on the pairs (sparse when ``partial``, else dense)
        grad_W_dec = fᵀ G by feature      grad_bias = Σ_b G      grad_target = 2·grad_sq·(target − x̂)
    """

    @staticmethod
    def forward(ctx, f, W_dec, bias, target, pairs, partial):
        x_hat, sq_err = row_gather(pairs, pairs.vals, W_dec, bias, target)
        ctx.pairs, ctx.partial = pairs, partial
        ctx.save_for_backward(f, W_dec, target, x_hat)
        return x_hat, sq_err

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_xh, grad_sq):
        f, W_dec, target, x_hat = ctx.saved_tensors
        need_f, need_W, need_bias, need_t = ctx.needs_input_grad[:4]
        pairs, dtype = ctx.pairs, f.dtype
        g_t = 2 * grad_sq.float()[:, None] * (target.float() - x_hat.float())  # (B, d) ∂L/∂target, fp32
        G32 = grad_xh.float() - g_t  # (B, d) gradient reaching x̂ (autograd passes zeros for an unused output)
        G = G32.to(dtype)  # the operand of the products, as the dense kernels round it
        grad_f = grad_W = None
        if need_f:
            if ctx.partial:
                grad_f = pairs.sparse(pair_dot(pairs, G, W_dec))
            else:
                grad_f = decoder.decode_backward(G, torch.zeros_like(grad_sq, dtype=torch.float32), f, W_dec,
                                                 target, x_hat, (True, False, False, False))[0]
        if need_W:
            grad_W, _ = segment_sum(pairs, pairs.vals, G)  # (m, d)
        grad_bias = G32.sum(0).to(dtype) if need_bias else None
        grad_t = g_t.to(dtype) if need_t else None
        return grad_f, grad_W, grad_bias, grad_t, None, None


@nvtx_range("esosae.decode.pairs")
def decode(f: torch.Tensor, W_dec: torch.Tensor, bias: torch.Tensor,
           target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder.decode``, on f's pairs when the pair encoder attached them, densely otherwise."""
    pairs = attached(f)
    if pairs is None:
        return decoder.decode(f, W_dec, bias, target)
    check_inputs("decode", _row_gather_kernel, {"f": f, "W_dec": W_dec, "bias": bias, "target": target},
                 {"f": ("B", "m"), "W_dec": ("m", "d"), "bias": ("d",), "target": ("B", "d")},
                 ("f", "W_dec", "bias", "target"))
    # grad_f on the pairs suffices when f's grad goes straight to the encoder that found them
    partial = getattr(f.grad_fn, "pairs", None) is pairs
    return PairDecodeFunction.apply(f, W_dec, bias, target, pairs, partial)
