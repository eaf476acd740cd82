"""Several hooks in one pass (esosae/training/hooks.py): one SAE per hook on shared forwards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_helpers import TINY, register_tiny, tiny_run, write_txt

from esosae import cli
from esosae.config import DataConfig, ModelConfig, TrainConfig
from esosae.data import activations, stream
from esosae.run.checkpoint import latest_checkpoint
from esosae.training import loop

HOOKS = "blocks.0.hook_out,blocks.2.hook_out"


@pytest.fixture
def env(tmp_path, monkeypatch):
    return tmp_path, tiny_run(tmp_path, monkeypatch, "--out-dir", str(tmp_path / "run"), "--harvest-tokens", "400",
                              "--buffer-tokens", "1024", "--steps", "6")


def forwards(monkeypatch, module) -> list[tuple[str, ...]]:
    """The hooks of each language-model forward ``module`` runs."""
    real, calls = module.hooks_activations, []

    def forward(model, tokens, hooks):
        calls.append(tuple(hooks))
        return real(model, tokens, hooks)

    monkeypatch.setattr(module, "hooks_activations", forward)
    return calls


@pytest.mark.parametrize("mode, module", [("cache", activations), ("stream", stream)])
def test_one_sae_per_hook_from_shared_forwards(env, monkeypatch, capsys, mode, module):
    tmp_path, base = env
    calls = forwards(monkeypatch, module)
    assert cli.main(base + ["--hook", HOOKS, "--activations", mode]) == 0
    assert calls and all(c == tuple(HOOKS.split(",")) for c in calls)  # every forward serves both hooks
    out = capsys.readouterr().out
    for hook in HOOKS.split(","):
        run = tmp_path / "run" / hook
        assert json.loads((run / "config.json").read_text())["model"]["hook"] == hook
        assert (run / "sae" / "sae.safetensors").is_file() and (run / "summary.md").is_file()
        assert f"run directory: {run}" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["hook"] == HOOKS
    assert (tmp_path / "cache" / "activations").exists() == (mode == "cache")


def test_shared_harvest_equals_each_hook_alone(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    text = write_txt(tmp_path / "text.txt", 150)

    def cfg(hook, cache):
        return TrainConfig(model=ModelConfig(model=TINY, hook=hook, cache_dir=str(tmp_path / cache)),
                           data=DataConfig(dataset=str(text), context_size=16, harvest_tokens=400,
                                           eval_tokens=100, harvest_batch=8))

    shallow, _ = activations.ensure_caches([cfg(h, "both") for h in HOOKS.split(",")], progress=False)
    alone = activations.ensure_cache(cfg("blocks.0.hook_out", "alone"), progress=False)  # a forward stopped at block 1
    rows = np.arange(len(alone.train))
    assert torch.equal(shallow.train[rows], alone.train[rows]) and torch.equal(shallow.heldout, alone.heldout)
    assert shallow.scale == alone.scale
    assert (shallow.folder.name.split("__")[:2], len(rows)) == (alone.folder.name.split("__")[:2], 400)


def test_a_missing_hook_is_one_line_exit_2_and_leaves_nothing(env, capsys):
    tmp_path, base = env
    assert cli.main(base + ["--hook", "blocks.0.hook_out,blocks.9.hook_out", "--activations", "stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and "\n" not in err and "'blocks.9.hook_out' does not exist" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # starts torchrun with two gloo ranks
@pytest.mark.parametrize("mode, hooks", [("cache", HOOKS), ("stream", "blocks.1.hook_out"), ("stream", HOOKS)])
def test_torchrun_two_ranks_match_one_process(env, mode, hooks):
    tmp_path, base = env
    args = [*base, "--hook", hooks, "--activations", mode, "--device", "cpu"]
    worker = Path(__file__).resolve().parent / "tiny_worker.py"
    repo = str(Path(__file__).resolve().parents[1])  # the code under test, whichever copy is installed
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": repo}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    for cmd, out in ((ddp, "ddp"), ([sys.executable, str(worker)], "one")):
        proc = subprocess.run([*cmd, *args, "--out-dir", str(tmp_path / out)], cwd=tmp_path, env=env_vars,
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for hook in hooks.split(","):
        sub = hook if "," in hooks else ""
        a, b = (torch.load(latest_checkpoint(tmp_path / out / sub), weights_only=True)["model"] for out in ("ddp", "one"))
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), (hook, k)


def test_interrupted_hooks_on_one_stream_resume_to_the_same_weights(env, monkeypatch):
    tmp_path, base = env
    args = [*base, "--hook", HOOKS, "--activations", "stream", "--steps", "40"]
    assert cli.main([*args, "--out-dir", str(tmp_path / "full")]) == 0
    real = loop.train_step

    def step_then_ctrl_c(model, opt, ops, x, cfg, step, *rest, **kw):
        if step == 20 and cfg.model.hook == "blocks.2.hook_out":
            loop.SigintGuard.stop_all.set()  # what the main thread's guard does on Ctrl-C
        return real(model, opt, ops, x, cfg, step, *rest, **kw)

    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", step_then_ctrl_c)
        assert cli.main([*args, "--out-dir", str(tmp_path / "cut")]) == 130
    cut = [torch.load(latest_checkpoint(tmp_path / "cut" / h), weights_only=True)["step"] for h in HOOKS.split(",")]
    assert all(0 < s < 40 for s in cut)
    assert cli.main(["--resume", str(tmp_path / "cut")]) == 0
    for hook in HOOKS.split(","):
        a, b = (torch.load(latest_checkpoint(tmp_path / r / hook), weights_only=True) for r in ("full", "cut"))
        assert a["step"] == b["step"] == 40
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_several_hooks_need_a_language_model(tmp_path, capsys):
    assert cli.main(["--source", "synthetic", "--hook", HOOKS, "--out-dir", str(tmp_path / "run")]) == 2
    assert "names several hooks, which only a language model has" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
