"""PNG plots (matplotlib, Agg): the figures of a run's evaluations and the shared pieces the
grid's report (esosae.experiments.report) draws its figures with.

A run's evaluations write into ``RUN_DIR/plots/`` (``esosae.run.layout.PLOTS_DIR``):

- ``curriculum.png``: τ1/τ2, L0 per layer and total, FVU and dead % per layer against the
  step (τ and L0 on log axes when positive throughout);
- ``sparse_probing.png``: ``probing_plot``, the SAE's features against the model's hidden
  units.

Shared: ``save`` (every PNG, written atomically), ``probing_plot`` (test accuracy and ROC
AUC against k, any number of SAEs against one reference) and ``histogram_plot``
(overlaid histograms with dotted marks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from esosae.run.atomic import atomic_file  # noqa: E402

DPI = 120


def save(fig: Any, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` as a PNG (whole or not at all), close it."""
    fig.set_layout_engine("constrained")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def _series(ax: Any, steps: list[float], curves: dict[str, list[float]], keys: list[tuple[str, str]],
            title: str, log: bool = False, percent: bool = False) -> None:
    drawn = [(key, label) for key, label in keys if key in curves]
    for key, label in drawn:
        ax.plot(steps, curves[key], label=label, lw=1.5)
    if log and drawn and all(v > 0 for key, _ in drawn for v in curves[key]):
        ax.set_yscale("log")
    if percent:
        ax.set_ylim(0, max([1.0] + [1.1 * v for key, _ in drawn for v in curves[key]]))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(drawn) > 1:
        ax.legend(fontsize=8)


def curriculum_plot(curves: dict[str, list[float]], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    steps = curves["step"]
    _series(axes[0, 0], steps, curves, [("tau1", "τ1"), ("tau2", "τ2")], "threshold τ(t)", log=True)
    _series(axes[0, 1], steps, curves, [("l0_1", "layer 1"), ("l0_2", "layer 2"), ("l0", "total")],
            "L0 (active features per token)", log=True)
    _series(axes[1, 0], steps, curves, [("fvu", "FVU")], "FVU (batch)")
    _series(axes[1, 1], steps, curves, [("dead_pct_1", "layer 1"), ("dead_pct_2", "layer 2")], "dead features (%)",
            percent=True)
    fig.suptitle(title)
    return save(fig, path)


def _number(m: dict[str, Any], key: str) -> float:
    v = m.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def probing_plot(saes: Sequence[tuple[str, dict[str, float]]], llm: tuple[str, dict[str, float]],
                 k_values: Sequence[int], path: Path, title: str) -> Path:
    """Mean test accuracy and ROC AUC over the datasets against k (log axis; "all" is the
    full-width probe): one line per SAE in ``saes`` (a label and the ``sae`` section of
    sparse probing's eval_result_metrics) and, dashed, the model's own units (``llm``: a label
    and the ``llm`` section). A missing value leaves a gap."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(k_values)
    x_all = xs[-1] * 2.5  # where the full-width point sits on the log axis
    lines = [(label, m, "sae", "o-", None) for label, m in saes] + [(llm[0], llm[1], "llm", "s--", "k")]
    for ax, metric in zip(axes, ("accuracy", "auc")):
        low = 0.45
        for label, m, prefix, style, color in lines:
            ys = [_number(m, f"{prefix}_top_{k}_test_{metric}") for k in xs]
            y_all = _number(m, f"{prefix}_test_{metric}")
            line = ax.plot(xs, ys, style, color=color, label=label)[0]
            ax.plot([x_all], [y_all], style[0], color=line.get_color(), ms=9, mfc="none")
            low = min([low] + [y - 0.02 for y in (*ys, y_all) if math.isfinite(y)])
        ax.set_xscale("log")
        ax.set_xticks(xs + [x_all], [str(k) for k in xs] + ["all"])
        ax.minorticks_off()
        ax.set_xlabel("k (features the probe sees)")
        ax.set_ylabel(f"mean test {'ROC AUC' if metric == 'auc' else 'accuracy'}")
        ax.set_ylim(low, 1.01)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7 if len(lines) > 4 else 8, ncol=2 if len(lines) > 4 else 1, loc="lower right")
    fig.suptitle(title)
    return save(fig, path)


def histogram_plot(samples: Sequence[tuple[str, Any]], path: Path, title: str, xlabel: str, ylabel: str, *,
                   bins: Any, marks: Sequence[float] = (), xlog: bool = False, ylog: bool = False,
                   **hist: Any) -> Path:
    """Overlaid histograms of ``samples`` (label, values), dotted vertical lines at ``marks``;
    ``hist`` goes to ``Axes.hist`` (e.g. ``alpha``, ``histtype``, ``density``)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in samples:
        ax.hist(values, bins=bins, label=label, **hist)
    for x in marks:
        ax.axvline(x, color="k", ls=":")
    if xlog:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title)
    return save(fig, path)
