"""``python -m esosae.export RUN_DIR --format saelens OUT``: a finished run's SAE in another format.

OUT must be absent or empty (``--overwrite`` replaces it); it is written into a temporary
sibling and renamed when complete, so a failed export leaves nothing. A run without a saved
SAE (``RUN_DIR/sae/``: training has not finished) or any other bad input prints one line and
exits with code 2, before anything is written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from esosae.args import OneLineParser
from esosae.config import TrainConfig
from esosae.errors import UserError
from esosae.export import saelens
from esosae.run.atomic import atomic_dir
from esosae.run.layout import CONFIG_FILE, SAE_CONFIG, SAE_DIR, check_writable_dir
from esosae.sae.model import DualLayerSAE

PROG = "python -m esosae.export"
EXIT_USAGE = 2
FORMATS: dict[str, Callable[[DualLayerSAE, TrainConfig, Path], list[Path]]] = {"saelens": saelens.write}
"""Format name → writer(saved SAE, the run's config, empty folder) → the folders written."""


class ExportError(UserError):
    """A run or output folder that cannot be exported to; the message says what to do."""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Export a finished run's SAE to another library's format.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by train.py.")
    p.add_argument("out", metavar="OUT", help="Folder to write (absent or empty, or --overwrite).")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="Target format.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT.")
    return p


def open_run(run_dir: Path) -> tuple[DualLayerSAE, TrainConfig]:
    """The run's saved SAE (scale folded in) and its config, or an ExportError."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ExportError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); point at a folder train.py wrote")
    if not (run_dir / SAE_DIR / SAE_CONFIG).is_file():
        raise ExportError(f"{run_dir} has no saved SAE ({SAE_DIR}/ is written when training ends): finish the run "
                          f"with python train.py --resume {run_dir}, then export it")
    return DualLayerSAE.load(run_dir / SAE_DIR), TrainConfig.from_json(run_dir / CONFIG_FILE)


def export(run_dir: Path, fmt: str, out: Path, overwrite: bool = False) -> list[Path]:
    """Check everything, then write ``out`` whole; returns the folders a reader loads."""
    sae, cfg = open_run(run_dir)
    check_writable_dir(out, "OUT")
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise ExportError(f"OUT {out} holds the run directory {run_dir}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"OUT {out} is not empty; choose another folder or pass --overwrite")
    with atomic_dir(out) as tmp:
        written = FORMATS[fmt](sae, cfg, tmp)
    return [out / p.relative_to(tmp) for p in written]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, export, print each folder written."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = build_parser().parse_args(argv)
        written = export(Path(ns.run_dir), ns.format, Path(ns.out), ns.overwrite)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for folder in written:
        print(folder)
    return 0
