"""The evaluations' headline: the few numbers that summary.md and the end of ``train.py`` show.

Sparse probing: SAEBench's headline, the mean over datasets of each dataset's mean over its
tasks, of the top-1 and the full-width probes' test accuracy and ROC AUC, for the SAE's
features against the model's own hidden units. The numbers are copied from
``eval/sparse_probing.json``'s ``eval_result_metrics``, never recomputed. Core: CE loss
recovered from ``eval/core.json`` (language-model runs) or atom recovery (synthetic runs).

summary.md holds the training part (``esosae.evals.summary.headline``) and, from
``SECTION`` on, an evaluation part that ``update_summary`` rewrites from the eval files on
disk after every evaluation, so it always shows what ``eval/`` holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from esosae.run.atomic import atomic_write_text
from esosae.run.layout import EVAL_DIR, SUMMARY_FILE

SECTION = "## Evaluations"
COLUMNS = (("top-1 accuracy", "top_1_test_accuracy"), ("top-1 AUC", "top_1_test_auc"),
           ("full accuracy", "test_accuracy"), ("full AUC", "test_auc"))
"""The probing headline's columns: (label, SAEBench metric name without its sae_/llm_ prefix)."""
FULL_SET = "python -m esosae.evals {run} --datasets all"


def probing_headline(result: dict[str, Any]) -> dict[str, Any]:
    """{"sae": {metric: value}, "llm": {...}, "datasets": [...], "tasks": n, "train_size", "test_size",
    "llm_features": what the llm rows probe} from a sparse_probing result (eval/sparse_probing.json)."""
    m, c = result["eval_result_metrics"], result["eval_config"]
    return {**{who: {key: m[who][f"{who}_{key}"] for _, key in COLUMNS} for who in ("sae", "llm")},
            "datasets": list(c["dataset_names"]),
            "tasks": sum(len(tasks) for tasks in result["eval_result_unstructured"].values()),
            "train_size": c["probe_train_set_size"], "test_size": c["probe_test_set_size"],
            "llm_features": c["llm_features"]}


def _rows(h: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(label, [f"{h[who][key]:.3f}" for _, key in COLUMNS])
            for who, label in (("sae", "SAE features"), ("llm", h["llm_features"]))]


def probing_lines(h: dict[str, Any]) -> list[str]:
    """The probing headline as aligned text lines (the end of ``train.py``)."""
    rows = _rows(h)
    width = max(len(label) for label, _ in rows)
    lines = [f"sparse probing, mean over {len(h['datasets'])} datasets ({h['tasks']} tasks):",
             " " * width + "".join(f"  {label:>14}" for label, _ in COLUMNS)]
    return lines + [label.ljust(width) + "".join(f"  {v:>14}" for v in values) for label, values in rows]


def section(results: dict[str, dict[str, Any]], run_dir: Path) -> str:
    """summary.md's evaluation part from {file stem: result} (any of core, sparse_probing)."""
    lines = [SECTION, ""]
    core = results.get("core", {}).get("eval_result_metrics", {})
    if "model_performance_preservation" in core:
        lines.append(f"- CE loss recovered: {core['model_performance_preservation']['ce_loss_score']:.4f} "
                     f"({EVAL_DIR}/core.json)")
    if "planted" in core:
        lines.append(f"- atom recovery: {core['planted']['atom_recovery']:.4f} ({EVAL_DIR}/core.json)")
    if "sparse_probing" in results:
        h = probing_headline(results["sparse_probing"])
        about = (f"- sparse probing ({EVAL_DIR}/sparse_probing.json): the mean over {len(h['datasets'])} datasets "
                 f"({', '.join(h['datasets'])}; {h['tasks']} binary tasks, at most {h['train_size'] // 2} train "
                 f"and {h['test_size'] // 2} test texts per class) of each dataset's mean over its tasks")
        lines += [about, "", "| features | " + " | ".join(label for label, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in _rows(h)]
        lines += ["", f"Every probing dataset at full size: `{FULL_SET.format(run=run_dir)}`."]
    return "\n".join(lines) + "\n"


def read_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{stem: result} of the core and sparse-probing files present in ``run_dir/eval``."""
    found = {}
    for stem in ("core", "sparse_probing"):
        path = run_dir / EVAL_DIR / f"{stem}.json"
        if path.is_file():
            found[stem] = json.loads(path.read_text())
    return found


def update_summary(run_dir: Path) -> None:
    """Rewrite summary.md's evaluation part (everything from ``SECTION`` on) from the eval files."""
    path = run_dir / SUMMARY_FILE
    top = path.read_text().split(SECTION)[0].rstrip("\n") + "\n\n" if path.is_file() else ""
    results = read_results(run_dir)
    if results:
        atomic_write_text(path, top + section(results, run_dir))
