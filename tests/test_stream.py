"""Streamed activations (esosae/data/stream.py): the language model beside the trainer,
nothing on disk, and a resume that loses nothing."""

import json

import pytest
import torch
from lm_helpers import tiny_run

from esosae import cli
from esosae.data import stream
from esosae.run.checkpoint import latest_checkpoint
from esosae.training import loop


@pytest.fixture
def env(tmp_path, monkeypatch):
    return tmp_path, tiny_run(tmp_path, monkeypatch, "--hook", "blocks.1.hook_out", "--activations", "stream",
                              "--buffer-tokens", "1024", "--steps", "40")


def weights(run):
    state = torch.load(latest_checkpoint(run), weights_only=True)
    return state["step"], state["model"]


def stop_after(monkeypatch, steps: int) -> None:
    """A Ctrl-C seen by the loop after ``steps`` steps (the guard is read once per step)."""

    class Guard(loop.SigintGuard):
        reads = 0

        @property
        def requested(self):
            Guard.reads += 1
            return Guard.reads >= steps

    monkeypatch.setattr(loop, "SigintGuard", Guard)


def record_forwards(monkeypatch) -> list[torch.Tensor]:
    """The tokens of each language-model forward, in order (the held-out set's come first)."""
    real, tokens_seen = stream.hooks_activations, []

    def forward(model, tokens, hooks):
        tokens_seen.append(tokens)
        return real(model, tokens, hooks)

    monkeypatch.setattr(stream, "hooks_activations", forward)
    return tokens_seen


def test_interrupted_stream_run_resumes_to_the_same_weights(env, monkeypatch):
    tmp_path, base = env
    with monkeypatch.context() as m:
        full = record_forwards(m)
        assert cli.main(base + ["--out-dir", str(tmp_path / "full")]) == 0
    assert not (tmp_path / "cache" / "activations").exists()  # nothing harvested to disk
    with monkeypatch.context() as m:
        stop_after(m, 21)  # 21 × 64 rows: past the first window of ≥ 1,024 rows
        assert cli.main(base + ["--out-dir", str(tmp_path / "cut")]) == 130
    assert weights(tmp_path / "cut")[0] == 21
    resumed = record_forwards(monkeypatch)
    assert cli.main(["--resume", str(tmp_path / "cut")]) == 0
    # after the held-out forward, the resume starts at a later window's first forward: the
    # windows it had passed are not computed again
    assert not torch.equal(resumed[1], full[1])
    assert any(torch.equal(resumed[1], tokens) for tokens in full[2:])
    (s1, w1), (s2, w2) = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert s1 == s2 == 40
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_resume_reading_other_windows_is_one_line(env, capsys):
    tmp_path, base = env
    run = tmp_path / "run"
    assert cli.main(base + ["--steps", "3", "--out-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    config["data"]["harvest_batch"] = 4  # run-only for a cache, but it bounds the stream's windows
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "set harvest_batch back to 8" in err
