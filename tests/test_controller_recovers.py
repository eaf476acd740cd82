"""The v2 margin controller (today's default; presets/esosae-v2-controller.json) recovers
from the curriculum's dense start: at the end of a short run, μ's histogram over [μ_min, μ_max] has one mode on every source (v1's ended bimodal on
the hard source, 56% at μ_min and 32% at μ_max, and 100% at μ_max on the easy one)."""

import pytest
import torch

from esosae.config import RECOVERING_CONTROLLER, TrainConfig
from esosae.training.loop import run

BINS = 8
FLOOR = 0.05
"""Bins holding less than this share of the features count as empty when finding modes."""


def modes(mu: torch.Tensor, lo: float, hi: float) -> int:
    """Runs of consecutive bins that are local maxima of the histogram (bins under FLOOR zeroed)."""
    h = torch.histc(mu.float(), BINS, lo, hi) / mu.numel()
    h = torch.where(h < FLOOR, torch.zeros_like(h), h).tolist()
    padded = [0.0, *h, 0.0]
    peaks, i = 0, 1
    while i <= BINS:
        j = i
        while j < BINS and padded[j + 1] == padded[i]:
            j += 1  # a plateau counts once
        if padded[i] > 0 and padded[i] > padded[i - 1] and padded[i] > padded[j + 1]:
            peaks += 1
        i = j + 1
    return peaks


def test_modes_counts_peaks():
    assert modes(torch.tensor([0.3] * 50 + [3.9] * 46 + [2.0] * 4), 0.25, 4.0) == 2  # a 4% bin is below FLOOR
    assert modes(torch.tensor([0.3] * 50 + [3.9] * 40 + [2.0] * 10), 0.25, 4.0) == 3
    assert modes(torch.tensor([1.0] * 60 + [1.5] * 30 + [2.0] * 10), 0.25, 4.0) == 1


SOURCES = {
    "easy": {"data": {"source": "synthetic", "synthetic": "easy"}, "sae": {"m1": 128}, "steps": 300,
             "batch_size": 256},
    "hard": {"data": {"source": "synthetic", "synthetic": "hard"}, "sae": {"m1": 256}, "steps": 300,
             "batch_size": 256},
    "lm": {"data": {"harvest_tokens": 16_384, "eval_tokens": 2_048}, "sae": {"m1": 128, "target_l0": 4.0},
           "steps": 150, "batch_size": 256},
}


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_margins_end_unimodal(source, tmp_path):
    spec = SOURCES[source]
    cfg = TrainConfig.from_dict({**spec, "sae": {**spec["sae"], **RECOVERING_CONTROLLER}, "eval": False,
                                 "log_every": 50})
    model = run(cfg, tmp_path / "run", progress=False).model
    for mu in (model.mu1, model.mu2):
        assert modes(mu, cfg.sae.mu_min, cfg.sae.mu_max) == 1, torch.histc(mu, BINS, cfg.sae.mu_min, cfg.sae.mu_max)
