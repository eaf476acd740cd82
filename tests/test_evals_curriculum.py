"""Curriculum metrics (esosae/evals/curriculum.py) on synthetic training logs with known answers."""

import json

import numpy as np
import pytest
import torch

from esosae.config import DataConfig, TrainConfig
from esosae.evals import curriculum
from esosae.sae.model import DualLayerSAE

LOG_EVERY = 10


def s_curve(t: np.ndarray, steps: int) -> np.ndarray:
    """A non-affine ramp from 0 to 1 (the shape of an exp schedule's s(t)), 0 before t = 0."""
    p = np.clip(t / (0.8 * steps), 0, 1)
    return (20.0 ** p - 1) / 19


def write_log(path, steps: int, lag: int, gamma_constant: bool = False, l0_flat: bool = False) -> list[dict]:
    """metrics.jsonl where L0 falls exactly as s(t − lag) and mean |c| falls exactly as γ(t − 2·lag)."""
    t = np.arange(LOG_EVERY - 1, steps, LOG_EVERY)  # logged steps, as the trainer logs them
    s = s_curve(t, steps)
    l0 = np.full_like(t, 50.0, dtype=float) if l0_flat else 120 - 100 * s_curve(t - lag, steps)
    gamma = np.ones_like(s) if gamma_constant else s
    cos = 0.3 - 0.2 * s_curve(t - 2 * lag, steps)
    records = [{"step": int(ti), "tau1": 1e-3 + si, "tau2": 1e-3 + si, "gamma": float(gi),
                "schedule_progress": float(si),
                "l0_1": float(li) / 2, "l0_2": float(li) / 2, "fvu": 0.1, "dead_1": 0.0, "dead_2": 0.25,
                "pinned_min_1": 0.0, "pinned_max_1": 0.1, "pinned_min_2": 0.0, "pinned_max_2": 0.0,
                "mu_mean_1": 1.0, "mu_mean_2": 1.0, "cos_mean": float(ci), "cos_max": 0.9}
               for ti, si, gi, li, ci in zip(t, s, gamma, l0, cos)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 99')  # plus a torn line
    return records


def sae_with_margins(cfg: TrainConfig, mu1: torch.Tensor, mu2: torch.Tensor) -> DualLayerSAE:
    sae = DualLayerSAE(cfg.sae, 8)
    sae.mu1.copy_(mu1)
    sae.mu2.copy_(mu2)
    return sae


def unit_margins(cfg: TrainConfig) -> DualLayerSAE:
    return sae_with_margins(cfg, torch.ones(cfg.sae.m1), torch.ones(cfg.sae.m2))


@pytest.fixture
def cfg():
    return TrainConfig(data=DataConfig(source="synthetic"), steps=1000, log_every=LOG_EVERY)


@pytest.mark.parametrize("lag", [0, 50, 120])  # the search reaches ±250 steps (a quarter of 100 logs)
def test_known_lag_is_found_with_correlation_one(tmp_path, cfg, lag):
    write_log(tmp_path / "metrics.jsonl", cfg.steps, lag)
    records = curriculum.read_metrics(tmp_path / "metrics.jsonl")
    m = curriculum.curriculum_metrics(records, unit_margins(cfg), cfg)
    a = m["metrics"]["alignment"]
    assert a["l0_drop_best_lag_steps"] == lag
    assert a["l0_drop_pearson_at_best_lag"] == pytest.approx(1.0, abs=1e-12)
    assert a["cos_fall_best_lag_steps"] == 2 * lag
    assert a["cos_fall_pearson_at_best_lag"] == pytest.approx(1.0, abs=1e-12)
    assert not a["l0_drop_best_lag_at_bound"] and not a["cos_fall_best_lag_at_bound"]
    if lag:
        assert a["l0_drop_pearson"] < a["l0_drop_pearson_at_best_lag"] - 1e-3


def test_normalized_drop_runs_from_zero_to_one():
    y = np.array([100.0, 90, 40, 10, 20])  # overshoots below its final value
    np.testing.assert_allclose(curriculum.normalized_drop(y), [0, 0.125, 0.75, 1.125, 1.0])
    assert curriculum.normalized_drop(np.array([3.0, 1.0, 3.0])) is None


def test_constant_drivers_and_flat_curves_give_null_with_a_reason(tmp_path, cfg):
    write_log(tmp_path / "metrics.jsonl", cfg.steps, 30, gamma_constant=True, l0_flat=True)
    records = curriculum.read_metrics(tmp_path / "metrics.jsonl")
    m = curriculum.curriculum_metrics(records, unit_margins(cfg), cfg)
    a = m["metrics"]["alignment"]
    assert a["l0_drop_pearson"] is None and "ends where it began" in a["l0_drop_reason"]
    assert a["cos_fall_pearson"] is None and "gamma is constant" in a["cos_fall_reason"]


def test_progression_and_margins(tmp_path, cfg):
    records = write_log(tmp_path / "metrics.jsonl", cfg.steps, 0)
    mu1 = torch.tensor([0.25, 0.25, 1.0, 4.0] * (cfg.sae.m1 // 4))
    mu2 = torch.tensor([0.5, 1.0, 2.0, 4.0] * (cfg.sae.m2 // 4))
    m = curriculum.curriculum_metrics(curriculum.read_metrics(tmp_path / "metrics.jsonl"),
                                      sae_with_margins(cfg, mu1, mu2), cfg)
    prog, margins, (d1, d2) = m["metrics"]["threshold_progression"], m["metrics"]["margins"], m["details"]
    assert len(m["curves"]["step"]) == len(records)  # the torn last line is skipped
    assert prog["l0_final"] == pytest.approx(records[-1]["l0_1"] + records[-1]["l0_2"])
    assert prog["dead_pct_final"] == pytest.approx(12.5)  # 0% and 25% of equal widths
    s = np.array(m["curves"]["schedule_progress"])
    settle = prog["l0_settle_step"]  # L0 = 120 − 100 s: within 10% of 20 once s ≥ 0.98
    assert s[m["curves"]["step"].index(settle)] >= 0.98 > s[m["curves"]["step"].index(settle) - 1]
    assert margins["pinned_max_1_final"] == records[-1]["pinned_max_1"]
    assert (d1["pinned_min"], d1["pinned_max"], d2["pinned_min"], d2["pinned_max"]) == (0.5, 0.25, 0.0, 0.25)
    assert d1["quantiles"]["q50"] == pytest.approx(0.625) and sum(d1["histogram"]["counts"]) == cfg.sae.m1


def test_empty_or_missing_log_is_a_one_line_error(tmp_path):
    with pytest.raises(curriculum.CurriculumError, match="cannot read"):
        curriculum.read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(curriculum.CurriculumError, match="no logged steps"):
        curriculum.read_metrics(tmp_path / "metrics.jsonl")


def test_constant_progress_has_no_correlation():
    """The const schedule logs s(t) = 1 throughout: Pearson is undefined, not 0."""
    steps = np.arange(9, 200, 10)
    a = curriculum.alignment(steps, np.ones(len(steps)), 100 - steps / 10.0, "schedule_progress", "L0")
    assert a["pearson"] is None and a["reason"] == "schedule_progress is constant"


def test_a_lag_beyond_the_search_is_flagged(tmp_path, cfg):
    write_log(tmp_path / "metrics.jsonl", cfg.steps, 400)
    m = curriculum.curriculum_metrics(curriculum.read_metrics(tmp_path / "metrics.jsonl"), unit_margins(cfg), cfg)
    a = m["metrics"]["alignment"]
    assert a["l0_drop_best_lag_steps"] == 250 and a["l0_drop_best_lag_at_bound"]
