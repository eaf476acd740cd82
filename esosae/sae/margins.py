"""Clamped adaptive margins (METHOD.md §5): per-feature threshold multipliers μ.

μ adapts from firing statistics, never from gradients:

    freq ← decay · freq + (1 − decay) · fire_count / n_tokens           (every step)
    μ_i  ← μ_i · exp(η · (log(freq_i + ε) − log freq_target))           (every margin_every
           only where freq_i ∉ [freq_target / band, freq_target · band]  steps)
    μ_i  ← clamp(μ_i, μ_min, μ_max)                                      (unless unclamped)

A feature firing too rarely gets a lower threshold θ_i = τ(t)·μ_i, a dense one a higher one.
No update happens while the schedule progress s(t) < margin_freeze: under ``exp`` nearly
every feature fires early on, and updates then only push μ to μ_max.

Learned margins (``margins='learned'``) are trained by the optimizer instead; after each
step ``project_margins`` keeps them in [μ_min, μ_max] (μ ≥ 0 for ``arch='jumprelu'``).
"""

from __future__ import annotations

import torch

from esosae.config import SAEConfig


def freq_target(cfg: SAEConfig, width: int) -> float:
    """freq_target = target_L0 / m, capped at 1."""
    return min(cfg.target_l0 / width, 1.0)


def update_freq(freq: torch.Tensor, fire_count: torch.Tensor, n_tokens: int, decay: float) -> torch.Tensor:
    """One EMA step of the firing frequency from this batch's per-feature fire counts."""
    return decay * freq + (1.0 - decay) * (fire_count.to(freq.dtype) / n_tokens)  # (m,)


def update_margins(mu: torch.Tensor, freq: torch.Tensor, cfg: SAEConfig, progress: float) -> torch.Tensor:
    """The §5 update for one layer at schedule progress s(t); μ unchanged unless margins are
    adaptive and s(t) ≥ margin_freeze."""
    if cfg.margins != "adaptive" or progress < cfg.margin_freeze:
        return mu
    target = freq_target(cfg, mu.numel())
    outside = (freq < target / cfg.margin_band) | (freq > target * cfg.margin_band)  # (m,)
    step = torch.exp(cfg.margin_lr * (torch.log(freq + cfg.freq_eps) - torch.log(torch.tensor(target))))
    mu = torch.where(outside, mu * step, mu)
    if cfg.clamp_margins:
        mu = mu.clamp(cfg.mu_min, cfg.mu_max)
    return mu


@torch.no_grad()
def project_margins(mu: torch.Tensor, cfg: SAEConfig) -> None:
    """Learned μ back into [μ_min, μ_max] (or ≥ 0 for jumprelu and unclamped) in place."""
    if cfg.arch == "jumprelu" or not cfg.clamp_margins:
        mu.clamp_(min=0.0)
    else:
        mu.clamp_(cfg.mu_min, cfg.mu_max)


def effective_margins(mu: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
    """clamp(μ, μ_min, μ_max) for the threshold θ = τ·clamp(μ); raw μ when unclamped."""
    return mu.clamp(cfg.mu_min, cfg.mu_max) if cfg.clamp_margins and cfg.arch != "jumprelu" else mu


def pinned_fractions(mu: torch.Tensor, cfg: SAEConfig) -> tuple[float, float]:
    """Fractions of margins at (or beyond) μ_min and μ_max."""
    if mu.numel() == 0:
        return 0.0, 0.0
    low = (mu <= cfg.mu_min * (1 + 1e-6)).float().mean().item()
    high = (mu >= cfg.mu_max * (1 - 1e-6)).float().mean().item()
    return low, high
