"""``python train.py``: every config field is a flag (``--tau-final`` and ``--tau_final`` alike).

Settings come from the defaults, then ``--config FILE.json``, then the flags given.
Bad input of any kind prints one line naming the problem and exits with code 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path

from esosae.args import OneLineParser, add_fields
from esosae.config import SECTIONS, ConfigError, TrainConfig, field_specs
from esosae.errors import UserError
from esosae.run.layout import check_new_run, check_writable_dir

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
RESUME_FLAGS = ("eval", "profile", "log")
"""Settings a --resume may change: what the run reports, not what it trains."""


def _config_fields() -> list[tuple[str | None, str]]:
    """(section or None, field name) for every leaf field of TrainConfig."""
    return [(section, name) for section, cls in [*SECTIONS.items(), (None, TrainConfig)]
            for name, spec in field_specs(cls).items() if not dataclasses.is_dataclass(spec.kind)]


def build_parser(prog: str = "train.py") -> OneLineParser:
    """Every TrainConfig field is a flag (esosae.args), grouped by section; only the flags
    given land in the namespace, so a --config file's settings stay unless a flag overrides them."""
    p = OneLineParser(prog=prog, description="Train a sparse autoencoder (E-SOSAE by default).",
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.json", help="Start from the settings in this JSON file.")
    p.add_argument("--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its last checkpoint.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out-dir.")
    for section, cls in [*SECTIONS.items(), ("training", TrainConfig)]:
        add_fields(p, cls, title=section)
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Defaults ← --config file ← flags; validation errors raise ConfigError."""
    # Overlay raw dicts, not resolved configs: fields left unset stay "auto" until the
    # final TrainConfig resolves them against the final source and arch. The flags' values
    # are already converted (esosae.args); from_dict converts the file's the same way.
    d = TrainConfig.read_json(ns.config) if getattr(ns, "config", None) else {}
    for section, name in _config_fields():
        if hasattr(ns, name):
            target = d.setdefault(section, {}) if section else d
            if not isinstance(target, dict):
                raise ConfigError(f"config section {section!r} must be an object")
            target[name] = getattr(ns, name)
    return TrainConfig.from_dict(d)


def given_config_flags(ns: argparse.Namespace) -> list[str]:
    return [name for _, name in _config_fields() if hasattr(ns, name)]


def prepare(argv: list[str]) -> tuple[TrainConfig, Path, bool, bool]:
    """Parse and validate everything; returns (config, run_dir, resume, overwrite). Writes nothing."""
    ns = build_parser().parse_args(argv)
    if getattr(ns, "resume", None):
        run_dir = Path(ns.resume)
        extra = [n for n in given_config_flags(ns) if n not in RESUME_FLAGS]
        if extra or getattr(ns, "config", None):
            raise ConfigError(f"--resume takes its settings from {run_dir}/config.json; drop "
                              + ", ".join(f"--{n.replace('_', '-')}" for n in extra or ["config"]))
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.json there; is it a run directory?")
        cfg = TrainConfig.from_json(run_dir / "config.json")
        for name in RESUME_FLAGS:
            if hasattr(ns, name):
                setattr(cfg, name, getattr(ns, name))
        return cfg, run_dir, True, False
    cfg = config_from_args(ns)
    return cfg, Path(cfg.out_dir), False, getattr(ns, "overwrite", False)


DISK_ERRORS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def resume_hint(run_dir: Path) -> str:
    """What to do after a run stopped early: resume it when it has a checkpoint."""
    from esosae.run.checkpoint import latest_checkpoint

    runs = [run_dir, *(p for p in run_dir.iterdir() if p.is_dir())] if run_dir.is_dir() else []
    if any(latest_checkpoint(r) is not None for r in runs):  # the run's, or a hook's of several
        return f"continue from its last checkpoint with: python train.py --resume {run_dir}"
    return "it had no checkpoint yet; start it again"


def main(argv: list[str] | None = None) -> int:
    """Train from command-line flags; under torchrun every rank calls this, rank 0 reports."""
    from esosae.evals.summary import evaluate
    from esosae.training import distributed, tracking
    from esosae.training.hooks import train_hooks
    from esosae.training.loop import Interrupted, run

    argv = sys.argv[1:] if argv is None else argv
    dist, runs = None, []
    try:
        cfg, run_dir, resume, overwrite = prepare(argv)
        tracking.check(cfg.log)
        if not resume:
            check_new_run(run_dir, overwrite)  # checks only: the trainer claims the directory once all else is checked
        if cfg.model.cache_dir:
            check_writable_dir(Path(cfg.model.cache_dir), "--cache-dir")
        dist = distributed.from_environment(cfg.device)
        if len(cfg.model.hooks) > 1:  # one SAE per hook, each in its own run directory
            runs = train_hooks(cfg, run_dir, resume, dist)
        else:
            runs = [t for t in [run(cfg, run_dir, resume=resume, dist=dist)] if t is not None]
        headlines = [(t.run_dir, evaluate(t)) for t in runs]  # rank 0 evaluates
    except UserError as e:
        if distributed.launch_rank() == 0:  # every rank sees the same bad input: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        if distributed.launch_rank() == 0:
            print(f"train.py: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C mid-step: the last whole checkpoint stands
        if distributed.launch_rank() == 0:
            print(f"train.py: interrupted; {resume_hint(run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        if distributed.launch_rank() == 0:
            print(f"train.py: error: {DISK_ERRORS[e.errno]} writing {e.filename or run_dir} "
                  f"({e.strerror}); {resume_hint(run_dir)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for trained in runs:
            trained.tracker.close()  # an evaluation that failed leaves it open
        distributed.shutdown()
    if dist is not None and not dist.is_main:
        return 0
    for folder, headline in headlines:
        print(f"run directory: {folder}")
        print("  " + "  ".join(f"{k}={headline[k]:.4g}" for k in
                               ("fvu", "l0_1", "l0_2", "dead_pct", "ce_loss_recovered", "atom_recovery")
                               if k in headline))
        if "probing" in headline:
            from esosae.evals.headline import FULL_SET, probing_lines

            print("\n".join("  " + line for line in probing_lines(headline["probing"])))
            print(f"  every probing dataset at full size: {FULL_SET.format(run=folder)}")
    return 0
