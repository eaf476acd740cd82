"""E-SOSAE in plain PyTorch (METHOD.md §2–3): the oracle every kernel is tested against.

Every function is dtype-generic, so tests run it in float64, and differentiable through
autograd. Nothing here is tuned for speed; clarity is the point.

Dual-layer model (residual stacking), batch B, input width d, widths m1 and m2:

    a1 = (x − b_dec) W_enc1 + b_enc1          f1 = a1 · 1[a1 > θ1]       x̂1 = f1 W_dec1 + b_dec
    r  = x − x̂1                               a2 = r W_enc2 + b_enc2     f2 = a2 · 1[a2 > θ2]
    x̂  = x̂1 + f2 W_dec2
    L  = mean_b ‖x − x̂‖² + λ1 mean_b Σ f1 + λ2 mean_b Σ f2 + γ · L_orth(W_dec1, W_dec2)
    L_orth = (1 / (m1·m2)) Σ_ij max(0, |⟨W_dec1[i], W_dec2[j]⟩| − ρ)²

Learned thresholds (``encode_learned``) train θ through the straight-through estimator of
Rajamanoharan et al. 2024 ("Jumping Ahead"), with the rectangle kernel K(u) = 1[|u| < ½]
of bandwidth ε:

    ∂f/∂θ := −(θ/ε) K((a − θ)/ε)          ∂1[a > θ]/∂θ := −(1/ε) K((a − θ)/ε)

and ∂f/∂a = 1[a > θ], ∂1[a > θ]/∂a = 0 (the L0 term trains θ alone).
"""

from __future__ import annotations

import math

import torch

ORTH_TILE = 64
"""Side of the square tiles of W_dec1 W_dec2ᵀ that the sampled orthogonality penalty draws."""


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Reductions accumulate in fp32 at least (fp64 stays fp64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def encode(
    x: torch.Tensor,  # (B, d)
    W_enc: torch.Tensor,  # (d, m)
    b_enc: torch.Tensor,  # (m,)
    b_dec: torch.Tensor,  # (d,)
    theta: torch.Tensor,  # (m,) thresholds θ ≥ 0 (0 gives a ReLU)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JumpReLU encoder: f = a·1[a > θ] with a = (x − b_dec) W_enc + b_enc.

    Returns f (B, m), row_l1 = Σ_j f (B,) in fp32 (fp64 for fp64 inputs), and
    fire_count = Σ_rows 1[f > 0] (m,) int32. θ gets no gradient; the gradient of a is
    (grad_f + grad_row_l1) · 1[a > θ].
    """
    a = (x - b_dec) @ W_enc + b_enc  # (B, m)
    mask = a > theta.detach()  # (B, m)
    f = a * mask
    row_l1 = f.to(_acc_dtype(f)).sum(-1)  # (B,)
    fire_count = mask.sum(0, dtype=torch.int32)  # (m,)
    return f, row_l1, fire_count


def _window(a: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """K((a − θ)/ε) = 1[|a − θ| < ε/2] as a's dtype (the rectangle kernel)."""
    return ((a - theta).abs() < eps / 2).to(a.dtype)


class JumpReLU(torch.autograd.Function):
    """f = a·1[a > θ]; grad_a = g·1[a > θ], grad_θ = Σ_rows −(θ/ε)·K((a − θ)/ε)·g."""

    @staticmethod
    def forward(ctx, a, theta, eps):
        ctx.save_for_backward(a, theta)
        ctx.eps = eps
        return a * (a > theta)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        grad_theta = (-(theta / ctx.eps) * _window(a, theta, ctx.eps) * g).sum(0)  # (m,)
        return g * (a > theta), grad_theta, None


class Step(torch.autograd.Function):
    """H = 1[a > θ] as a's dtype; grad_a = 0, grad_θ = Σ_rows −(1/ε)·K((a − θ)/ε)·g."""

    @staticmethod
    def forward(ctx, a, theta, eps):
        ctx.save_for_backward(a, theta)
        ctx.eps = eps
        return (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        return None, (-(1 / ctx.eps) * _window(a, theta, ctx.eps) * g).sum(0), None


def encode_learned(
    x: torch.Tensor,  # (B, d)
    W_enc: torch.Tensor,  # (d, m)
    b_enc: torch.Tensor,  # (m,)
    b_dec: torch.Tensor,  # (d,)
    theta: torch.Tensor,  # (m,) θ ≥ 0, trained
    eps: float,  # ε, the kernel's bandwidth
    l0: bool,  # the row's sparsity is Σ 1[a > θ] (True) or Σ f (False)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JumpReLU encoder with a threshold gradient: (f, row_sparsity, fire_count).

    Same forward as ``encode``; row_sparsity is row_l1 = Σ_j f, or row_l0 = Σ_j 1[a > θ]
    with ``l0``. θ's gradient is the straight-through estimate of the module doc.
    """
    a = (x - b_dec) @ W_enc + b_enc  # (B, m)
    f = JumpReLU.apply(a, theta, eps)
    row = Step.apply(a, theta, eps).sum(-1) if l0 else f.sum(-1)  # (B,)
    fire_count = (a > theta).sum(0, dtype=torch.int32)  # (m,)
    return f, row.to(_acc_dtype(f)), fire_count


def batchtopk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK (Bussmann et al. 2024): keep the B·k largest of relu(a) over the whole
    batch, so k is the batch's mean L0; same outputs as ``encode``."""
    a = torch.relu((x - b_dec) @ W_enc + b_enc)  # (B, m)
    flat = a.flatten()
    vals, idx = flat.topk(min(k * a.shape[0], flat.numel()), sorted=False)  # (B·k,)
    f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(a)
    row_l1 = f.to(_acc_dtype(f)).sum(-1)
    fire_count = (f > 0).sum(0, dtype=torch.int32)
    return f, row_l1, fire_count


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK encoder: keep the k largest of relu(a) per row; same outputs as ``encode``."""
    a = torch.relu((x - b_dec) @ W_enc + b_enc)  # (B, m)
    vals, idx = a.topk(k, dim=-1, sorted=False)  # (B, k)
    f = torch.zeros_like(a).scatter(-1, idx, vals)
    row_l1 = f.to(_acc_dtype(f)).sum(-1)
    fire_count = (f > 0).sum(0, dtype=torch.int32)
    return f, row_l1, fire_count


def decode(
    f: torch.Tensor,  # (B, m)
    W_dec: torch.Tensor,  # (m, d)
    bias: torch.Tensor,  # (d,)
    target: torch.Tensor,  # (B, d)
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ = f W_dec + bias and the per-row squared error ‖target − x̂‖² (fp32 or fp64)."""
    x_hat = f @ W_dec + bias  # (B, d)
    diff = (target - x_hat).to(_acc_dtype(x_hat))
    return x_hat, (diff * diff).sum(-1)  # (B, d), (B,)


def tile_grid(m1: int, m2: int) -> tuple[int, int]:
    """Number of ORTH_TILE-sized tiles along each side of the m1×m2 cosine matrix."""
    return math.ceil(m1 / ORTH_TILE), math.ceil(m2 / ORTH_TILE)


def sample_tiles(m1: int, m2: int, fraction: float, generator: torch.Generator) -> torch.Tensor | None:
    """A uniform random subset of ⌈fraction · n_tiles⌉ tiles as (n_sel, 2) int32 (row, col)
    tile indices, or None for all tiles (fraction = 1). Drawn on the CPU so every backend
    sees the same subset."""
    n1, n2 = tile_grid(m1, m2)
    total = n1 * n2
    n_sel = max(1, math.ceil(fraction * total))
    if n_sel >= total:
        return None
    flat = torch.randperm(total, generator=generator)[:n_sel].sort().values
    return torch.stack([flat // n2, flat % n2], dim=1).to(torch.int32)  # (n_sel, 2)


def orth_penalty(
    W_dec1: torch.Tensor,  # (m1, d)
    W_dec2: torch.Tensor,  # (m2, d)
    margin: float,  # ρ
    tiles: torch.Tensor | None = None,  # (n_sel, 2) tile indices, or None for all
) -> torch.Tensor:
    """L_orth = (1/(m1·m2)) Σ max(0, |c_ij| − ρ)², c = W_dec1 W_dec2ᵀ, built naively.

    With a tile subset the sum runs over the selected ORTH_TILE² tiles and is scaled by
    n_tiles / n_sel, an unbiased estimate of the full penalty.
    """
    m1, m2 = W_dec1.shape[0], W_dec2.shape[0]
    c = W_dec1 @ W_dec2.T  # (m1, m2): the matrix the kernels never build
    pen = torch.relu(c.abs() - margin).square()
    scale = 1.0 / (m1 * m2)
    if tiles is not None:
        n1, n2 = tile_grid(m1, m2)
        sel = torch.zeros(n1, n2, dtype=torch.bool, device=c.device)
        sel[tiles[:, 0].long(), tiles[:, 1].long()] = True
        mask = sel.repeat_interleave(ORTH_TILE, 0)[:m1].repeat_interleave(ORTH_TILE, 1)[:, :m2]
        pen = pen * mask
        scale *= (n1 * n2) / tiles.shape[0]
    return pen.to(_acc_dtype(pen)).sum() * scale


def orth_scale(norm: str, m1: int, m2: int) -> float:
    """Factor from the 'pairs' penalty (1/(m1·m2) Σ) to ``norm``'s: 1, or m2 for 'rows'
    (1/m1 Σ, which does not vanish as the layers widen)."""
    return float(m2) if norm == "rows" else 1.0


def auxk_loss(
    e: torch.Tensor,  # (B, d) the residual error x − x̂ to explain, no gradient
    a_dead: torch.Tensor,  # (B, n) pre-activations of the dead features
    W_dead: torch.Tensor,  # (n, d) their decoder rows
    k_aux: int,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): ê = TopK_{k_aux}(relu(a_dead)) W_dead and
    L_aux = mean_b ‖e − ê‖² / mean_b ‖e‖², so dead features get a gradient toward what
    the live ones miss. 0 when nothing is dead."""
    if a_dead.shape[1] == 0:
        return e.new_zeros(())
    a = torch.relu(a_dead)
    vals, idx = a.topk(min(k_aux, a.shape[1]), dim=-1, sorted=False)  # (B, k_aux)
    e_hat = torch.zeros_like(a).scatter(-1, idx, vals) @ W_dead  # (B, d)
    return (e - e_hat).square().sum(-1).mean() / e.square().sum(-1).mean().clamp_min(1e-12)


def orth_penalty_gram(W_dec1: torch.Tensor, W_dec2: torch.Tensor) -> torch.Tensor:
    """The ρ = 0 penalty by the Gram identity ⟨W_dec1ᵀW_dec1, W_dec2ᵀW_dec2⟩_F / (m1·m2)."""
    m1, m2 = W_dec1.shape[0], W_dec2.shape[0]
    return (W_dec1.T @ W_dec1 * (W_dec2.T @ W_dec2)).sum() / (m1 * m2)


def sae_forward(
    x: torch.Tensor,  # (B, d)
    params: dict[str, torch.Tensor],
    theta1: torch.Tensor,  # (m1,)
    theta2: torch.Tensor,  # (m2,)
) -> dict[str, torch.Tensor]:
    """The dual-layer forward of METHOD.md §2; m2 = 0 is a single-layer SAE."""
    f1, l1_1, fire1 = encode(x, params["W_enc1"], params["b_enc1"], params["b_dec"], theta1)
    x_hat1 = f1 @ params["W_dec1"] + params["b_dec"]  # (B, d)
    out = {"f1": f1, "l1_1": l1_1, "fire1": fire1, "x_hat": x_hat1}
    if params["W_dec2"].shape[0] > 0:
        r = x - x_hat1  # gradients flow through r into layer 1
        zero = torch.zeros_like(params["b_dec"])
        f2, l1_2, fire2 = encode(r, params["W_enc2"], params["b_enc2"], zero, theta2)
        out.update(f2=f2, l1_2=l1_2, fire2=fire2, x_hat=x_hat1 + f2 @ params["W_dec2"])
    return out


def sae_loss(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    theta1: torch.Tensor,
    theta2: torch.Tensor,
    lambda1: float,
    lambda2: float,
    gamma: float,
    margin: float,
) -> torch.Tensor:
    """L = mean_b ‖x − x̂‖² + λ1 mean_b Σf1 + λ2 mean_b Σf2 + γ·L_orth (METHOD.md §3)."""
    out = sae_forward(x, params, theta1, theta2)
    loss = (x - out["x_hat"]).square().sum(-1).mean() + lambda1 * out["l1_1"].mean()
    if "f2" in out:
        loss = loss + lambda2 * out["l1_2"].mean()
        loss = loss + gamma * orth_penalty(params["W_dec1"], params["W_dec2"], margin)
    return loss
