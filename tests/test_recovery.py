"""Planted-dictionary recovery (the foundation issue's bars), at the settings the README quotes:
2,000 steps of batch 1,024, recovery = planted atoms whose best decoder cosine is ≥ 0.9."""

import pytest
import torch

from esosae.config import DataConfig, SAEConfig, TrainConfig
from esosae.data.sources import SyntheticSource, atom_recovery, spec_from_config
from esosae.training.loop import build, train_step


def train(cfg: TrainConfig, steps: int):
    source = SyntheticSource(spec_from_config(cfg.data), seed=cfg.data.data_seed)
    model, opt = build(cfg, source, torch.device("cpu"))
    from esosae.sae.backend import TORCH

    for step in range(steps):
        train_step(model, opt, TORCH, source.batch(step, cfg.batch_size) * model.scale, cfg, step)
    return model, source


@pytest.mark.slow
@pytest.mark.parametrize("preset, arch", [("easy", "esosae"), ("hard", "topk")])
def test_planted_atoms_recovered(preset, arch):
    cfg = TrainConfig(data=DataConfig(source="synthetic", synthetic=preset), sae=SAEConfig(arch=arch),
                      steps=2000, batch_size=1024)
    untrained, source = train(cfg, 0)
    assert atom_recovery([untrained.W_dec1, untrained.W_dec2], source.atoms)[0] < 0.2
    model, _ = train(cfg, cfg.steps)
    recovered, best = atom_recovery([model.W_dec1, model.W_dec2], source.atoms)
    assert recovered >= 0.9, f"{preset}/{arch}: {recovered:.3f} of atoms at cos ≥ 0.9 (median best {best.median():.3f})"
