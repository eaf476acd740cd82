"""The run directory: its layout, and the only code that knows its file names.

    RUN_DIR/config.json       the TrainConfig (TrainConfig.to_json / from_json)
    RUN_DIR/metrics.jsonl     one JSON object per logged step, appended as training goes
    RUN_DIR/checkpoints/      step_XXXXXXXX.pt, the last few (esosae.run.checkpoint)
    RUN_DIR/sae/              the final SAE (DualLayerSAE.save / load)
    RUN_DIR/summary.md        the held-out headline
    RUN_DIR/eval/*.json       the evaluations (SAEBench-shaped)
    RUN_DIR/plots/*.png       their plots

A new run claims its directory through ``Claim``: nothing is created, moved or deleted
until every setting, path, dataset and model has been checked, and an ``--overwrite``
never deletes the old run before the new one has a checkpoint of its own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from esosae.errors import UserError
from esosae.run.atomic import atomic_write_text

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
SAE_DIR = "sae"
SUMMARY_FILE = "summary.md"
EVAL_DIR = "eval"
SAE_WEIGHTS = "sae.safetensors"  # inside SAE_DIR (DualLayerSAE.save)
SAE_CONFIG = "cfg.json"
PLOTS_DIR = "plots"


class RunDirError(UserError):
    """A run directory that cannot be used; the message names it and what to do."""


# -- checks before anything is written ---------------------------------------------------


def check_writable_dir(path: Path, flag: str) -> None:
    """``path`` can be (or already is) a directory this process may write into: it is not a
    regular file, no part of it is one, and its nearest existing ancestor is writable."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{flag} {path} is a file, not a directory; choose another path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"{flag} {path}: {ancestor} is a file, so nothing can be created under it; "
                          "choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {path}: {ancestor} is not writable; choose a path you can write to")


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """A new run needs an absent or empty directory, or ``--overwrite`` for a used one."""
    check_writable_dir(run_dir, "--out-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(f"--out-dir {run_dir} is not empty; pass --resume {run_dir} to continue "
                          "it or --overwrite to replace it")


class Claim:
    """The directory of a new run, taken over in three moves:

    ``begin``   (after every check) an old run there is renamed aside to a hidden sibling and
                the directory created empty;
    ``commit``  (once the new run's first checkpoint is on disk) the old run is deleted;
    ``abort``   (the new run failed before that) the new directory is removed and the old
                run renamed back, so the disk is as it was.
    A rename within one parent folder is atomic, so at every instant one complete run is
    there under its own name, or the old one under the hidden name.
    """

    def __init__(self, run_dir: Path):
        self.dir, self.aside, self.was_empty = run_dir, None, False
        self.begun = self.done = False

    def begin(self) -> None:
        if self.dir.is_dir() and any(self.dir.iterdir()):
            self.aside = self.dir.with_name(f".{self.dir.name}.replaced")
            shutil.rmtree(self.aside, ignore_errors=True)  # left by an earlier crash mid-commit
            os.replace(self.dir, self.aside)
        self.was_empty = self.dir.is_dir()  # an empty folder the user made: give it back empty
        self.begun = True
        self.dir.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        if not self.done and self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
        self.done = True

    def abort(self) -> None:
        if self.done or not self.begun:  # before begin nothing on disk was touched
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.aside is not None:
            os.replace(self.aside, self.dir)
        elif self.was_empty:
            self.dir.mkdir()
        self.done = True


# -- metrics.jsonl -------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The well-formed records of a metrics file, in order; reading stops at the first line
    that is not a JSON object with a ``step`` (a torn last line from a crash)."""
    records = []
    for line in path.read_text().split("\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(rec, dict) or "step" not in rec:
            break
        records.append(rec)
    return records


def truncate_metrics(path: Path, before_step: int) -> None:
    """Keep only the well-formed records logged before ``before_step`` (after a resume)."""
    if path.exists():
        kept = [rec for rec in read_metrics(path) if rec["step"] < before_step]
        atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in kept))
