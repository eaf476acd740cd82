"""Sparse probing of one SAE once the model's activations are cached:
``pytest bench/test_probing.py --benchmark-only``.

Times ``esosae.evals.probing.lm_probing`` over every default probing dataset (all the
files in the data dir's probing/ folder, 1,000 train / 400 test texts per task, context
128) for one SAE on SmolLM2-135M at ``blocks.6.hook_out``: checking each dataset's cached
activations (sha256), encoding every cached token with the SAE and mean-pooling per text,
and fitting the SAE's probes (full width and k = 1, 2, 5, 10, 20, 50) for every task. The
``llm`` probes are read from the cache, as for any SAE after the first. Issue 5 target:
≤ 5 minutes on 2 CPU cores.

SAEs: the default run's size (m1 = m2 = 1,152) and twice that (m1 = m2 = 2,304), each
constructed, not trained: decoder rows random and unit-norm, tied encoder, b_dec the mean
activation, and every feature's threshold θ_j set to the (1 − L0/m) quantile of its
pre-activation on cached probing tokens (layer 2's on the residual layer 1 leaves), so each
layer fires L0 = 16 features per token, the default target. Encoding cost depends on the
sparsity, not on what the features mean; the probe fits depend on both, so the fit times
of a trained SAE differ somewhat.

The first run caches the model's activations on the probing texts (about 1.4M tokens
through 7 blocks; reported, not timed by the benchmark) under ``~/.cache/esosae/probing/``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from esosae.data import models
from esosae.config import ModelConfig, SAEConfig
from esosae.evals import probe_cache, probing, tasks
from esosae.evals.config import EvalConfig
from esosae.sae.model import DualLayerSAE

HOOK = "blocks.6.hook_out"
L0_PER_LAYER = 16
CAL_TOKENS = 4096  # torch.quantile takes at most 2^24 elements: 4,096 x 2,304 fits
TARGET_S = 300.0


@pytest.fixture(scope="module")
def cached():
    """Every default dataset built and its activations cached (harvested on the first run)."""
    cfg = EvalConfig()
    root = models.cache_root(None)
    model: list[models.LoadedModel] = []

    def get_model() -> models.LoadedModel:
        if not model:
            model.append(models.load_model(ModelConfig()))
        return model[0]

    t0 = time.perf_counter()
    datasets = [tasks.build(tasks.resolve(n), cfg.train_size, cfg.test_size, cfg.seed) for n in cfg.datasets]
    acts = []
    for ds in datasets:
        wanted = probe_cache.settings(ds, ModelConfig().model, HOOK, cfg.context_size,
                                      (cfg.train_size, cfg.test_size), cfg.seed)
        acts.append(probe_cache.ensure(ds, wanted, root, get_model, HOOK, cfg.llm_batch_tokens))
        probing.llm_results(acts[-1], ds, cfg)  # the llm probes, computed once
    return cfg, datasets, acts, time.perf_counter() - t0


@torch.no_grad()
def calibrated_sae(m: int, rows: torch.Tensor) -> DualLayerSAE:
    """A default-shaped E-SOSAE whose thresholds make each layer fire L0_PER_LAYER per token on ``rows``."""
    cfg = SAEConfig(m1=m, m2=m, k=L0_PER_LAYER, target_l0=L0_PER_LAYER, l1_coeff=0.5)
    sae = DualLayerSAE(cfg, rows.shape[1])
    sae.init_weights(torch.Generator().manual_seed(0), rows)
    quantile = 1 - L0_PER_LAYER / m
    a1 = (rows - sae.b_dec) @ sae.W_enc1 + sae.b_enc1  # (n, m)
    sae.theta1.copy_(torch.quantile(a1, quantile, dim=0).clamp_min(0))
    r = rows - (a1 * (a1 > sae.theta1)) @ sae.W_dec1 - sae.b_dec  # (n, d): what layer 1 leaves
    a2 = r @ sae.W_enc2 + sae.b_enc2
    sae.theta2.copy_(torch.quantile(a2, quantile, dim=0).clamp_min(0))
    return sae


@pytest.mark.parametrize("m", [1152, 2304], ids=["m1152x2", "m2304x2"])
def test_probing_one_sae(benchmark, report, machine_info, cached, m):
    cfg, datasets, acts, cache_s = cached
    sample = np.random.default_rng(0).choice(len(acts[0].rows), CAL_TOKENS, replace=False)
    sae = calibrated_sae(m, torch.from_numpy(acts[0].rows[np.sort(sample)].astype(np.float32)))
    no_model = lambda: pytest.fail("the activations should be cached")  # noqa: E731

    def run():
        return probing.lm_probing(sae, datasets, ModelConfig().model, HOOK, models.cache_root(None), no_model,
                                  cfg, progress=False)

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    n_tokens = sum(int(a.offsets[-1]) for a in acts)
    n_tasks = sum(len(r) for r in results.values())
    t0 = time.perf_counter()
    probing.pooled_sae_features(sae, acts[0], cfg.sae_batch)  # the encoding alone, on the first dataset
    encode_tok_s = int(acts[0].offsets[-1]) / (time.perf_counter() - t0)
    l0 = probing.sae_features(sae, torch.from_numpy(acts[0].rows[:2048].astype(np.float32))).gt(0).sum(1).float().mean()
    benchmark.extra_info.update(machine_info)
    report("seconds per SAE", seconds, ",.1f")
    report("target seconds", TARGET_S, ",.0f")
    report("cached tokens", n_tokens)
    report("SAE encode + pool tokens/s", encode_tok_s)
    report("of which encoding seconds (estimated)", n_tokens / encode_tok_s, ",.1f")
    report("tasks", n_tasks)
    report("L0 of the SAE (both layers)", l0.item(), ",.1f")
    report("datasets built and caches checked (or harvested) in seconds", cache_s, ",.0f")
    assert n_tasks == 24 and all(0 <= t["sae_top_1_test_accuracy"] <= 1 for r in results.values() for t in r.values())
