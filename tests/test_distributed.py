"""Data parallelism: 2 CPU ranks with gloo under torchrun equal one process on the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esosae.cli import main
from esosae.run.checkpoint import checkpoint_path, latest_checkpoint

HERE = Path(__file__).resolve().parent
ARGS = ["--source", "synthetic", "--m1", "48", "--m2", "40", "--batch-size", "64", "--steps", "20",
        "--checkpoint-every", "10", "--keep-checkpoints", "5", "--log-every", "1", "--no-eval",
        "--device", "cpu", "--orth-block-fraction", "0.5", "--margin-every", "3", "--seed", "5"]

pytestmark = pytest.mark.slow  # every test here starts torchrun with two gloo ranks


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_close(a, b):
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), k


def test_two_gloo_ranks_match_one_process_and_resume_on_one(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(dump), *ARGS, "--out-dir", str(ddp_run)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*ARGS, "--out-dir", str(single_run)]) == 0

    # Both ranks hold identical weights, equal (to fp32 tolerance) to one process's.
    r0, r1 = torch.load(dump / "rank0.pt", weights_only=True), torch.load(dump / "rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert_close(r0, weights(latest_checkpoint(single_run)))
    assert_close(weights(latest_checkpoint(ddp_run)), weights(latest_checkpoint(single_run)))

    # Only rank 0 wrote: the same files as the single run, each metrics step logged once.
    def listing(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    assert listing(ddp_run) == listing(single_run)
    steps = [line for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "dump", "single"]

    # A checkpoint written by 2 ranks resumes on 1 process and ends where the single run did.
    checkpoint_path(ddp_run, 20).unlink()
    assert latest_checkpoint(ddp_run) == checkpoint_path(ddp_run, 10)
    assert main(["--resume", str(ddp_run)]) == 0
    assert_close(weights(latest_checkpoint(ddp_run)), weights(latest_checkpoint(single_run)))


def test_a_failing_rank_ends_every_rank_and_leaves_whole_checkpoints(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ESOSAE_FAIL_AT": "1:13"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path), *ARGS, "--out-dir", str(run)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 13" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010.pt"]
    assert main(["--resume", str(run)]) == 0  # the last whole checkpoint resumes


def test_global_batch_that_does_not_split_over_ranks_is_one_line(tmp_path):
    args = [a if a != "64" else "63" for a in ARGS]  # --batch-size 63 over 2 ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path), *args, "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("--batch-size 63 is the global batch and must divide by the 2 ranks") == 1
    assert not any((tmp_path / "ddp").glob("checkpoints/*"))
