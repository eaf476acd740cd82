"""``python train.py``: every config field is a flag (``--tau-final`` and ``--tau_final`` alike).

Settings come from the defaults, then ``--config FILE.json``, then the flags given.
Bad input of any kind prints one line naming the problem and exits with code 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from esosae.config import SECTIONS, ConfigError, TrainConfig, field_docs
from esosae.errors import UserError
from esosae.rundir import check_new_run, check_writable_dir

CHOICES = {
    "source": ("lm", "synthetic"), "schedule": ("exp", "linear", "const"),
    "gamma_warmup": ("synced", "linear", "none"), "arch": ("esosae", "relu", "topk"),
    "margins": ("adaptive", "fixed"), "normalize": ("expected_norm", "none"),
    "synthetic": ("easy", "hard"), "cache_dtype": ("float16", "bfloat16"),
    "backend": ("auto", "triton", "torch"), "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "bf16", "fp16", "fp32", "tf32"),
    "profile": ("none", "nvtx", "torch"),
}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ConfigError, so ``main`` reports them as one line."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for annotations like ``int | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_optional(inner: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "auto", "") else inner(text)

    parse.__name__ = inner.__name__
    return parse


def _config_fields() -> list[tuple[str | None, dataclasses.Field, str]]:
    """(section or None, field, help) for every leaf field of TrainConfig."""
    out = []
    for cls, section in [(c, s) for s, c in SECTIONS.items()] + [(TrainConfig, None)]:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS and cls is TrainConfig:
                continue
            f.type = hints[f.name]
            out.append((section, f, docs.get(f.name, "")))
    return out


def build_parser(prog: str = "train.py") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Train a sparse autoencoder (E-SOSAE by default).",
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.json", help="Start from the settings in this JSON file.")
    p.add_argument("--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its last checkpoint.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out-dir.")
    for section, f, help_text in _config_fields():
        group_title = section or "training"
        group = next((g for g in p._action_groups if g.title == group_title), None)
        group = group or p.add_argument_group(group_title)
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"dest": f.name, "help": f"{help_text} (default: {default})"}
        inner, optional = _optional(f.type)
        if inner is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        kw["type"] = _parse_optional(inner) if optional else inner
        group.add_argument(*names, metavar=f.name.upper(), **kw)
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Defaults ← --config file ← flags; validation errors raise ConfigError."""
    # Overlay raw dicts, not resolved configs: fields left unset stay "auto" until the
    # final TrainConfig resolves them against the final source and arch.
    d = TrainConfig.read_json(ns.config) if getattr(ns, "config", None) else {}
    for section, f, _ in _config_fields():
        if hasattr(ns, f.name):
            target = d.setdefault(section, {}) if section else d
            if not isinstance(target, dict):
                raise ConfigError(f"config section {section!r} must be an object")
            target[f.name] = getattr(ns, f.name)
    return TrainConfig.from_dict(d)


def given_config_flags(ns: argparse.Namespace) -> list[str]:
    return [f.name for _, f, _ in _config_fields() if hasattr(ns, f.name)]


def prepare(argv: list[str]) -> tuple[TrainConfig, Path, bool, bool]:
    """Parse and validate everything; returns (config, run_dir, resume, overwrite). Writes nothing."""
    ns = build_parser().parse_args(argv)
    if getattr(ns, "resume", None):
        run_dir = Path(ns.resume)
        extra = [n for n in given_config_flags(ns) if n not in ("eval", "profile")]
        if extra or getattr(ns, "config", None):
            raise ConfigError(f"--resume takes its settings from {run_dir}/config.json; drop "
                              + ", ".join(f"--{n.replace('_', '-')}" for n in extra or ["config"]))
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.json there; is it a run directory?")
        cfg = TrainConfig.from_json(run_dir / "config.json")
        for name in ("eval", "profile"):
            if hasattr(ns, name):
                setattr(cfg, name, getattr(ns, name))
        return cfg, run_dir, True, False
    cfg = config_from_args(ns)
    return cfg, Path(cfg.out_dir), False, getattr(ns, "overwrite", False)


def main(argv: list[str] | None = None) -> int:
    """Train from command-line flags; under torchrun every rank calls this, rank 0 reports."""
    from esosae import distributed
    from esosae.evals.summary import evaluate
    from esosae.train import Interrupted, run

    argv = sys.argv[1:] if argv is None else argv
    dist = None
    try:
        cfg, run_dir, resume, overwrite = prepare(argv)
        if not resume:
            check_new_run(run_dir, overwrite)  # checks only: the trainer claims the directory once all else is checked
        if cfg.model.cache_dir:
            check_writable_dir(Path(cfg.model.cache_dir), "--cache-dir")
        dist = distributed.from_environment(cfg.device)
        trained = run(cfg, run_dir, resume=resume, dist=dist)
        headline = evaluate(trained) if trained is not None else {}  # rank 0 evaluates
    except UserError as e:
        if distributed.launch_rank() == 0:  # every rank sees the same bad input: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        if distributed.launch_rank() == 0:
            print(f"train.py: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.shutdown()
    if dist is not None and not dist.is_main:
        return 0
    print(f"run directory: {run_dir}")
    print("  " + "  ".join(f"{k}={headline[k]:.4g}" for k in
                           ("fvu", "l0_1", "l0_2", "dead_pct", "ce_loss_recovered", "atom_recovery") if k in headline))
    return 0
