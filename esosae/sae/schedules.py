"""The curriculum as pure functions of the step (METHOD.md §4), after nanoGPT's ``get_lr``.

With ``T = schedule_fraction · total_steps`` and ``p(t) = min(t / T, 1)``:

- ``exp``:    τ(t) = τ_0 · (τ_T / τ_0)^p(t)     (geometric: a constant ratio per step)
- ``linear``: τ(t) = τ_0 + (τ_T − τ_0) · p(t)   (a constant difference per step)
- ``const``:  τ(t) = τ_T
- progress:   s(t) = (τ(t) − τ_0) / (τ_T − τ_0) ∈ [0, 1], and 1 for ``const``
- γ(t):       synced γ_max·s(t); linear γ_max·p(t); none γ_max
- λ(t):       λ · min(1, t / warmup_steps)
- lr(t):      linear warmup, constant, linear decay to 0 over the last fraction
"""

from __future__ import annotations

from esosae.config import ScheduleConfig, TrainConfig


def progress(step: int, total_steps: int, fraction: float) -> float:
    """p(t) = min(t / T, 1) with T = fraction · total_steps."""
    horizon = max(fraction * total_steps, 1.0)
    return min(step / horizon, 1.0)


def tau(step: int, total_steps: int, cfg: ScheduleConfig, tau_final: float) -> float:
    """τ(t) for one layer whose final threshold is ``tau_final``."""
    if cfg.schedule == "const":
        return tau_final
    p = progress(step, total_steps, cfg.schedule_fraction)
    if cfg.schedule == "exp":
        return cfg.tau_0 * (tau_final / cfg.tau_0) ** p
    return cfg.tau_0 + (tau_final - cfg.tau_0) * p


def schedule_progress(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """s(t) of layer 1's schedule: how far τ has travelled from τ_0 to τ_T."""
    if cfg.schedule == "const" or cfg.tau_final == cfg.tau_0:
        return 1.0
    t = tau(step, total_steps, cfg, cfg.tau_final)
    return (t - cfg.tau_0) / (cfg.tau_final - cfg.tau_0)


def gamma(step: int, total_steps: int, cfg: ScheduleConfig, gamma_max: float) -> float:
    """γ(t): the orthogonality weight, warmed up in step with the curriculum (``synced``)."""
    if cfg.gamma_warmup == "synced":
        return gamma_max * schedule_progress(step, total_steps, cfg)
    if cfg.gamma_warmup == "linear":
        return gamma_max * progress(step, total_steps, cfg.schedule_fraction)
    return gamma_max


def l1_weight(step: int, total_steps: int, cfg: ScheduleConfig, l1_coeff: float) -> float:
    """λ(t) = λ · min(1, t / warmup_steps); no warmup when the fraction is 0."""
    warmup = cfg.l1_warmup_fraction * total_steps
    if warmup <= 0:
        return l1_coeff
    return l1_coeff * min(1.0, step / warmup)


def lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate: linear warmup from 0, constant, then linear decay to 0 at the end."""
    warmup = cfg.lr_warmup_fraction * cfg.steps
    decay = cfg.lr_decay_fraction * cfg.steps
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if decay > 0 and step >= cfg.steps - decay:
        return cfg.lr * max(cfg.steps - step, 0) / decay
    return cfg.lr
