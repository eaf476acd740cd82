"""The run directory is claimed only after everything is checked, and given back as it was:
--overwrite keeps the old run until the new one has a checkpoint, a failed new run leaves
nothing behind, and a path that cannot hold a run is a one-line error that writes nothing."""

import os

import pytest

from esosae.training import loop as train
from esosae.cli import main
from esosae.run.layout import Claim, read_metrics, truncate_metrics
from esosae.training.loop import RunError

TINY = ["--source", "synthetic", "--m1", "32", "--m2", "32", "--batch-size", "128", "--no-eval"]


def snapshot(root):
    """Every path under ``root`` with its bytes (None for folders)."""
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "3", "--out-dir", str(run)]) == 0
    return run


def one_line(capsys, *words):
    """The error is one line (after any progress bar of the steps that ran) naming ``words``."""
    err = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert all(w in errors[0] for w in words), errors[0]


def test_overwrite_with_a_missing_dataset_keeps_the_old_run(tmp_path, old_run, capsys):
    before = snapshot(tmp_path)
    argv = ["--m1", "32", "--m2", "32", "--no-eval", "--dataset", str(tmp_path / "missing.txt"), "--overwrite",
            "--out-dir", str(old_run)]
    assert main(argv) == 2
    one_line(capsys, "missing.txt")
    assert snapshot(tmp_path) == before


def fail_at_step(monkeypatch, at):
    real = train.train_step

    def step(model, opt, ops, x, cfg, step, *args, **kwargs):
        if step == at:
            raise RunError(f"injected failure at step {step}")
        return real(model, opt, ops, x, cfg, step, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(tmp_path, old_run, capsys,
                                                                                monkeypatch):
    before = snapshot(tmp_path)
    fail_at_step(monkeypatch, 2)
    assert main([*TINY, "--steps", "5", "--seed", "9", "--out-dir", str(old_run), "--overwrite"]) == 2
    one_line(capsys, "injected failure")
    assert snapshot(tmp_path) == before  # the old run is back, byte for byte, and nothing hidden is left


def test_overwrite_deletes_the_old_run_once_the_new_one_has_a_checkpoint(tmp_path, old_run, capsys, monkeypatch):
    fail_at_step(monkeypatch, 3)  # after the checkpoint of step 2
    argv = [*TINY, "--steps", "6", "--checkpoint-every", "2", "--seed", "9", "--out-dir", str(old_run), "--overwrite"]
    assert main(argv) == 2
    one_line(capsys, "injected failure")
    config = (old_run / "config.json").read_text()
    assert '"seed": 9' in config and (old_run / "checkpoints" / "step_00000002.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old run is gone, nothing set aside remains
    monkeypatch.undo()
    assert main(["--resume", str(old_run)]) == 0  # and the new run continues from its own checkpoint


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    fail_at_step(monkeypatch, 1)
    assert main([*TINY, "--steps", "5", "--out-dir", str(tmp_path / "new")]) == 2
    one_line(capsys, "injected failure")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # a folder the user made stays, empty
    assert main([*TINY, "--steps", "5", "--out-dir", str(tmp_path / "empty")]) == 2
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_dir_naming_a_file_is_never_deleted(tmp_path, capsys, overwrite):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    assert main([*TINY, "--steps", "2", "--out-dir", str(target), *overwrite]) == 2
    one_line(capsys, "is a file", "notes.txt")
    assert target.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_out_dir_under_a_file_or_unwritable(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "f" / "run")]) == 2
    one_line(capsys, "is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([*TINY, "--steps", "2", "--out-dir", str(locked / "run")]) == 2
        one_line(capsys, "not writable")
    assert main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "f")]) == 2
    one_line(capsys, "--cache-dir", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "locked"][: 1 + (os.geteuid() != 0)]


def test_claim_abort_before_begin_touches_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep").write_text("x")
    Claim(run).abort()
    assert (run / "keep").read_text() == "x"


def test_metrics_stop_at_a_torn_line_and_truncate_keeps_earlier_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.5}\n{"step": 1, "loss": 0.25}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 0, "loss": 1.5}, {"step": 1, "loss": 0.25}]
    truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 0, "loss": 1.5}\n'


def test_a_second_ctrl_c_mid_step_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    real = train.train_step

    def step(model, opt, ops, x, cfg, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt  # what a second Ctrl-C raises mid-step
        return real(model, opt, ops, x, cfg, step, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "6", "--checkpoint-every", "2", "--out-dir", str(run)]) == 130
    err = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]
    assert err.startswith("train.py: interrupted") and f"--resume {run}" in err
    monkeypatch.undo()
    assert main(["--resume", str(run)]) == 0


def test_a_full_disk_after_training_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from esosae.evals import summary

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "summary.md"))

    monkeypatch.setattr(summary, "headline", full)
    assert main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, "no space left on the disk", "summary.md", "--resume")


def test_atomic_writes_get_the_permissions_a_plain_open_would(tmp_path):
    """mkstemp/mkdtemp make private 0600/0700 files; a run's files are as readable as any other."""
    import stat

    from esosae.run.atomic import UMASK, atomic_dir, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~UMASK
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~UMASK
