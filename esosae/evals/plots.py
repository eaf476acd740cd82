"""PNG plots of a run's evaluations, written into ``RUN_DIR/plots/`` (matplotlib, Agg).

- ``curriculum.png``: τ1/τ2, L0 per layer and total, FVU and dead % per layer against the
  step (τ and L0 on log axes when positive throughout);
- ``sparse_probing.png``: test accuracy and ROC AUC against k (log axis; "all" is the
  full-width probe), SAE features vs the model's hidden units, averaged over datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from esosae.run.layout import PLOTS_DIR  # noqa: E402
from esosae.run.atomic import atomic_file  # noqa: E402

PLOT_DIR = PLOTS_DIR
DPI = 120


def _save(fig: Any, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
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
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    steps = curves["step"]
    _series(axes[0, 0], steps, curves, [("tau1", "τ1"), ("tau2", "τ2")], "threshold τ(t)", log=True)
    _series(axes[0, 1], steps, curves, [("l0_1", "layer 1"), ("l0_2", "layer 2"), ("l0", "total")],
            "L0 (active features per token)", log=True)
    _series(axes[1, 0], steps, curves, [("fvu", "FVU")], "FVU (batch)")
    _series(axes[1, 1], steps, curves, [("dead_pct_1", "layer 1"), ("dead_pct_2", "layer 2")], "dead features (%)",
            percent=True)
    fig.suptitle(title)
    return _save(fig, path)


def probing_plot(metrics: dict[str, dict[str, float]], k_values: tuple[int, ...], path: Path, title: str,
                 llm_label: str = "model hidden units") -> Path:
    """Accuracy and AUC against k from eval_result_metrics' ``llm`` and ``sae`` sections."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    xs = list(k_values)
    x_all = xs[-1] * 2.5  # where the full-width point sits on the log axis
    for ax, metric in zip(axes, ("accuracy", "auc")):
        for prefix, label, style in (("sae", "SAE features", "o-"), ("llm", llm_label, "s--")):
            m = metrics[prefix]
            line = ax.plot(xs, [m[f"{prefix}_top_{k}_test_{metric}"] for k in xs], style, label=label)[0]
            ax.plot([x_all], [m[f"{prefix}_test_{metric}"]], style[0], color=line.get_color(), ms=9, mfc="none")
        ax.set_xscale("log")
        ax.set_xticks(xs + [x_all], [str(k) for k in xs] + ["all"])
        ax.minorticks_off()
        ax.set_xlabel("k (features the probe sees)")
        ax.set_ylabel(f"test {'ROC AUC' if metric == 'auc' else 'accuracy'}")
        ax.set_ylim(0.45, 1.01)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return _save(fig, path)
