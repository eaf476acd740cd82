"""``--log tensorboard|trackio|wandb`` (esosae/training/tracking.py), offline: each tracker gets
every number of metrics.jsonl at its step, the run config and the final evaluation; a tracker
that is not installed is one line naming its pip extra, exit 2, before anything is written.
Each test skips when its tracker is not installed."""

import json
import re
import sys
from pathlib import Path

import pytest

from esosae import cli
from esosae.run.layout import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--source", "synthetic", "--steps", "6", "--batch-size", "64", "--m1", "32", "--m2", "32",
       "--log-every", "2", "--eval-tokens", "256", "--no-eval"]


def expected(run: Path) -> tuple[list[dict], dict, float]:
    """metrics.jsonl's records, config.json, and the held-out FVU summary.md shows (4 digits)."""
    fvu = float(re.search(r"\| fvu \| ([^ ]+) \|", (run / "summary.md").read_text()).group(1))
    return read_metrics(run / "metrics.jsonl"), json.loads((run / "config.json").read_text()), fvu


def numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}


def test_tensorboard_gets_every_metric_the_config_and_the_evaluation(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert cli.main(RUN + ["--out-dir", str(run), "--log", "tensorboard"]) == 0
    records, config, fvu = expected(run)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert len(records) == 3
    for rec in records:
        for key, value in numbers(rec).items():
            got = {e.step: e.value for e in events.Scalars(key)}
            assert got[rec["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), key  # float32 events
    tags = set(events.Tags()["scalars"])
    assert {t for t in tags if not t.startswith("eval/")} == {k for r in records for k in numbers(r)}
    assert events.Scalars("eval/fvu")[0].value == pytest.approx(fvu, rel=1e-3)
    assert events.Scalars("eval/fvu")[0].step == records[-1]["step"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\njson")) == config


def test_trackio_gets_every_metric_the_config_and_the_evaluation(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    from trackio import sqlite_storage
    from trackio.sqlite_storage import SQLiteStorage

    # trackio reads $TRACKIO_DIR once, at import, into this constant: point it at the test's folder
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
    run = tmp_path / "run"
    assert cli.main(RUN + ["--out-dir", str(run), "--log", "trackio"]) == 0
    assert (tmp_path / "trackio" / "esosae.db").is_file()
    got = {"logs": SQLiteStorage.get_logs("esosae", "run"), "config": SQLiteStorage.get_run_config("esosae", "run")}
    records, config, fvu = expected(run)
    by_step = {}
    for row in got["logs"]:
        by_step.setdefault(row["step"], {}).update(row)
    for rec in records:
        for key, value in numbers(rec).items():
            assert by_step[rec["step"]][key] == pytest.approx(value, rel=1e-12), key
    assert by_step[records[-1]["step"]]["eval/fvu"] == pytest.approx(fvu, rel=1e-3)
    assert {k: v for k, v in got["config"].items() if not k.startswith("_")} == config


def test_wandb_offline_gets_every_metric_the_config_and_the_evaluation(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, inits = [], []
    real_log, real_init = wandb.sdk.wandb_run.Run.log, wandb.init

    def log(self, data, step=None, **kw):
        calls.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    def init(**kw):
        inits.append(kw)
        return real_init(**kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setattr(wandb, "init", init)
    run = tmp_path / "run"
    assert cli.main(RUN + ["--out-dir", str(run), "--log", "wandb"]) == 0
    records, config, fvu = expected(run)
    assert [(rec["step"], numbers(rec)) for rec in records] == calls[:-1]
    assert calls[-1][0] == records[-1]["step"] and calls[-1][1]["eval/fvu"] == pytest.approx(fvu, rel=1e-3)
    assert inits[0]["config"] == config and inits[0]["dir"] == str(run)
    assert [p.stat().st_size > 0 for p in (run / "wandb").glob("offline-run-*/run-*.wandb")] == [True]


@pytest.mark.parametrize("tracker", ["tensorboard", "trackio", "wandb"])
def test_a_tracker_not_installed_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # importlib finds no such module
    run = tmp_path / "run"
    assert cli.main(RUN + ["--out-dir", str(run), "--log", tracker]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and "\n" not in err and f"pip install 'esosae[{tracker}]'" in err
    assert not run.exists()


def test_tensorboard_after_a_crash_and_a_resume_has_each_step_once(tmp_path, monkeypatch):
    """A crash at step 6 leaves events past the step-4 checkpoint; the resumed run drops them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from esosae.training import tracking

    real_log = tracking.TensorBoard.log

    def crash_at_6(self, rec):
        real_log(self, rec)
        if rec["step"] == 6:
            raise RuntimeError("crash")

    run = tmp_path / "run"
    args = ["--source", "synthetic", "--steps", "8", "--batch-size", "64", "--m1", "32", "--m2", "32",
            "--log-every", "1", "--checkpoint-every", "4", "--eval-tokens", "256", "--no-eval"]
    monkeypatch.setattr(tracking.TensorBoard, "log", crash_at_6)
    with pytest.raises(RuntimeError, match="crash"):
        cli.main(args + ["--out-dir", str(run), "--log", "tensorboard"])
    monkeypatch.setattr(tracking.TensorBoard, "log", real_log)
    assert cli.main(["--resume", str(run), "--log", "tensorboard"]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = read_metrics(run / "metrics.jsonl")
    assert [e.step for e in events.Scalars("fvu")] == [r["step"] for r in records] == list(range(8))
    assert [e.value for e in events.Scalars("fvu")] == pytest.approx([r["fvu"] for r in records], rel=1e-6)


@pytest.mark.slow  # the evaluations (core, planted probing, curriculum) add ~20 s
def test_tensorboard_gets_every_number_of_the_evaluations(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert cli.main([a for a in RUN if a != "--no-eval"] + ["--out-dir", str(run), "--log", "tensorboard"]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags, n = set(events.Tags()["scalars"]), 0
    for path in sorted((run / "eval").glob("*.json")):
        for section, values in json.loads(path.read_text())["eval_result_metrics"].items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = f"eval/{path.stem}/{section}/{key}"
                    assert tag in tags and events.Scalars(tag)[0].value == pytest.approx(value, rel=1e-6, abs=1e-30)
                    n += 1
    assert n >= 10 and "eval/core/reconstruction_quality/fvu" in tags
