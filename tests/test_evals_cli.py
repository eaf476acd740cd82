"""``python -m esosae.evals RUN_DIR`` in-process: a synthetic run end to end, then bad input."""

import json
import runpy
import shutil
import sys

import pytest

from esosae.cli import main as train_main
from esosae.evals.cli import main as eval_main

SMALL = ["--train-size", "40", "--test-size", "20", "--k-values", "1,2", "--planted-atoms", "2", "--no-progress"]
ENVELOPE = ["eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
            "eval_result_details", "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id",
            "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("synthetic") / "run"
    argv = ["--source", "synthetic", "--synthetic-d", "16", "--synthetic-atoms", "24", "--m1", "24", "--m2", "24",
            "--batch-size", "128", "--steps", "60", "--log-every", "5", "--no-eval", "--out-dir", str(run)]
    assert train_main(argv) == 0
    return run


def test_synthetic_run_gets_all_three_files_and_plots(run_dir, capsys):
    assert eval_main([str(run_dir), *SMALL]) == 0
    out = capsys.readouterr().out
    for stem in ("core", "sparse_probing", "curriculum"):
        assert f"eval/{stem}.json" in out
        result = json.loads((run_dir / "eval" / f"{stem}.json").read_text())
        assert list(result) == ENVELOPE and result["eval_type_id"] == stem
        assert result["sae_lens_id"] == "run" and result["sae_cfg_dict"]["d_sae"] == 48
    core = json.loads((run_dir / "eval" / "core.json").read_text())
    m = core["eval_result_metrics"]
    assert "model_performance_preservation" not in m  # no language model, no CE loss
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - m["reconstruction_quality"]["fvu"])
    assert 0 <= m["planted"]["atom_recovery"] <= 1 and {"cos_mean", "cos_max"} == set(m["cross_layer"])
    assert [d["layer"] for d in core["eval_result_details"]] == [1, 2]
    probing = json.loads((run_dir / "eval" / "sparse_probing.json").read_text())
    assert probing["eval_config"]["dataset_names"] == ["planted_atoms"]
    assert list(probing["eval_result_unstructured"]["planted_atoms"]) == ["atom_0", "atom_1"]
    curriculum = json.loads((run_dir / "eval" / "curriculum.json").read_text())
    assert len(curriculum["eval_result_unstructured"]["curves"]["step"]) == 12
    assert {"threshold_progression", "margins", "alignment"} == set(curriculum["eval_result_metrics"])
    for png in ("curriculum.png", "sparse_probing.png"):
        assert (run_dir / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_only_runs_the_named_evaluations(run_dir, capsys):
    (run_dir / "eval" / "core.json").unlink(missing_ok=True)
    assert eval_main([str(run_dir), "--only", "curriculum", "--no-progress"]) == 0
    assert "curriculum.json" in capsys.readouterr().out and not (run_dir / "eval" / "core.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--only", "core,probes"], "--only takes a comma list of core, probing, curriculum"),
    (["--train-size", "two"], "invalid"),
    (["--k-values", "0,5"], "k_values must be positive"),
])
def test_bad_flags_are_one_line_exit_2(run_dir, capsys, argv, message):
    assert eval_main([str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m esosae.evals: error:") and "\n" not in err and message in err


@pytest.mark.parametrize("damage, message", [
    (lambda run: shutil.rmtree(run / "sae"), "no saved SAE at"),
    (lambda run: (run / "sae" / "sae.safetensors").write_bytes(b"junk"), "unreadable or corrupt"),
    (lambda run: (run / "config.json").unlink(), "has no config.json"),
    (lambda run: (run / "metrics.jsonl").write_text(""), "has no logged steps"),
])
def test_damaged_run_dir_is_one_line_exit_2(run_dir, tmp_path, capsys, damage, message):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval", "plots"))
    damage(copy)
    assert eval_main([str(copy), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m esosae.evals: error:") and "\n" not in err and message in err
    assert not (copy / "eval").exists() and not (copy / "plots").exists()  # checked before anything ran


def test_module_entry_point_exits_2_on_a_missing_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m esosae.evals", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("esosae.evals", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"python -m esosae.evals: error: run directory {tmp_path / 'nope'} does not exist\n"
