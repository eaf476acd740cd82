"""The trainer end to end on the synthetic source: run directory, logs, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esosae.cli import main
from esosae.run.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--source", "synthetic", "--m1", "32", "--m2", "32", "--batch-size", "128", "--no-eval"]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run):
    ckpt = torch.load(latest_checkpoint(run), weights_only=True)
    return ckpt["step"], ckpt["model"]


@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_run_layout_and_tau_schedule(tmp_path, schedule, capsys):
    run = tmp_path / "run"
    rc = main(["--schedule", schedule, *TINY, "--steps", "60", "--log-every", "1", "--out-dir", str(run)])
    assert rc == 0
    for name in ("config.json", "metrics.jsonl", "sae/sae.safetensors", "sae/cfg.json", "summary.md"):
        assert (run / name).is_file(), name
    assert latest_checkpoint(run).name == "step_00000060.pt"
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(60))
    tau = [r["tau1"] for r in recs[:47]]  # T = 0.8 · 60 = 48 steps of schedule
    if schedule == "exp":
        ratios = [b / a for a, b in zip(tau, tau[1:])]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-9) and ratios[0] > 1
    else:
        diffs = [b - a for a, b in zip(tau, tau[1:])]
        assert max(diffs) == pytest.approx(min(diffs), rel=1e-6) and diffs[0] > 0
    keys = {"step", "tau1", "tau2", "gamma", "lambda1", "mse", "l1", "orth", "fvu", "l0_1", "l0_2", "dead_1",
            "pinned_min_1", "pinned_max_1", "cos_max", "cos_mean", "tokens_per_s", "path_1", "path_2"}
    assert keys <= recs[-1].keys()
    assert {r["path_1"] for r in recs} <= {"dense", "pairs"}  # which path each layer's step took
    assert "atom_recovery" in (run / "summary.md").read_text()
    assert str(run) in capsys.readouterr().out


def test_same_seed_same_weights(tmp_path):
    for name in ("a", "b"):
        assert main([*TINY, "--steps", "25", "--out-dir", str(tmp_path / name)]) == 0
    (_, wa), (_, wb) = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow  # a Ctrl-C delivered to a training subprocess
def test_sigint_then_resume_matches_uninterrupted_run(tmp_path):
    args = [*TINY, "--steps", "200", "--log-every", "1", "--checkpoint-every", "1000", "--seed", "3"]
    assert main([*args, "--out-dir", str(tmp_path / "full")]) == 0
    run = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--out-dir", str(run)],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    step_cut, _ = final_weights(run)
    assert 20 <= step_cut < 200  # stopped mid-run, checkpoint written on the way out
    assert main(["--resume", str(run)]) == 0
    (s1, w1), (s2, w2) = final_weights(tmp_path / "full"), final_weights(run)
    assert s1 == s2 == 200
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [r["step"] for r in read_metrics(run)] == list(range(200))
    assert torch.equal(load_file(run / "sae/sae.safetensors")["W_dec1"],
                       load_file(tmp_path / "full/sae/sae.safetensors")["W_dec1"])


@pytest.mark.parametrize("argv, words", [
    (["--schedule", "bogus"], "bogus"),
    (["--m1", "-4"], "m1"),
    (["--tau-0", "0.5", "--tau-final", "0.1"], "tau_0"),
    (["--config", "MISSING.json"], "cannot read config"),
    (["--config", "BAD.json"], "not valid JSON"),
    (["--resume", "NOWHERE"], "config.json"),
    (["--dtype", "bf16", "--device", "cpu", "--backend", "torch"], "--dtype fp32"),
    (["--dtype", "fp8"], "dtype"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, argv, words, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD.json").write_text("{oops")
    before = set(tmp_path.rglob("*"))
    assert main([*TINY, *argv, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert set(tmp_path.rglob("*")) == before


def test_nonempty_out_dir_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    assert main([*TINY, "--steps", "2", "--out-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]
    assert main([*TINY, "--steps", "2", "--out_dir", str(run), "--overwrite"]) == 0
    assert not (run / "keep.txt").exists()


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "4", "--out-dir", str(run)]) == 0
    latest_checkpoint(run).write_bytes(b"truncated")
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step_00000004.pt" in err and "corrupt" in err



def test_run_ends_with_its_evaluations(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = [a for a in TINY if a != "--no-eval"]
    assert main([*tiny, "--steps", "30", "--log-every", "2", "--out-dir", str(run)]) == 0
    for name in ("eval/core.json", "eval/sparse_probing.json", "eval/curriculum.json",
                 "plots/curriculum.png", "plots/sparse_probing.png"):
        assert (run / name).is_file(), name
    core = json.loads((run / "eval/core.json").read_text())["eval_result_metrics"]
    summary = (run / "summary.md").read_text()
    assert f"| fvu | {core['reconstruction_quality']['fvu']:.4g} |" in summary
