"""Faults while a run writes: a full disk, Ctrl-C during a checkpoint write, Ctrl-C during the
activation harvest. Each ends in one line, with what was on disk before left whole."""

import errno
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from lm_helpers import interrupt_harvest_at, tiny_run


from esosae.run import checkpoint

from esosae.run import atomic as runio
from esosae.cli import main
from esosae.config import TrainConfig

TINY = ["--source", "synthetic", "--m1", "32", "--m2", "32", "--batch-size", "128", "--no-eval"]

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_lines(capsys):
    """The CLI's own lines on stderr (the progress bars aside); fails on a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("train.py")]


def no_temporaries(run):
    return not list(run.rglob(runio.TEMP_GLOB))


def in_process(argv):
    """main(argv), failing the test (rather than ending the session) on a stray KeyboardInterrupt."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        pytest.fail(f"KeyboardInterrupt escaped main: {e!r}")


# -- a full disk ---------------------------------------------------------------------------


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    writes: dict[int, int] = {}
    real = checkpoint._HashingFile.write

    def fill_up_at_the_second_checkpoint(self, data):
        writes[id(self)] = writes.get(id(self), 0) + len(data)
        if len(writes) >= 2 and writes[id(self)] > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(checkpoint._HashingFile, "write", fill_up_at_the_second_checkpoint)
    assert in_process([*TINY, "--steps", "30", "--checkpoint-every", "10", "--out-dir", str(run)]) == 2
    lines = cli_lines(capsys)
    assert len(lines) == 1, lines
    assert "no disk space left" in lines[0] and str(run / "checkpoints") in lines[0]
    assert "step_00000010.pt is intact" in lines[0] and "inline_container" not in lines[0]
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000010.pt"]
    checkpoint.verify(checkpoint.checkpoint_path(run, 10))
    assert no_temporaries(run)
    monkeypatch.undo()  # space freed: the run resumes from the checkpoint that was kept
    assert in_process(["--resume", str(run)]) == 0
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000020.pt", "step_00000030.pt"]


@pytest.mark.parametrize("how", ["torch's RuntimeError", "a real full device"])
def test_disk_full_is_named_however_it_surfaces(tmp_path, how, monkeypatch):
    model = torch.nn.Linear(3, 2)
    model.scale = 1.0
    opt = torch.optim.Adam(model.parameters())
    cfg = TrainConfig.from_dict({"data": {"source": "synthetic"}})
    if how == "torch's RuntimeError":
        def save(obj, f):  # what torch.save raises when its writer fails on a full disk
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

        monkeypatch.setattr(torch, "save", save)
    else:
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full")
        real_open = open
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: real_open("/dev/full", mode), raising=False)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(tmp_path, 1, model, opt, cfg, keep=2)
    msg = str(e.value)
    assert "no disk space left" in msg and str(tmp_path / "checkpoints") in msg and "\n" not in msg
    assert "no checkpoint was written" in msg
    assert not list((tmp_path / "checkpoints").iterdir())  # the temporary file is gone too


# -- Ctrl-C while a checkpoint is written ----------------------------------------------------


def test_deferred_sigint_holds_ctrl_c_until_the_block_ends():
    assert threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with runio.deferred_sigint():
                signal.raise_signal(signal.SIGINT)
                reached.append(True)  # the Ctrl-C waits for the end of the block
        assert reached == [True]
        with runio.deferred_sigint(deliver=False):  # stopping anyway: dropped
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_checkpoint_writes_leaves_them_whole_and_no_traceback(tmp_path, capsys, monkeypatch):
    """A Ctrl-C arrives in the middle of every checkpoint write. The first (during step 5's
    write) waits for the write, then asks the loop to stop; the second (during the write of
    the stopping checkpoint, step 6) is dropped. Both files are whole; one line, exit 130."""
    run = tmp_path / "run"
    real = checkpoint._HashingFile.write
    signalled: set[int] = set()

    def ctrl_c_mid_write(self, data):
        n = real(self, data)
        if id(self) not in signalled:
            signalled.add(id(self))
            signal.raise_signal(signal.SIGINT)  # its handler runs here, between two writes
        return n

    monkeypatch.setattr(checkpoint._HashingFile, "write", ctrl_c_mid_write)
    args = [*TINY, "--steps", "50", "--checkpoint-every", "5", "--keep-checkpoints", "5", "--log-every", "1"]
    assert in_process([*args, "--out-dir", str(run)]) == 130
    lines = cli_lines(capsys)
    assert len(lines) == 1 and "interrupted at step 6/50" in lines[0], lines
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000005.pt", "step_00000006.pt"]
    for path in checkpoint.checkpoints(run):
        checkpoint.verify(path)
    assert no_temporaries(run)
    monkeypatch.undo()
    assert in_process(["--resume", str(run)]) == 0
    assert torch.load(checkpoint.latest_checkpoint(run), weights_only=True)["step"] == 50


# -- Ctrl-C during the activation harvest ----------------------------------------------------


def test_ctrl_c_during_the_harvest_is_one_line_exit_130_and_caches_nothing(tmp_path, capsys, monkeypatch):
    calls = interrupt_harvest_at(monkeypatch, 3)
    cache, run = tmp_path / "cache", tmp_path / "run"
    argv = tiny_run(tmp_path, monkeypatch, "--hook", "blocks.1.hook_out", "--out-dir", str(run),
                    "--harvest-tokens", "400", "--steps", "4")
    assert in_process(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("train.py: interrupted during the activation harvest"), err
    assert sum(line.startswith("train.py") for line in lines) == 1, err
    assert len(calls) == 3
    assert not any((cache / "activations").iterdir())  # no cache, whole or half-written
    assert not run.exists() or not any(run.iterdir())
