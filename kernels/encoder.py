"""Fused JumpReLU encoder: matmul, bias, threshold, L1 and fire counts in one kernel.

    a = (x − b_dec) W_enc + b_enc          (B, m), never written to memory
    f = a · 1[a > θ]                       (B, m)
    row_l1 = Σ_j f                         (B,)  fp32
    fire_count = Σ_rows 1[f ≠ 0]           (m,)  int32

θ (m,) is computed by the caller, not in the kernel: θ = τ(t)·clamp(μ, μ_min, μ_max) is a
per-step scalar times per-feature margins that ``esosae.training.loop.set_thresholds`` keeps in a
model buffer (checkpointed and logged), and forming it is an m-element op next to a B×d×m
GEMM. The kernel reads θ as fp32, whatever its float dtype.

Learned thresholds (``encode_learned``, the straight-through estimator of
``esosae.sae.reference.encode_learned``, rectangle kernel K of bandwidth ε) add

    grad_θ_j = Σ_rows −K((a − θ_j)/ε) · (θ_j/ε · (grad_f + grad_row_l1))          (sparsity l1)
    grad_θ_j = Σ_rows −K((a − θ_j)/ε) · (θ_j/ε · grad_f + grad_row_l0 / ε)         (sparsity l0)

which needs a where a ≤ θ, where the saved f is zero. The backward **recomputes** a tile
by tile (``_encode_bwd_theta_kernel``, the forward's GEMM again, +33% FLOPs of the
step's encoder) rather than saving the dense (B, m) pre-activations: the dense path the
learned thresholds need, without a second B×m buffer alive through the decoder.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from esosae.kernels.utils import (alloc, check_inputs, group_size, launch, mma, nvtx_range, round_to, tile_config,
                                  tile_ids)


@triton.jit
def _pre_activation_tile(x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, rows, cols, row_ok, col_ok, d, m,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """a = (x − b_dec) W_enc + b_enc on one (BLOCK_M, BLOCK_N) tile, accumulated in fp32 over
    d, with x − b_dec rounded to x's dtype first (as torch rounds it): the forward's prologue,
    which the θ-gradient kernel repeats to recompute a."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * d + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * m + cols[None, :]  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_ok = k0 + ks < d
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bd = tl.load(b_dec_ptr + k0 + ks, mask=k_ok, other=0.0)
        xc = round_to(xt.to(tl.float32) - bd.to(tl.float32)[None, :], xt.dtype, INTERP_BF16)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, xc, wt, INTERP_BF16, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * m
    return acc + tl.load(b_enc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit(do_not_specialize=["group"])  # one compilation whatever the group
def _encode_fwd_kernel(
    # pointers
    x_ptr,  # (B, d) input rows
    w_ptr,  # (d, m) W_enc
    b_enc_ptr,  # (m,)
    b_dec_ptr,  # (d,)
    theta_ptr,  # (m,) thresholds, any float dtype
    f_ptr,  # (B, m) out: features, x's dtype
    l1_part_ptr,  # (n_m_tiles, B) fp32 out: Σ of f over this program's columns
    fire_part_ptr,  # (n_b_tiles, m) int32 out: fires over this program's rows
    # sizes
    B, d, m, group,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of f: a = (x − b_dec) W_enc + b_enc accumulated in fp32
    over d, then the epilogue f = a·1[a > θ] (stored in x's dtype), the tile's row sums of f
    and its per-column fire counts. A feature fires where a > θ and its stored f is non-zero,
    so fire counts and the backward's mask (f ≠ 0) agree even where a rounds to zero in the
    output dtype. NaN pre-activations propagate to f and row_l1, as in the reference.
    """
    n_b = tl.cdiv(B, BLOCK_M)
    n_m = tl.cdiv(m, BLOCK_N)
    pid_b, pid_m = tile_ids(tl.program_id(0), n_b, n_m, group)
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < m
    a = _pre_activation_tile(x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, rows, cols, row_ok, col_ok, d, m,
                             BLOCK_M, BLOCK_N, BLOCK_K, INTERP_BF16, PRECISION)
    theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    valid = row_ok[:, None] & col_ok[None, :]
    above = (a > theta[None, :]) & valid
    fa = a * above.to(tl.float32)  # a·1[a > θ] in fp32 (NaN·0 stays NaN)
    f = round_to(fa, f_ptr.dtype.element_ty, INTERP_BF16)
    tl.store(f_ptr + rows.to(tl.int64)[:, None] * m + cols[None, :], f, mask=valid)
    fired = above & (f.to(tl.float32) != 0)
    tl.store(l1_part_ptr + pid_m.to(tl.int64) * B + rows, tl.sum(fa, axis=1), mask=row_ok)
    tl.store(fire_part_ptr + pid_b.to(tl.int64) * m + cols, tl.sum(fired.to(tl.int32), axis=0), mask=col_ok)


@triton.jit
def _grad_a_tile(g_f_ptr, f_ptr, g_l1, offs, ok, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """grad_a = (grad_f + grad_row_l1)·1[f ≠ 0] on one tile, fp32 and rounded to DTYPE."""
    gf = tl.load(g_f_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    fv = tl.load(f_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ga = tl.where(fv != 0, gf + g_l1, 0.0)
    return ga, round_to(ga, DTYPE, INTERP_BF16)


@triton.jit(do_not_specialize=["group"])  # one compilation whatever the group
def _encode_bwd_dx_kernel(
    # pointers
    g_f_ptr,  # (B, m) upstream grad of f
    f_ptr,  # (B, m) saved f: its non-zeros are the mask
    g_l1_ptr,  # (B,) fp32 upstream grad of row_l1
    w_ptr,  # (d, m) W_enc
    g_x_ptr,  # (B, d) out: grad_x = grad_a W_encᵀ
    # sizes
    B, d, m, group,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of grad_x = grad_a W_encᵀ, reducing over m, with
    grad_a = (grad_f + grad_row_l1)·1[a > θ] formed tile by tile from the saved f."""
    n_b = tl.cdiv(B, BLOCK_M)
    n_d = tl.cdiv(d, BLOCK_N)
    pid_b, pid_d = tile_ids(tl.program_id(0), n_b, n_d, group)
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    d_ok = dcols < d
    g_l1 = tl.load(g_l1_ptr + rows, mask=row_ok, other=0.0)[:, None]
    a_offs = rows.to(tl.int64)[:, None] * m + ks[None, :]  # (BLOCK_M, BLOCK_K) into (B, m)
    w_ptrs = w_ptr + dcols.to(tl.int64)[None, :] * m + ks[:, None]  # (BLOCK_K, BLOCK_N) of W_encᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, m, BLOCK_K):
        k_ok = k0 + ks < m
        _, ga = _grad_a_tile(g_f_ptr, f_ptr, g_l1, a_offs, row_ok[:, None] & k_ok[None, :],
                             w_ptr.dtype.element_ty, INTERP_BF16)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(acc, ga, wt, INTERP_BF16, PRECISION)
        a_offs += BLOCK_K
        w_ptrs += BLOCK_K
    g_x = round_to(acc, g_x_ptr.dtype.element_ty, INTERP_BF16)
    tl.store(g_x_ptr + rows.to(tl.int64)[:, None] * d + dcols[None, :], g_x, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["group"])  # one compilation whatever the group
def _encode_bwd_dw_kernel(
    # pointers
    x_ptr,  # (B, d) input rows
    b_dec_ptr,  # (d,)
    g_f_ptr,  # (B, m) upstream grad of f
    f_ptr,  # (B, m) saved f
    g_l1_ptr,  # (B,) fp32 upstream grad of row_l1
    w_ptr,  # (d, m) W_enc
    g_w_ptr,  # (d, m) out: grad_W_enc = (x − b_dec)ᵀ grad_a
    g_b_enc_ptr,  # (m,) out: grad_b_enc = Σ_rows grad_a (written by the d-tile-0 programs)
    g_b_dec_part_ptr,  # (n_m_tiles, d) fp32 out: −W_enc[:, tile] Σ_rows grad_a[:, tile]
    # sizes
    B, d, m, group,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of grad_W_enc = (x − b_dec)ᵀ grad_a, reducing over the
    batch, plus the column sums s = Σ_rows grad_a of its features, which give
    grad_b_enc = s and grad_b_dec = −Σ_rows grad_x = −W_enc s (this tile's share; the
    launcher sums the shares over feature tiles), so grad_b_dec needs no grad_x GEMM."""
    n_d = tl.cdiv(d, BLOCK_M)
    n_m = tl.cdiv(m, BLOCK_N)
    pid_d, pid_m = tile_ids(tl.program_id(0), n_d, n_m, group)
    dcols = pid_d * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    d_ok = dcols < d
    col_ok = cols < m
    bd = tl.load(b_dec_ptr + dcols, mask=d_ok, other=0.0).to(tl.float32)
    x_ptrs = x_ptr + ks.to(tl.int64)[:, None] * d + dcols[None, :]  # (BLOCK_K, BLOCK_M) rows of x
    a_offs = ks.to(tl.int64)[:, None] * m + cols[None, :]  # (BLOCK_K, BLOCK_N) into (B, m)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    col_sum = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, B, BLOCK_K):
        k_ok = k0 + ks < B
        g_l1 = tl.load(g_l1_ptr + k0 + ks, mask=k_ok, other=0.0)[:, None]
        ga32, ga = _grad_a_tile(g_f_ptr, f_ptr, g_l1, a_offs, k_ok[:, None] & col_ok[None, :],
                                x_ptr.dtype.element_ty, INTERP_BF16)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        xc = round_to(xt.to(tl.float32) - bd[None, :], xt.dtype, INTERP_BF16)  # padded rows meet grad_a = 0
        acc = mma(acc, tl.trans(xc), ga, INTERP_BF16, PRECISION)
        col_sum += tl.sum(ga32, axis=0)
        x_ptrs += BLOCK_K * d
        a_offs += BLOCK_K * m
    ok = d_ok[:, None] & col_ok[None, :]
    w_offs = dcols.to(tl.int64)[:, None] * m + cols[None, :]
    tl.store(g_w_ptr + w_offs, round_to(acc, g_w_ptr.dtype.element_ty, INTERP_BF16), mask=ok)
    if pid_d == 0:
        tl.store(g_b_enc_ptr + cols, round_to(col_sum, g_b_enc_ptr.dtype.element_ty, INTERP_BF16), mask=col_ok)
    w = tl.load(w_ptr + w_offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(g_b_dec_part_ptr + pid_m.to(tl.int64) * d + dcols, -tl.sum(w * col_sum[None, :], axis=1), mask=d_ok)


@nvtx_range("esosae.encode.fwd")
def encode_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                   theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f (B, m) in x's dtype, row_l1 (B,) fp32, fire_count (m,) int32; see the module doc."""
    dtype, n = check_inputs(
        "encode", _encode_fwd_kernel,
        {"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "theta": theta},
        {"x": ("B", "d"), "W_enc": ("d", "m"), "b_enc": ("m",), "b_dec": ("d",), "theta": ("m",)},
        ("x", "W_enc", "b_enc", "b_dec"))
    B, d, m = n["B"], n["d"], n["m"]
    kernel = _encode_fwd_kernel
    cfg = tile_config("gemm", dtype, kernel, x.device, B, m, d)
    n_b, n_m = triton.cdiv(B, cfg.BLOCK_M), triton.cdiv(m, cfg.BLOCK_N)
    f = alloc((B, m), dtype, x.device)
    l1_part = alloc((n_m, B), torch.float32, x.device)
    fire_part = alloc((n_b, m), torch.int32, x.device)
    group = group_size(kernel, n_b, cfg.BLOCK_M * d * x.element_size())  # x strips stay, W_enc streams
    launch(kernel, n_b * n_m, cfg, dtype, x, W_enc, b_enc, b_dec, theta, f, l1_part, fire_part, B, d, m, group)
    return f, l1_part.sum(0), fire_part.sum(0, dtype=torch.int32)


@nvtx_range("esosae.encode.bwd")
def encode_backward(grad_f: torch.Tensor, grad_l1: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                    b_dec: torch.Tensor, f: torch.Tensor, need: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_dec) for the inputs (x, W_enc, b_enc, b_dec)
    whose ``need`` flag is set; None for the others."""
    B, d = x.shape
    m = W_enc.shape[1]
    dtype, size = x.dtype, x.element_size()
    grad_f = grad_f.to(dtype).contiguous()  # upstream grads may arrive expanded or in another dtype
    grad_l1 = grad_l1.to(torch.float32).contiguous()
    grads: list[torch.Tensor | None] = [None] * 4
    if need[0]:
        kernel = _encode_bwd_dx_kernel
        cfg = tile_config("fused", dtype, kernel, x.device, B, d, m)
        n_b = triton.cdiv(B, cfg.BLOCK_M)
        grads[0] = alloc((B, d), dtype, x.device)
        group = group_size(kernel, n_b, 2 * cfg.BLOCK_M * m * size)  # grad_f and f strips
        launch(kernel, n_b * triton.cdiv(d, cfg.BLOCK_N), cfg, dtype, grad_f, f, grad_l1, W_enc, grads[0],
               B, d, m, group)
    if any(need[1:]):
        kernel = _encode_bwd_dw_kernel
        cfg = tile_config("fused", dtype, kernel, x.device, d, m, B)
        n_d, n_m = triton.cdiv(d, cfg.BLOCK_M), triton.cdiv(m, cfg.BLOCK_N)
        grad_w = alloc((d, m), dtype, x.device)
        grad_b_enc = alloc((m,), dtype, x.device)
        g_b_dec_part = alloc((n_m, d), torch.float32, x.device)
        group = group_size(kernel, n_d, cfg.BLOCK_M * B * size)  # x column strips stay, grad_a streams
        launch(kernel, n_d * n_m, cfg, dtype, x, b_dec, grad_f, f, grad_l1, W_enc, grad_w, grad_b_enc, g_b_dec_part,
               B, d, m, group)
        found = (grad_w, grad_b_enc, g_b_dec_part.sum(0).to(dtype))
        grads[1:] = [g if wanted else None for g, wanted in zip(found, need[1:])]
    return tuple(grads)


class EncodeFunction(torch.autograd.Function):
    """Autograd for ``encode``. Gradients, with grad_a = (grad_f + grad_row_l1)·1[a > θ]:

        grad_x = grad_a W_encᵀ              grad_W_enc = (x − b_dec)ᵀ grad_a
        grad_b_enc = Σ_rows grad_a          grad_b_dec = −Σ_rows grad_x = −W_enc grad_b_enc

    θ gets none; fire_count is not differentiable.

    Mask: the backward reads the saved f and uses 1[f ≠ 0] as 1[a > θ]. For θ ≥ 0 (the
    trainer's case) the two agree: a > θ ≥ 0 gives f = a > 0, and a ≤ θ gives f = 0,
    including a = θ = 0. The one exception, a > θ with a so small that f rounds to zero in
    its dtype (below fp16's or bf16's smallest subnormal, or a = 0 > θ), is counted as not
    firing by the forward too, so fire counts and gradients never disagree. Keeping f costs
    nothing: the decoder's backward keeps the same tensor. Recomputing a would cost another
    B×d×m GEMM (+33% FLOPs over forward, grad_x and grad_W_enc), and a packed bit mask B·m/8
    bytes of extra writes and reads.

    Reductions: row_l1, fire counts and grad_b_dec go through per-program partial buffers
    summed by torch (deterministic, every element written once, and small: one value per
    tile row or column); grad_b_enc is reduced whole inside the programs of the first
    d-tile. No atomics, so results are bitwise reproducible.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, theta):
        f, row_l1, fire_count = encode_forward(x, W_enc, b_enc, b_dec, theta)
        ctx.save_for_backward(x, W_enc, b_dec, f)
        ctx.mark_non_differentiable(fire_count)
        return f, row_l1, fire_count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_l1, _grad_fire):
        x, W_enc, b_dec, f = ctx.saved_tensors
        return (*encode_backward(grad_f, grad_l1, x, W_enc, b_dec, f, ctx.needs_input_grad[:4]), None)


encode = EncodeFunction.apply


@triton.jit(do_not_specialize=["group", "eps"])  # one compilation whatever the group and ε
def _encode_bwd_theta_kernel(
    # pointers
    x_ptr,  # (B, d) input rows
    w_ptr,  # (d, m) W_enc
    b_enc_ptr,  # (m,)
    b_dec_ptr,  # (d,)
    theta_ptr,  # (m,) thresholds
    g_f_ptr,  # (B, m) upstream grad of f
    g_row_ptr,  # (B,) fp32 upstream grad of row_l1 (or row_l0)
    g_theta_part_ptr,  # (n_b_tiles, m) fp32 out: this program's rows' share of grad_θ
    # sizes and the kernel's bandwidth
    B, d, m, eps, group,
    # meta-parameters
    L0: tl.constexpr,  # the row term is Σ 1[a > θ] (its θ-gradient has no θ/ε factor)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile: a recomputed as in the forward, then the column sums of
    −K((a − θ)/ε)·(θ/ε·(g_f + g_row)) (l1) or −K·(θ/ε·g_f + g_row/ε) (l0)."""
    n_b = tl.cdiv(B, BLOCK_M)
    n_m = tl.cdiv(m, BLOCK_N)
    pid_b, pid_m = tile_ids(tl.program_id(0), n_b, n_m, group)
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < m
    a = _pre_activation_tile(x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, rows, cols, row_ok, col_ok, d, m,
                             BLOCK_M, BLOCK_N, BLOCK_K, INTERP_BF16, PRECISION)
    theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    valid = row_ok[:, None] & col_ok[None, :]
    window = (tl.abs(a - theta[None, :]) < eps * 0.5) & valid  # K((a − θ)/ε)
    gf = tl.load(g_f_ptr + rows.to(tl.int64)[:, None] * m + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    g_row = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if L0:
        g = theta[None, :] / eps * gf + g_row / eps
    else:
        g = theta[None, :] / eps * (gf + g_row)
    part = -tl.sum(tl.where(window, g, 0.0), axis=0)  # (BLOCK_N,)
    tl.store(g_theta_part_ptr + pid_b.to(tl.int64) * m + cols, part, mask=col_ok)


@nvtx_range("esosae.encode.bwd_theta")
def encode_backward_theta(grad_f: torch.Tensor, grad_row: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                          b_enc: torch.Tensor, b_dec: torch.Tensor, theta: torch.Tensor, eps: float,
                          l0: bool) -> torch.Tensor:
    """grad_θ (m,) fp32 of the straight-through estimator; see the module doc."""
    B, d = x.shape
    m = W_enc.shape[1]
    kernel = _encode_bwd_theta_kernel
    cfg = tile_config("gemm", x.dtype, kernel, x.device, B, m, d)
    n_b, n_m = triton.cdiv(B, cfg.BLOCK_M), triton.cdiv(m, cfg.BLOCK_N)
    part = alloc((n_b, m), torch.float32, x.device)
    group = group_size(kernel, n_b, cfg.BLOCK_M * d * x.element_size())
    launch(kernel, n_b * n_m, cfg, x.dtype, x, W_enc, b_enc, b_dec, theta.contiguous(), grad_f, grad_row, part,
           B, d, m, float(eps), group, L0=l0)
    return part.sum(0)


class EncodeLearnedFunction(torch.autograd.Function):
    """Autograd for ``encode_learned``: ``EncodeFunction``'s forward and gradients of x,
    W_enc, b_enc, b_dec (with grad_row_l0 not reaching a: the L0 term trains θ alone), and
    grad_θ from ``_encode_bwd_theta_kernel``, which recomputes a.

    row_l0 = Σ_j 1[f ≠ 0] is counted by torch from f (a B×m pass; the fire counts of the
    forward are per feature, not per row).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, theta, eps, l0):
        f, row_l1, fire_count = encode_forward(x, W_enc, b_enc, b_dec, theta.detach())
        row = (f != 0).sum(1, dtype=torch.float32) if l0 else row_l1  # (B,)
        ctx.save_for_backward(x, W_enc, b_enc, b_dec, theta, f)
        ctx.eps, ctx.l0 = eps, l0
        ctx.mark_non_differentiable(fire_count)
        return f, row, fire_count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_row, _grad_fire):
        x, W_enc, b_enc, b_dec, theta, f = ctx.saved_tensors
        grad_f = grad_f.to(x.dtype).contiguous()
        grad_row = grad_row.to(torch.float32).contiguous()
        grad_a_row = torch.zeros_like(grad_row) if ctx.l0 else grad_row
        grads = encode_backward(grad_f, grad_a_row, x, W_enc, b_dec, f, ctx.needs_input_grad[:4])
        grad_theta = None
        if ctx.needs_input_grad[4]:
            grad_theta = encode_backward_theta(grad_f, grad_row, x, W_enc, b_enc, b_dec, theta, ctx.eps,
                                               ctx.l0).to(theta.dtype)
        return (*grads, grad_theta, None, None)


encode_learned = EncodeLearnedFunction.apply
