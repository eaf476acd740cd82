"""Sparse probing on a synthetic source: is planted atom j active in a sample?

A synthetic run has no texts and no language model, so its probing tasks are the planted
dictionary's own ground truth: for each of the first ``planted_atoms`` atoms that are
active in at most half of the samples (a power-law source's first atom is in every
sample, which leaves no negatives), one balanced
binary task whose positives are samples where the atom is active. Each sample is one
"text" of one token (nothing to pool). The ``llm`` rows probe the raw input dimensions of
x, the ``sae`` rows the SAE's features [f1, f2]; everything else is probing.py's method.
Train and test samples come from their own generator streams, disjoint from training
batches and from the held-out set.

An SAE whose feature isolates atom j gets a top-1 accuracy near 1. An untrained SAE's
features are random projections: its best one is the random direction most aligned with
the atom, |cos| ≈ sqrt(2 ln m / d), against the spread that the other ≈ L0 active atoms
add, ≈ sqrt(L0 / d) · rms magnitude, so its top-1 accuracy is ≈ Φ(½ · sqrt(2 ln m / L0))
above chance — near 0.5 when L0 is large against 2 ln m, however large d is.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from esosae.data.sources import SyntheticSource
from esosae.evals.config import EvalConfig
from esosae.evals.probing import probe_task, sae_features
from esosae.evals.tasks import Task
from esosae.sae.model import DualLayerSAE

TRAIN_STREAM, TEST_STREAM = -10, -11
MAX_SAMPLES = 200_000


def _draw(atom_active: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced indices: the first ``half`` (at most) samples with the atom and as many without."""
    pos, neg = np.flatnonzero(atom_active), np.flatnonzero(~atom_active)
    n = min(half, len(pos), len(neg))
    return np.concatenate([pos[:n], neg[:n]]), np.repeat([1, 0], n)


@torch.no_grad()
def planted_probing(sae: DualLayerSAE, source: SyntheticSource, cfg: EvalConfig) -> dict[str, dict[str, dict]]:
    """{"planted_atoms": {"atom_j": llm and sae metrics}} for the first ``planted_atoms`` atoms
    that fire on at most half of the samples."""
    probed = torch.nonzero((source.freqs > 0) & (source.freqs <= 0.5)).flatten()[:cfg.planted_atoms].tolist()
    rarest = float(source.freqs[probed].min())
    half_train, half_test = cfg.train_size // 2, cfg.test_size // 2
    n = [min(MAX_SAMPLES, math.ceil(2 * half / rarest)) for half in (half_train, half_test)]
    x_train, codes_train = source.sample(n[0], TRAIN_STREAM)  # (n_train, d), (n_train, n_atoms)
    x_test, codes_test = source.sample(n[1], TEST_STREAM)
    x = torch.cat([x_train, x_test])  # (n_train + n_test, d): test rows follow the train rows
    device = next(sae.parameters()).device
    F = torch.cat([sae_features(sae, x[i:i + cfg.sae_batch].to(device)).cpu()
                   for i in range(0, len(x), cfg.sae_batch)]).numpy()  # (N, m1 + m2)
    X = x.numpy()
    results = {}
    for j in probed:
        train, train_y = _draw((codes_train[:, j] > 0).numpy(), half_train)
        test, test_y = _draw((codes_test[:, j] > 0).numpy(), half_test)
        task = Task(f"atom_{j}", train, train_y, test + n[0], test_y)
        results[task.name] = {"n_train": len(train), "n_test": len(test), **probe_task(X, task, cfg, "llm"),
                              **probe_task(F, task, cfg, "sae")}
    return {"planted_atoms": results}
