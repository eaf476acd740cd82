"""Curriculum metrics (METHOD.md §7) from a run's ``metrics.jsonl`` and its saved margins.

Threshold progression: the logged curves τ1(t), τ2(t), L0(t) (per layer and total),
FVU(t) and dead%(t), and when L0 settles (the first logged step from which it stays
within ``SETTLE`` of its final value).

Margin clamping: the fractions of margins pinned at μ_min and μ_max over training and at
the end, and the final distribution of μ per layer from the saved SAE (quantiles and a
log-spaced histogram; for unclamped runs "pinned" counts μ ≤ μ_min or μ ≥ μ_max).

Alignment, on the logged steps t_0 < t_1 < … (resampled to the regular ``log_every`` grid):

    normalized drop   D(t) = (y(t_0) − y(t)) / (y(t_0) − y(t_end))
                      for y = total L0 (l0_1 + l0_2): 0 at the first logged step, 1 at the
                      last, the fraction of the run's whole drop reached by step t (it may
                      leave [0, 1] where the curve overshoots); undefined if y(t_0) = y(t_end)
    correlation       r(ℓ) = Pearson(s(t), D(t + ℓ)) over the steps where both exist
    lag               ℓ* = argmax_ℓ r(ℓ) for |ℓ| ≤ a quarter of the logged span (so every
                      correlation spans at least three quarters of training), in steps
                      (ties: the smallest |ℓ|); ℓ* > 0 means the L0 drop trails the schedule
                      s(t), ℓ* < 0 that it leads it; ``best_lag_at_bound`` says ℓ* hit the
                      limit (the true lag may be larger)

    control           r_t = the partial correlation of s and D given the step,
                      (r_sD − r_st·r_Dt) / √((1 − r_st²)(1 − r_Dt²)): how much of r(0)
                      is more than both curves moving with t (any monotone schedule
                      correlates with any falling L0, even a TopK run's unused s(t))

and the same for γ(t) against the normalized fall of the mean cross-layer |c_ij|
(``cos_mean``, logged on a sample of pairs). A constant s(t) or γ(t) (schedule ``const``,
γ warmup ``none`` or γ_max = 0) or a flat curve has no correlation: null, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esosae.config import TrainConfig
from esosae.errors import UserError
from esosae.run import layout
from esosae.sae.model import DualLayerSAE

SETTLE = 0.1
MU_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
MU_BINS = 24
CURVES = ("tau1", "tau2", "gamma", "schedule_progress", "l0_1", "l0_2", "fvu", "dead_1", "dead_2",
          "pinned_min_1", "pinned_max_1", "pinned_min_2", "pinned_max_2", "mu_mean_1", "mu_mean_2",
          "cos_mean", "cos_max")


class CurriculumError(UserError):
    """A run whose training log cannot be read; the message names the file."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The well-formed lines of ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    try:
        records = layout.read_metrics(path)
    except OSError as e:
        raise CurriculumError(f"cannot read {path} ({e.strerror or e}); is this a run directory?") from None
    if not records:
        raise CurriculumError(f"{path} has no logged steps; train the run first")
    return records


def curves(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Column arrays of the logged fields present in every record, plus total L0 and dead %."""
    out: dict[str, list[float]] = {"step": [r["step"] for r in records]}
    for key in CURVES:
        if all(key in r for r in records):
            out[key] = [float(r[key]) for r in records]
    out["l0"] = [float(r["l0_1"] + r.get("l0_2", 0.0)) for r in records]
    for i in (1, 2):
        if f"dead_{i}" in out:
            out[f"dead_pct_{i}"] = [100 * v for v in out[f"dead_{i}"]]
    return out


def regular_grid(steps: np.ndarray) -> np.ndarray:
    """Indices of the records on the regular logging grid (the last step may fall off it)."""
    if len(steps) < 2:
        return np.arange(len(steps))
    spacing = int(np.median(np.diff(steps)))
    return np.flatnonzero((steps - steps[0]) % spacing == 0)


def normalized_drop(y: np.ndarray) -> np.ndarray | None:
    """D(t) = (y(t_0) − y(t)) / (y(t_0) − y(t_end)); None for a curve that ends where it began."""
    total = y[0] - y[-1]
    return None if total == 0 else (y[0] - y) / total


def lagged_pearson(a: np.ndarray, b: np.ndarray, max_lag: int) -> dict[int, float]:
    """{ℓ: Pearson(a[t], b[t + ℓ])} for |ℓ| ≤ max_lag where both sides vary over the overlap."""
    n, out = len(a), {}
    for lag in range(-max_lag, max_lag + 1):
        x, y = a[max(0, -lag):n - max(0, lag)], b[max(0, lag):n - max(0, -lag)]
        if len(x) >= 3 and x.std() > 0 and y.std() > 0:
            out[lag] = float(np.corrcoef(x, y)[0, 1])
    return out


def alignment(steps: np.ndarray, driver: np.ndarray | None, response: np.ndarray | None,
              driver_name: str, response_name: str) -> dict[str, Any]:
    """r(0), ℓ* (in steps) and r(ℓ*) of ``driver`` against the normalized drop of ``response``."""
    empty = {"pearson": None, "best_lag_steps": None, "pearson_at_best_lag": None, "best_lag_at_bound": None,
             "pearson_given_step": None}
    if driver is None or response is None:
        return {**empty, "reason": f"the run logs no {driver_name if driver is None else response_name}"}
    grid = regular_grid(steps)
    steps, driver, response = steps[grid], driver[grid], response[grid]
    drop = normalized_drop(response)
    if drop is None:
        return {**empty, "reason": f"{response_name} ends where it began"}
    if driver.std() == 0:
        return {**empty, "reason": f"{driver_name} is constant"}
    max_lag = len(steps) // 4
    r = lagged_pearson(driver, drop, max_lag)
    if not r:
        return {**empty, "reason": "too few logged steps"}
    best = max(r, key=lambda lag: (r[lag], -abs(lag)))
    spacing = int(steps[1] - steps[0]) if len(steps) > 1 else 0
    return {"pearson": r.get(0), "best_lag_steps": best * spacing, "pearson_at_best_lag": r[best],
            "best_lag_at_bound": abs(best) == max_lag, "pearson_given_step": partial_given(driver, drop, steps)}


def partial_given(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> float | None:
    """Partial correlation of a and b given t (None when a or b is a linear function of t)."""
    r = np.corrcoef(np.stack([a, b, t.astype(float)]))
    den = (1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2)
    return float((r[0, 1] - r[0, 2] * r[1, 2]) / np.sqrt(den)) if den > 1e-12 else None


def settle_step(steps: np.ndarray, y: np.ndarray, tol: float = SETTLE) -> int:
    """The first logged step from which y stays within ``tol`` (relative) of its final value."""
    outside = np.abs(y - y[-1]) > tol * abs(y[-1])
    return int(steps[0] if not outside.any() else steps[min(np.flatnonzero(outside)[-1] + 1, len(steps) - 1)])


def mu_distribution(mu: np.ndarray, mu_min: float, mu_max: float) -> dict[str, Any]:
    """Quantiles, mean, pinned fractions and a log-spaced histogram of one layer's margins."""
    lo, hi = min(mu_min, float(mu.min())), max(mu_max, float(mu.max()))
    counts, edges = np.histogram(mu, bins=np.geomspace(lo, hi, MU_BINS + 1))
    return {"n": int(mu.size), "mean": float(mu.mean()),
            "quantiles": {f"q{round(100 * q)}": float(np.quantile(mu, q)) for q in MU_QUANTILES},
            "pinned_min": float((mu <= mu_min).mean()), "pinned_max": float((mu >= mu_max).mean()),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _pooled_dead(rec: dict[str, Any], widths: list[int]) -> float | None:
    """Dead % over all features of both layers, from the per-layer fractions of one record."""
    if not all(f"dead_{i + 1}" in rec for i in range(len(widths))):
        return None
    return 100 * sum(rec[f"dead_{i + 1}"] * w for i, w in enumerate(widths)) / sum(widths)


def curriculum_metrics(records: list[dict[str, Any]], sae: DualLayerSAE, cfg: TrainConfig) -> dict[str, Any]:
    """(eval_result_metrics, eval_result_details, curves) of curriculum.json."""
    c = curves(records)
    steps = np.array(c["step"])
    arr = {k: np.array(v) for k, v in c.items()}
    last = records[-1]
    progression = {"tau1_final": last.get("tau1"), "tau2_final": last.get("tau2"), "l0_final": c["l0"][-1],
                   "fvu_final": c["fvu"][-1] if "fvu" in c else None,
                   "dead_pct_final": _pooled_dead(last, [cfg.sae.m1, cfg.sae.m2][:sae.layers]),
                   "l0_settle_step": settle_step(steps, arr["l0"])}
    margins: dict[str, Any] = {"clamped": cfg.sae.clamp_margins, "margins": cfg.sae.margins,
                               "mu_min": cfg.sae.mu_min, "mu_max": cfg.sae.mu_max}
    details = []
    for i in range(1, sae.layers + 1):
        for key in (f"pinned_min_{i}", f"pinned_max_{i}"):
            margins[f"{key}_final"] = last.get(key)
        if cfg.sae.arch == "esosae":
            dist = mu_distribution(getattr(sae, f"mu{i}").numpy(), cfg.sae.mu_min, cfg.sae.mu_max)
            margins[f"mu_mean_{i}"], margins[f"mu_median_{i}"] = dist["mean"], dist["quantiles"]["q50"]
            details.append({"layer": i, **dist})
    align = {
        "l0": alignment(steps, arr.get("schedule_progress"), arr["l0"], "schedule_progress", "L0"),
        "cos": alignment(steps, arr.get("gamma") if sae.layers == 2 else None, arr.get("cos_mean"),
                         "gamma", "cos_mean"),
    }
    metrics = {"threshold_progression": progression, "margins": margins,
               "alignment": {f"{what}_{k}": v for what, a in (("l0_drop", align["l0"]), ("cos_fall", align["cos"]))
                             for k, v in a.items()}}
    return {"metrics": metrics, "details": details, "curves": c}
