"""Harvest throughput and cache read speed on the CPU: ``pytest bench/ --benchmark-only``.

- forward to the hook: one batch of 16 contexts × 128 tokens through SmolLM2 up to block 6
  (the bridge with ``stop_at_layer=7``), in text tokens/s;
- harvest: the whole pipeline (tokenize, forward, drop BOS, shuffle, write fp16 chunks,
  checksum) for 16k tokens into a fresh cache, in tokens/s (issue 4 target: ≥ 1,200 on 2 cores);
- cache read: ``ArraySource.batch`` of 1,024 rows from a memory-mapped fp16 cache of
  262,144 × 576 rows, against the trainer's consumption rate (one default training step at
  batch 1,024); issue 4 target: reading ≥ 20× faster than training consumes.
The targets are printed with the measurements, not asserted: timings on a shared machine
are for reading, not pass/fail. The embedded model comes from the user's cache
(``~/.cache/esosae``), dequantized there once if missing.
"""

import itertools
import time

import numpy as np
import pytest
import torch

from esosae.data import activations

from esosae.data import text as data

from esosae.data import models
from esosae.sae.backend import get_backend
from esosae.config import DataConfig, ModelConfig, TrainConfig
from esosae.data.sources import ArraySource
from esosae.training.loop import build, train_step

HOOK = "blocks.6.hook_out"


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model(ModelConfig())


@pytest.fixture(scope="module")
def contexts(smollm2):
    stream = data.contexts(data.parse_sources(DataConfig().dataset), smollm2.tokenizer, smollm2.bos_id, 128, 0)
    return next(iter(data.batches(stream, 16)))  # (16, 129)


def test_forward_to_hook(benchmark, report, smollm2, contexts):
    benchmark.pedantic(models.hook_activations, args=(smollm2, contexts, HOOK), rounds=5, warmup_rounds=1)
    report("text tokens/s", 16 * 128 / benchmark.stats.stats.median)


def test_harvest(benchmark, report, smollm2, tmp_path):
    cfg = TrainConfig(model=ModelConfig(cache_dir=str(tmp_path)),
                      data=DataConfig(harvest_tokens=14336, eval_tokens=2048))
    sources = data.parse_sources(cfg.data.dataset)
    run = lambda: activations.harvest([cfg], sources, smollm2, progress=False)  # noqa: E731
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    tps = 16384 / benchmark.stats.stats.median
    report("tokens/s", tps)
    report("target 1,200 tokens/s met", float(tps >= 1200), ".0f")


def test_cache_read_vs_trainer(benchmark, report, tmp_path):
    rows, d = 2 * activations.CHUNK_ROWS, 576
    rng = np.random.default_rng(0)
    chunks = []
    for i in range(2):
        arr = np.lib.format.open_memmap(tmp_path / f"train_{i:05d}.npy", mode="w+", dtype=np.float16,
                                        shape=(activations.CHUNK_ROWS, d))
        arr[:] = rng.standard_normal((activations.CHUNK_ROWS, d), dtype=np.float32)
        arr.flush()
        chunks.append(np.load(tmp_path / f"train_{i:05d}.npy", mmap_mode="r"))
    heldout = torch.zeros(16, d, dtype=torch.float16)
    source = ArraySource(activations.ChunkedRows(chunks, torch.float16), heldout, scale=1.0)
    steps = itertools.count()
    benchmark.pedantic(lambda: source.batch(next(steps), 1024), rounds=50, warmup_rounds=2)
    read = 1024 / benchmark.stats.stats.median

    cfg = TrainConfig(device="cpu", backend="torch")
    device = torch.device("cpu")
    model, opt = build(cfg, source, device)
    ops = get_backend(cfg.backend, device)
    times = []
    for step in range(4):
        x = source.batch(step, cfg.batch_size).to(device) * model.scale
        t0 = time.perf_counter()
        train_step(model, opt, ops, x, cfg, step + cfg.steps // 2)  # mid-run: γ > 0, penalty on
        times.append(time.perf_counter() - t0)
    train = cfg.batch_size / float(np.median(times[1:]))
    report(f"cache read rows/s ({rows:,} rows, fp16, memory-mapped)", read)
    report(f"trainer tokens/s (m1={cfg.sae.m1}, m2={cfg.sae.m2}, B={cfg.batch_size})", train)
    report("read / train (target >= 20)", read / train, ".1f")
