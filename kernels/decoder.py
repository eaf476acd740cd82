"""Decoder with the reconstruction error fused: one kernel forward, two backward.

    x̂ = f W_dec + bias                     (B, d), f's dtype
    sq_err = ‖target − x̂‖²                  (B,) fp32, from the x̂ that is returned

f is the encoder's output, mostly zeros, but the product here is dense and tiled: the path
for a dense f (early in the curriculum) and for an f that did not come from the pair
encoder. Where f is sparse, ``sparse.py`` decodes from its active pairs instead (gathers
of the L0 active rows of W_dec per token, 2·B·L0·d FLOPs instead of 2·B·m·d).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from esosae.kernels.utils import (alloc, check_inputs, group_size, launch, mma, nvtx_range, round_to, tile_config,
                                  tile_ids)


@triton.jit(do_not_specialize=["group"])  # one compilation whatever the group
def _decode_fwd_kernel(
    # pointers
    f_ptr,  # (B, m) features
    w_ptr,  # (m, d) W_dec
    bias_ptr,  # (d,)
    t_ptr,  # (B, d) target
    xh_ptr,  # (B, d) out: x̂
    sq_part_ptr,  # (n_d_tiles, B) fp32 out: Σ over this program's columns of (target − x̂)²
    # sizes
    B, m, d, group,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of x̂ = f W_dec + bias, reducing over m in fp32, with the
    epilogue's partial row sums of (target − x̂)², x̂ taken as stored (rounded)."""
    n_b = tl.cdiv(B, BLOCK_M)
    n_d = tl.cdiv(d, BLOCK_N)
    pid_b, pid_d = tile_ids(tl.program_id(0), n_b, n_d, group)
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    d_ok = dcols < d
    f_ptrs = f_ptr + rows.to(tl.int64)[:, None] * m + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * d + dcols[None, :]  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, m, BLOCK_K):
        k_ok = k0 + ks < m
        ft = tl.load(f_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(acc, ft, wt, INTERP_BF16, PRECISION)
        f_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * d
    ok = row_ok[:, None] & d_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * d + dcols[None, :]
    bias = tl.load(bias_ptr + dcols, mask=d_ok, other=0.0).to(tl.float32)
    xh = round_to(acc + bias[None, :], xh_ptr.dtype.element_ty, INTERP_BF16)
    tl.store(xh_ptr + offs, xh, mask=ok)
    t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    diff = tl.where(ok, t - xh.to(tl.float32), 0.0)
    tl.store(sq_part_ptr + pid_d.to(tl.int64) * B + rows, tl.sum(diff * diff, axis=1), mask=row_ok)


@triton.jit
def _resid_grad_tile(g_xh_ptr, t_ptr, xh_ptr, g_sq, offs, ok):
    """On one (rows, d) tile: grad_target = 2·grad_sq·(target − x̂) and
    g = grad_x̂ − grad_target, the total gradient reaching x̂; both fp32."""
    t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xh = tl.load(xh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g_xh = tl.load(g_xh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g_t = 2.0 * g_sq * (t - xh)
    return g_xh - g_t, g_t


@triton.jit(do_not_specialize=["group"])  # one compilation whatever the group
def _decode_bwd_df_kernel(
    # pointers
    g_xh_ptr,  # (B, d) upstream grad of x̂
    g_sq_ptr,  # (B,) fp32 upstream grad of sq_err
    t_ptr,  # (B, d) target
    xh_ptr,  # (B, d) saved x̂
    w_ptr,  # (m, d) W_dec
    g_f_ptr,  # (B, m) out: grad_f = g W_decᵀ
    # sizes
    B, m, d, group,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of grad_f = g W_decᵀ, reducing over d, where
    g = grad_x̂ − 2·grad_sq·(target − x̂) is formed tile by tile (never stored)."""
    n_b = tl.cdiv(B, BLOCK_M)
    n_m = tl.cdiv(m, BLOCK_N)
    pid_b, pid_m = tile_ids(tl.program_id(0), n_b, n_m, group)
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    col_ok = cols < m
    g_sq = tl.load(g_sq_ptr + rows, mask=row_ok, other=0.0)[:, None]
    offs = rows.to(tl.int64)[:, None] * d + ks[None, :]  # (BLOCK_M, BLOCK_K) into (B, d)
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * d + ks[:, None]  # (BLOCK_K, BLOCK_N) of W_decᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_ok = k0 + ks < d
        g, _ = _resid_grad_tile(g_xh_ptr, t_ptr, xh_ptr, g_sq, offs, row_ok[:, None] & k_ok[None, :])
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, round_to(g, wt.dtype, INTERP_BF16), wt, INTERP_BF16, PRECISION)
        offs += BLOCK_K
        w_ptrs += BLOCK_K
    g_f = round_to(acc, g_f_ptr.dtype.element_ty, INTERP_BF16)
    tl.store(g_f_ptr + rows.to(tl.int64)[:, None] * m + cols[None, :], g_f, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["group"])  # one compilation whatever the group
def _decode_bwd_dw_kernel(
    # pointers
    f_ptr,  # (B, m) saved f
    g_xh_ptr,  # (B, d) upstream grad of x̂
    g_sq_ptr,  # (B,) fp32 upstream grad of sq_err
    t_ptr,  # (B, d) target
    xh_ptr,  # (B, d) saved x̂
    g_w_ptr,  # (m, d) out: grad_W_dec = fᵀ g
    g_bias_ptr,  # (d,) out: grad_bias = Σ_rows g (written by the m-tile-0 programs)
    g_t_ptr,  # (B, d) out when NEED_TARGET: grad_target (written by the m-tile-0 programs)
    # sizes
    B, m, d, group,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NEED_TARGET: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of grad_W_dec = fᵀ g, reducing over the batch. The
    programs of the first feature tile also reduce grad_bias = Σ_rows g for their columns and
    write grad_target = 2·grad_sq·(target − x̂) as they pass over the rows."""
    n_m = tl.cdiv(m, BLOCK_M)
    n_d = tl.cdiv(d, BLOCK_N)
    pid_m, pid_d = tile_ids(tl.program_id(0), n_m, n_d, group)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < m
    d_ok = dcols < d
    f_ptrs = f_ptr + ks.to(tl.int64)[:, None] * m + cols[None, :]  # (BLOCK_K, BLOCK_M) rows of f
    offs = ks.to(tl.int64)[:, None] * d + dcols[None, :]  # (BLOCK_K, BLOCK_N) into (B, d)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    col_sum = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, B, BLOCK_K):
        k_ok = k0 + ks < B
        ok = k_ok[:, None] & d_ok[None, :]
        g_sq = tl.load(g_sq_ptr + k0 + ks, mask=k_ok, other=0.0)[:, None]
        g, g_t = _resid_grad_tile(g_xh_ptr, t_ptr, xh_ptr, g_sq, offs, ok)
        ft = tl.load(f_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, tl.trans(ft), round_to(g, ft.dtype, INTERP_BF16), INTERP_BF16, PRECISION)
        if pid_m == 0:
            col_sum += tl.sum(g, axis=0)
            if NEED_TARGET:
                tl.store(g_t_ptr + offs, round_to(g_t, g_t_ptr.dtype.element_ty, INTERP_BF16), mask=ok)
        f_ptrs += BLOCK_K * m
        offs += BLOCK_K * d
    g_w = round_to(acc, g_w_ptr.dtype.element_ty, INTERP_BF16)
    tl.store(g_w_ptr + cols.to(tl.int64)[:, None] * d + dcols[None, :], g_w, mask=col_ok[:, None] & d_ok[None, :])
    if pid_m == 0:
        tl.store(g_bias_ptr + dcols, round_to(col_sum, g_bias_ptr.dtype.element_ty, INTERP_BF16), mask=d_ok)


@nvtx_range("esosae.decode.fwd")
def decode_forward(f: torch.Tensor, W_dec: torch.Tensor, bias: torch.Tensor,
                   target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ (B, d) in f's dtype and sq_err (B,) fp32; see the module doc."""
    dtype, n = check_inputs(
        "decode", _decode_fwd_kernel, {"f": f, "W_dec": W_dec, "bias": bias, "target": target},
        {"f": ("B", "m"), "W_dec": ("m", "d"), "bias": ("d",), "target": ("B", "d")},
        ("f", "W_dec", "bias", "target"))
    B, m, d = n["B"], n["m"], n["d"]
    kernel = _decode_fwd_kernel
    cfg = tile_config("gemm", dtype, kernel, f.device, B, d, m)
    n_b, n_d = triton.cdiv(B, cfg.BLOCK_M), triton.cdiv(d, cfg.BLOCK_N)
    x_hat = alloc((B, d), dtype, f.device)
    sq_part = alloc((n_d, B), torch.float32, f.device)
    group = group_size(kernel, n_b, cfg.BLOCK_M * m * f.element_size())  # f strips
    launch(kernel, n_b * n_d, cfg, dtype, f, W_dec, bias, target, x_hat, sq_part, B, m, d, group)
    return x_hat, sq_part.sum(0)


@nvtx_range("esosae.decode.bwd")
def decode_backward(grad_xh: torch.Tensor, grad_sq: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor,
                    target: torch.Tensor, x_hat: torch.Tensor,
                    need: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """(grad_f, grad_W_dec, grad_bias, grad_target) for the inputs whose ``need`` flag is set."""
    B, m = f.shape
    d = W_dec.shape[1]
    dtype, size = f.dtype, f.element_size()
    grad_xh = grad_xh.to(dtype).contiguous()  # upstream grads may arrive expanded or in another dtype
    grad_sq = grad_sq.to(torch.float32).contiguous()
    grads: list[torch.Tensor | None] = [None] * 4
    if need[0]:
        kernel = _decode_bwd_df_kernel
        cfg = tile_config("fused", dtype, kernel, f.device, B, m, d)
        n_b = triton.cdiv(B, cfg.BLOCK_M)
        grads[0] = alloc((B, m), dtype, f.device)
        group = group_size(kernel, n_b, 3 * cfg.BLOCK_M * d * size)  # grad_x̂, target and x̂ strips; W_dec streams
        launch(kernel, n_b * triton.cdiv(m, cfg.BLOCK_N), cfg, dtype, grad_xh, grad_sq, target, x_hat, W_dec,
               grads[0], B, m, d, group)
    if any(need[1:]):
        kernel = _decode_bwd_dw_kernel
        cfg = tile_config("fused", dtype, kernel, f.device, m, d, B)
        n_m = triton.cdiv(m, cfg.BLOCK_M)
        grad_w = alloc((m, d), dtype, f.device)
        grad_bias = alloc((d,), dtype, f.device)
        grad_t = alloc((B, d), dtype, f.device) if need[3] else grad_bias  # not written unless needed
        group = group_size(kernel, n_m, cfg.BLOCK_M * B * size)  # f column strips
        launch(kernel, n_m * triton.cdiv(d, cfg.BLOCK_N), cfg, dtype, f, grad_xh, grad_sq, target, x_hat, grad_w,
               grad_bias, grad_t, B, m, d, group, NEED_TARGET=need[3])
        grads[1:] = [g if wanted else None for g, wanted in zip((grad_w, grad_bias, grad_t), need[1:])]
    return tuple(grads)


class DecodeFunction(torch.autograd.Function):
    """Autograd for ``decode``. With g = grad_x̂ − 2·grad_sq·(target − x̂), the total
    gradient reaching x̂:

        grad_f = g W_decᵀ        grad_W_dec = fᵀ g        grad_bias = Σ_rows g
        grad_target = 2·grad_sq·(target − x̂)

    The layer-2 target is the residual r = x − x̂1, so grad_target carries the error's
    gradient back into layer 1. g is formed inside the tiles of both gradient products and
    never stored. Reductions: sq_err through per-program partials summed by torch;
    grad_bias whole inside the first feature tile's programs. No atomics.
    """

    @staticmethod
    def forward(ctx, f, W_dec, bias, target):
        x_hat, sq_err = decode_forward(f, W_dec, bias, target)
        ctx.save_for_backward(f, W_dec, target, x_hat)
        return x_hat, sq_err

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_xh, grad_sq):
        f, W_dec, target, x_hat = ctx.saved_tensors
        return decode_backward(grad_xh, grad_sq, f, W_dec, target, x_hat, ctx.needs_input_grad)


decode = DecodeFunction.apply
