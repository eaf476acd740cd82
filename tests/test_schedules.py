"""Schedules are pure functions of the step (METHOD.md §4)."""

import math

import pytest

from esosae.sae import schedules
from esosae.config import ScheduleConfig, TrainConfig

TOTAL = 1000


def taus(cfg, tau_final=0.2):
    return [schedules.tau(t, TOTAL, cfg, tau_final) for t in range(TOTAL)]


def test_exp_is_geometric_then_flat():
    cfg = ScheduleConfig(schedule="exp", tau_0=1e-3, tau_final=0.2, schedule_fraction=0.8)
    tau = taus(cfg)
    ratios = [tau[t + 1] / tau[t] for t in range(799)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    assert ratios[0] == pytest.approx((0.2 / 1e-3) ** (1 / 800), rel=1e-9)
    assert tau[0] == pytest.approx(1e-3) and tau[800] == pytest.approx(0.2) and tau[-1] == pytest.approx(0.2)


def test_linear_has_constant_differences():
    cfg = ScheduleConfig(schedule="linear", tau_0=1e-3, tau_final=0.2, schedule_fraction=0.5)
    tau = taus(cfg)
    diffs = [tau[t + 1] - tau[t] for t in range(499)]
    assert max(diffs) == pytest.approx(min(diffs), rel=1e-6)
    assert tau[500] == pytest.approx(0.2) and tau[999] == pytest.approx(0.2)


def test_const_and_progress():
    const = ScheduleConfig(schedule="const", tau_final=0.2)
    assert set(taus(const)) == {0.2}
    assert schedules.schedule_progress(0, TOTAL, const) == 1.0
    exp = ScheduleConfig(schedule="exp", tau_final=0.2)
    s = [schedules.schedule_progress(t, TOTAL, exp) for t in range(TOTAL)]
    assert s[0] == 0.0 and s[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(s, s[1:]))
    # exp: slow then fast — at half the schedule it has travelled far less than half.
    assert s[400] < 0.2


@pytest.mark.parametrize("warmup, at_zero, at_half", [("synced", 0.0, None), ("linear", 0.0, 0.625), ("none", 2.0, 2.0)])
def test_gamma_warmups(warmup, at_zero, at_half):
    cfg = ScheduleConfig(schedule="exp", tau_final=0.2, gamma_warmup=warmup)
    assert schedules.gamma(0, TOTAL, cfg, 2.0) == pytest.approx(at_zero)
    half = schedules.gamma(500, TOTAL, cfg, 2.0)
    if warmup == "synced":
        assert half == pytest.approx(2.0 * schedules.schedule_progress(500, TOTAL, cfg))
    else:
        assert half == pytest.approx(at_half * (1.0 if warmup == "none" else 2.0))
    assert schedules.gamma(TOTAL - 1, TOTAL, cfg, 2.0) == pytest.approx(2.0)


def test_l1_warmup_and_lr():
    cfg = ScheduleConfig(tau_final=0.2, l1_warmup_fraction=0.1)
    assert schedules.l1_weight(0, TOTAL, cfg, 3.0) == 0.0
    assert schedules.l1_weight(50, TOTAL, cfg, 3.0) == pytest.approx(1.5)
    assert schedules.l1_weight(900, TOTAL, cfg, 3.0) == 3.0
    train = TrainConfig(steps=TOTAL, lr=1e-3, lr_warmup_fraction=0.1, lr_decay_fraction=0.2)
    lrs = [schedules.lr(t, train) for t in range(TOTAL)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert lrs[500] == 1e-3 and lrs[-1] == pytest.approx(1e-3 / 200)
    assert all(math.isfinite(v) and v > 0 for v in lrs)
