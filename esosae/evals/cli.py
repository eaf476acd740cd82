"""The evaluation CLI: ``python -m esosae.evals RUN_DIR [--only core,probing,curriculum]``.

Every EvalConfig field is a flag (``--train-size 500``, ``--k-values 1,5,20``,
``--datasets ag_news,sst2``, ``--no-standardize``). Bad input of any kind prints one line
and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from esosae.args import OneLineParser, add_fields
from esosae.errors import UserError
from esosae.evals.config import EvalConfig

PROG = "python -m esosae.evals"
EXIT_USAGE = 2
HEADLINES = {
    "core": ("reconstruction_quality", ("fvu",), "sparsity", ("l0",), "model_performance_preservation",
             ("ce_loss_score",), "planted", ("atom_recovery",)),
    "sparse_probing": ("sae", ("sae_top_1_test_accuracy", "sae_top_1_test_auc", "sae_test_accuracy"),
                       "llm", ("llm_top_1_test_accuracy", "llm_test_accuracy")),
    "curriculum": ("alignment", ("l0_drop_pearson", "l0_drop_best_lag_steps", "cos_fall_pearson")),
}


def build_parser() -> OneLineParser:
    """RUN_DIR, --no-progress, and every EvalConfig field as a flag (esosae.args)."""
    p = OneLineParser(prog=PROG, description="Evaluate a trained run: core metrics, sparse probing, curriculum.",
                      argument_default=argparse.SUPPRESS)
    p.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by train.py.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars or timing lines.")
    add_fields(p, EvalConfig)
    return p


def _headline(stem: str, result: dict[str, Any]) -> str:
    spec, metrics, parts = HEADLINES[stem], result["eval_result_metrics"], []
    for section, keys in zip(spec[::2], spec[1::2]):
        for key in keys:
            value = metrics.get(section, {}).get(key)
            if value is not None:
                parts.append(f"{key}={value:.4g}")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, evaluate the run, print each file written and its headline numbers."""
    from esosae.evals.run import run_all

    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = vars(build_parser().parse_args(argv))
        run_dir, progress = ns.pop("run_dir"), not ns.pop("no_progress", False)
        done = run_all(run_dir, progress=progress, config=EvalConfig(**ns))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for stem, result in done.items():
        print(f"{run_dir}/eval/{stem}.json  {_headline(stem, result)}")
    return 0
