"""Experiment trackers (``--log``): the numbers of ``metrics.jsonl``, the run config and the
final evaluation, sent to TensorBoard, Trackio or Weights & Biases.

Each logged step sends every number of its ``metrics.jsonl`` line (all but ``step``) at
that step, under the same names; the config goes in once, at the start; at the end, under
``eval/`` at the last step, the held-out headline (FVU, MSE, L0 per layer, dead %, …) and,
when the evaluations ran, every number of their ``eval/*.json`` (``eval/core/
reconstruction_quality/fvu``, ``eval/sparse_probing/sae/sae_top_1_test_accuracy``, …). Where each one writes:

    tensorboard  RUN_DIR/tensorboard/ (``tensorboard --logdir RUN_DIR/tensorboard``); the config
                 as a JSON text; a resumed run drops the events past its checkpoint (purge_step)
    trackio      project ``esosae``, a run named after RUN_DIR, in trackio's own folder
                 ($TRACKIO_DIR, default ~/.cache/huggingface/trackio; ``trackio show``)
    wandb        project ``esosae`` ($WANDB_PROJECT overrides), files under RUN_DIR/wandb/;
                 ``WANDB_MODE=offline`` keeps everything local (``wandb sync`` uploads it later)

Each tracker is an optional extra (``pip install 'esosae[tensorboard]'``); ``check`` fails
with one line naming it before anything is written. Only rank 0 tracks.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
from pathlib import Path
from typing import Any

from esosae.config import TrainConfig
from esosae.errors import UserError

PROJECT = "esosae"
TENSORBOARD_DIR = "tensorboard"  # inside the run directory
WANDB_DIR = "wandb"
MODULES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
"""--log choice → the module it needs, which the pyproject extra of the same name installs."""


class TrackerError(UserError):
    """A tracker that cannot be used; the message names the package to install."""


def check(name: str) -> None:
    """Raise TrackerError when the tracker ``name`` is not installed (writes nothing)."""
    module = MODULES.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        raise TrackerError(f"--log {name} needs the package {module}, which is not installed: "
                           f"pip install 'esosae[{name}]' (or --log none)")


def numbers_of(rec: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields of a record (bools and the step itself left out), keys prefixed."""
    return {prefix + k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def evaluation_numbers(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The numbers of the evaluations' SAEBench-shaped results ({file stem: result}, as
    esosae.evals.run.run_all returns them) as ``stem/section/metric`` keys."""
    flat = {}
    for stem, result in results.items():
        for section, values in result.get("eval_result_metrics", {}).items():
            if isinstance(values, dict):
                flat.update(numbers_of(values, f"{stem}/{section}/"))
    return flat


class Tracker:
    """No tracking (``--log none``); the base of the others."""

    def log(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        """The final evaluation's numbers under ``eval/``, at ``step``; then close."""
        self.close()

    def close(self) -> None:
        """Flush and close; safe to call more than once."""


class TensorBoard(Tracker):
    def __init__(self, cfg: TrainConfig, run_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start or None)
        if start == 0:
            self.writer.add_text("config", f"```json\n{json.dumps(cfg.to_dict(), indent=2)}\n```", 0)

    def log(self, rec: dict[str, Any]) -> None:
        for k, v in numbers_of(rec).items():
            self.writer.add_scalar(k, v, rec["step"])

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in numbers_of(metrics, "eval/").items():
            self.writer.add_scalar(k, v, step)
        self.close()

    def close(self) -> None:
        self.writer.close()


class Trackio(Tracker):
    def __init__(self, cfg: TrainConfig, run_dir: Path, start: int):
        import trackio

        self.run = trackio.init(project=PROJECT, name=run_dir.resolve().name, config=cfg.to_dict(),
                                resume="allow" if start else "never")
        self.open = True

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log(numbers_of(rec), step=rec["step"])

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(numbers_of(metrics, "eval/"), step=step)
        self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.run.finish()


class Wandb(Tracker):
    def __init__(self, cfg: TrainConfig, run_dir: Path, start: int):
        import wandb

        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.resolve().name,
                              dir=str(run_dir), config=cfg.to_dict())
        self.open = True

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log(numbers_of(rec), step=rec["step"])

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        evals = numbers_of(metrics, "eval/")
        self.run.log(evals, step=step)
        self.run.summary.update(evals)
        self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb}


def open_tracker(cfg: TrainConfig, run_dir: Path, start: int = 0) -> Tracker:
    """The tracker ``cfg.log`` names, for a run in ``run_dir`` starting (or resuming) at ``start``."""
    cls = TRACKERS.get(cfg.log)
    return cls(cfg, run_dir, start) if cls else Tracker()
