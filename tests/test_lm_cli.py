"""``python train.py`` on a language-model source, in-process: a tiny run, then bad input."""

import json

import pytest
from lm_helpers import TINY, tiny_run

from esosae import cli


@pytest.fixture
def env(tmp_path, monkeypatch):
    return tmp_path, tiny_run(tmp_path, monkeypatch, "--hook", "blocks.1.hook_out", "--out-dir", str(tmp_path / "run"),
                              "--harvest-tokens", "400", "--steps", "4")


def test_tiny_lm_run_harvests_then_reuses(env, capsys):
    tmp_path, base = env
    assert cli.main(base) == 0
    out, err = capsys.readouterr()
    assert "run directory:" in out and (tmp_path / "run" / "summary.md").is_file()
    source = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert source["model"] == TINY and source["hook"] == "blocks.1.hook_out"
    assert cli.main(base + ["--overwrite"]) == 0
    assert "using cached activations" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--hook", "blocks.1.hook_outt"], "close matches: blocks.1.hook_out"),
    (["--dataset", "{tmp}/missing.jsonl"], "does not exist"),
    (["--dataset", "{tmp}/empty.txt"], "empty.txt is empty"),
    (["--context-size", "0"], "--context-size must be > 0"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(env, capsys, flags, message):
    tmp_path, base = env
    (tmp_path / "empty.txt").write_text("")
    rc = cli.main(base + [f.format(tmp=tmp_path) for f in flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("train.py: error:") and "\n" not in err and message in err
    assert not (tmp_path / "run").exists()
    activations = tmp_path / "cache" / "activations"
    assert not activations.exists() or not any(activations.rglob("*"))
