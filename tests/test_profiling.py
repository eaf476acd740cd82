"""Profiling modes run on a CPU machine; telemetry fields land in metrics.jsonl."""

import json

import torch

from esosae.sae.backend import TORCH
from esosae.cli import main
from esosae.config import DataConfig, SAEConfig, TrainConfig
from esosae.training.profiling import Ranges, StepTimer, dense_flops_per_token

TINY = ["--source", "synthetic", "--m1", "32", "--m2", "32", "--batch-size", "64", "--steps", "6",
        "--log-every", "2", "--no-eval"]


def test_profile_torch_writes_a_chrome_trace(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--profile", "torch", "--out-dir", str(run)]) == 0
    trace = json.loads((run / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::" in n for n in names)


def test_profile_nvtx_runs_on_cpu_and_logs_the_step_split(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--profile", "nvtx", "--out-dir", str(run)]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for phase in ("data", "forward", "backward", "optimizer"):
        assert last[f"time_{phase}_ms"] > 0
    assert last["gflop_per_s"] > 0 and "mfu" not in last  # MFU only against a measured CUDA peak


def test_ranges_wrap_the_backend_only_when_enabled():
    assert Ranges(False).wrap_backend(TORCH) is TORCH
    wrapped = Ranges(True).wrap_backend(TORCH)
    x, W, b = torch.randn(4, 3), torch.randn(3, 5), torch.zeros(5)
    got, want = wrapped.encode(x, W, b, torch.zeros(3), b), TORCH.encode(x, W, b, torch.zeros(3), b)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_timer_measures_only_when_asked():
    timer = StepTimer(torch.device("cpu"))
    timer.start(measuring=False)
    timer.mark("forward")
    assert timer.phases == {}
    timer.start(measuring=True)
    timer.mark("forward")
    assert set(timer.phases) == {"forward"}


def test_flops_per_token_formula():
    cfg = TrainConfig(data=DataConfig(source="synthetic"), sae=SAEConfig(m1=100, m2=50, orth_block_fraction=0.5),
                      batch_size=10)
    assert dense_flops_per_token(cfg, 8) == 12 * 8 * 150 + 6 * 100 * 50 * 8 * 0.5 / 10
