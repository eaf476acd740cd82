"""Clamped adaptive margins (METHOD.md §5)."""

import math

import pytest
import torch

from esosae.config import SAEConfig
from esosae.sae.margins import effective_margins, freq_target, pinned_fractions, update_freq, update_margins


def cfg(**kw):
    kw.setdefault("margin_band", 5.0)
    return SAEConfig(m1=100, m2=0, target_l0=10, l1_coeff=0.1, arch="esosae", **kw)


def test_freq_ema():
    freq = torch.full((3,), 0.5)
    new = update_freq(freq, torch.tensor([0, 5, 10], dtype=torch.int32), 10, decay=0.9)
    assert torch.allclose(new, torch.tensor([0.45, 0.5, 0.55]))


def test_update_moves_only_outside_band():
    c = cfg(margin_lr=0.1, margin_band=5.0)
    target = freq_target(c, 100)
    assert target == pytest.approx(0.1)  # target_l0 / m
    freq = torch.full((100,), 0.1)
    freq[:4] = torch.tensor([1e-5, 0.05, 0.4, 0.9])  # too rare, in band, in band, too dense
    new = update_margins(torch.ones(100), freq, c, 1.0)
    assert new[0] < 1 and new[1] == 1 and new[2] == 1 and new[3] > 1 and (new[4:] == 1).all()
    expected0 = math.exp(0.1 * (math.log(1e-5 + c.freq_eps) - math.log(target)))
    assert new[0].item() == pytest.approx(expected0, rel=1e-5)
    assert freq_target(c, 4) == 1.0  # capped: a width below target_l0 cannot fire more than always


def test_clamp_and_ablations():
    freq = torch.full((100,), 0.1)
    freq[:2] = torch.tensor([0.0, 1.0])
    start = torch.ones(100)
    start[:2] = torch.tensor([0.3, 3.9])
    mu = start.clone()
    for _ in range(100):
        mu = update_margins(mu, freq, cfg(margin_lr=0.5), 1.0)
    assert mu[:2].tolist() == pytest.approx([0.25, 4.0]) and (mu[2:] == 1).all()
    assert pinned_fractions(mu, cfg()) == pytest.approx((0.01, 0.01))
    roam = start.clone()
    for _ in range(100):
        roam = update_margins(roam, freq, cfg(margin_lr=0.5, clamp_margins=False), 1.0)
    assert roam[0] < 0.25 and roam[1] > 4.0
    assert torch.equal(effective_margins(roam, cfg(clamp_margins=False)), roam)
    assert effective_margins(roam, cfg())[:2].tolist() == pytest.approx([0.25, 4.0])
    fixed = update_margins(start, freq, cfg(margins="fixed"), 1.0)
    assert torch.equal(fixed, start)
