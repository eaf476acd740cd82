"""The grid's report: ``report.md`` and ``plots/*.png`` from the files a grid run wrote.

Every number comes from a file under the grid folder: ``grid.json`` (settings,
invocations), each run's ``calibration.json`` (the knob's tries) and, in the chosen try's
run directory, ``eval/{core,sparse_probing,curriculum}.json``, ``metrics.jsonl`` and
``sae/sae.safetensors`` (margins μ and decoders, for the histograms). A ``reading.md``
next to ``grid.json``, if present, is placed at the top.

    python -m esosae.report experiments/method      # rewrite the report of a grid folder
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from esosae.run.layout import EVAL_DIR, METRICS_FILE, PLOTS_DIR, SAE_DIR, SAE_WEIGHTS, read_metrics  # noqa: E402
from esosae.run.atomic import atomic_file, atomic_write_text  # noqa: E402

REPORT_FILE = "report.md"
K_VALUES = (1, 2, 5, 10, 20, 50)
SOURCE_TITLES = {"lm": "Language model", "easy": "Planted dictionary, easy", "hard": "Planted dictionary, hard"}


@dataclass
class GridRun:
    """One grid run as its files describe it."""

    source: str
    slug: str
    cal: dict[str, Any]
    dir: Path | None = None
    core: dict[str, Any] = field(default_factory=dict)
    probing: dict[str, Any] = field(default_factory=dict)
    probing_details: list[dict[str, Any]] = field(default_factory=list)
    curriculum: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> int:
        return int(self.cal.get("run", -1))

    @property
    def done(self) -> bool:
        return self.cal.get("status") == "done" and self.dir is not None

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.dir / METRICS_FILE)

    def weights(self) -> dict[str, np.ndarray]:
        return load_file(str(self.dir / SAE_DIR / SAE_WEIGHTS))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _json(path: Path) -> dict[str, Any]:
    return read_json(path) or {}


def load(out: Path) -> dict[str, list[GridRun]]:
    """{source: runs in run order} for every run folder that has a calibration.json."""
    found: dict[str, list[GridRun]] = {}
    for cal_path in sorted(out.glob("*/run*/calibration.json")):
        cal = _json(cal_path)
        r = GridRun(cal_path.parent.parent.name, cal_path.parent.name, cal)
        if cal.get("status") == "done" and cal.get("chosen") is not None:
            r.dir = cal_path.parent / cal["attempts"][cal["chosen"]]["try"]
            r.core = _json(r.dir / EVAL_DIR / "core.json").get("eval_result_metrics", {})
            sp = _json(r.dir / EVAL_DIR / "sparse_probing.json")
            r.probing, r.probing_details = sp.get("eval_result_metrics", {}), sp.get("eval_result_details", [])
            r.curriculum = _json(r.dir / EVAL_DIR / "curriculum.json").get("eval_result_metrics", {})
        found.setdefault(r.source, []).append(r)
    return {s: sorted(found[s], key=lambda r: r.run) for s in ("lm", "easy", "hard") if s in found}


# -- formatting ----------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


# -- tables --------------------------------------------------------------------------------


def core_table(runs: list[GridRun]) -> list[str]:
    lm = any(_get(r.core, "model_performance_preservation") for r in runs)
    planted = any(_get(r.core, "planted") for r in runs)
    head = ["run", "variant", "knob", "tries", "L0 (in ±20%)", "L0₁", "L0₂", "FVU"]
    head += ["CE loss rec."] if lm else []
    head += ["dead %", "dense %", "mean \\|cos\\|", "max \\|cos\\|"] + (["atom rec."] if planted else [])
    rows = []
    for r in runs:
        name = f"{r.cal.get('name', r.slug)}: {r.cal.get('note', '')}"
        if not r.done:
            status = r.cal.get("status", "?")
            why = f": {r.cal['error']}" if r.cal.get("error") else ""
            rows.append([r.run, name, f"**{status}**{why}"] + [""] * (len(head) - 3))
            continue
        a = r.cal["attempts"][r.cal["chosen"]]
        c = r.core
        row = [r.run, name, f"{r.cal['knob']} = {fmt(a['knob'])}", len(r.cal["attempts"]),
               f"{fmt(_get(c, 'sparsity', 'l0'))} ({fmt(r.cal.get('in_band'))})",
               _get(c, "sparsity", "l0_1"), _get(c, "sparsity", "l0_2"), _get(c, "reconstruction_quality", "fvu")]
        row += [_get(c, "model_performance_preservation", "ce_loss_score")] if lm else []
        row += [_get(c, "feature_density", "dead_pct"), _get(c, "feature_density", "dense_pct"),
                _get(c, "cross_layer", "cos_mean"), _get(c, "cross_layer", "cos_max")]
        row += [_get(c, "planted", "atom_recovery")] if planted else []
        rows.append(row)
    return table(head, rows)


def calibration_table(runs: list[GridRun]) -> list[str]:
    rows = [[r.run, r.cal.get("name", r.slug), a["try"], f"{r.cal['knob']} = {fmt(a['knob'])}", a["l0"],
             a.get("fvu"), "✓" if i == r.cal.get("chosen") else "", a.get("wall_s")]
            for r in runs for i, a in enumerate(r.cal.get("attempts", []))]
    return table(["run", "variant", "try", "knob", "held-out L0", "FVU", "chosen", "wall s"], rows)


def probing_tables(runs: list[GridRun]) -> list[str]:
    done = [r for r in runs if r.done and r.probing]
    if not done:
        return ["No sparse-probing results.", ""]
    out = []
    for what, name in (("accuracy", "test accuracy"), ("auc", "test AUC")):
        head = ["run", "variant"] + [f"top-{k}" for k in K_VALUES] + ["all features"]
        rows = [[r.run, r.cal.get("name", r.slug)] + [_get(r.probing, "sae", f"sae_top_{k}_test_{what}") for k in K_VALUES]
                + [_get(r.probing, "sae", f"sae_test_{what}")] for r in done]
        llm = done[0].probing.get("llm", {})
        rows.append(["llm", "the model's own units"] + [llm.get(f"llm_top_{k}_test_{what}") for k in K_VALUES]
                    + [llm.get(f"llm_test_{what}")])
        out += [f"Mean {name} over the tasks:", ""] + table(head, rows)
    return out


def curriculum_table(runs: list[GridRun]) -> list[str]:
    rows = []
    for r in runs:
        if not r.done:
            continue
        c = r.curriculum
        a, m = c.get("alignment", {}), c.get("margins", {})
        rows.append([r.run, r.cal.get("name", r.slug), a.get("l0_drop_pearson"), a.get("l0_drop_best_lag_steps"),
                     a.get("cos_fall_pearson"), a.get("cos_fall_best_lag_steps"),
                     f"{fmt(m.get('pinned_min_1_final'))} / {fmt(m.get('pinned_min_2_final'))}",
                     f"{fmt(m.get('pinned_max_1_final'))} / {fmt(m.get('pinned_max_2_final'))}",
                     f"{fmt(m.get('mu_mean_1'))} / {fmt(m.get('mu_mean_2'))}",
                     _get(c, "threshold_progression", "l0_settle_step")])
    head = ["run", "variant", "r(s, L0 drop)", "lag (steps)", "r(γ, \\|cos\\| fall)", "lag (steps)",
            "pinned at μ_min (L1 / L2)", "pinned at μ_max (L1 / L2)", "mean μ (L1 / L2)", "L0 settles at step"]
    return table(head, rows)


def consistency_tables(runs: list[GridRun]) -> list[str]:
    done = [r for r in runs if r.done and r.probing]
    if not done:
        return []
    keys = [f"top_{k}_" for k in K_VALUES] + [""]
    head = ["run", "variant"] + [f"top-{k}" for k in K_VALUES] + ["all features"]
    rows = [[r.run, r.cal.get("name", r.slug)] + [_get(r.probing, "consistency", f"sae_{k}test_auc_task_std")
                                                   for k in keys] for r in done]
    out = ["Standard deviation of the test AUC across tasks:", ""] + table(head, rows)
    by_run = {r.run: r for r in done}
    if 2 in by_run and 9 in by_run:
        a, b = by_run[2], by_run[9]
        per_task_a = {d["dataset_name"]: d for d in a.probing_details}
        per_task_b = {d["dataset_name"]: d for d in b.probing_details}
        tasks = sorted(set(per_task_a) & set(per_task_b))
        seed_rows = []
        for label, fn in (("std of the mean AUC", None), ("mean over datasets of the per-dataset std", 1)):
            row: list[Any] = [label]
            for k in keys:
                key = f"sae_{k}test_auc"
                if fn is None:
                    vals = [_get(a.probing, "sae", key), _get(b.probing, "sae", key)]
                    row.append(statistics.stdev(vals) if None not in vals else None)
                else:
                    stds = [statistics.stdev([per_task_a[t][key], per_task_b[t][key]]) for t in tasks
                            if key in per_task_a[t] and key in per_task_b[t]]
                    row.append(statistics.fmean(stds) if stds else None)
            seed_rows.append(row)
        out += ["Across the two seeds of runs 2 and 9 (sample std of two values):", ""]
        out += table(["", *head[2:]], seed_rows)
    return out


# -- plots ---------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.set_layout_engine("constrained")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def curves_plot(runs: list[GridRun], path: Path, title: str) -> bool:
    """τ(t), L0(t), FVU(t), dead %(t) of the exp / linear / const runs (2, 3, 4) overlaid."""
    chosen = [r for r in runs if r.done and r.run in (2, 3, 4)]
    if not chosen:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for r in chosen:
        recs = r.records()
        step = [x["step"] for x in recs]
        label = f"run {r.run}: {r.cal['variant']['schedule']}"
        axes[0, 0].plot(step, [x["tau1"] for x in recs], label=label)
        axes[0, 1].plot(step, [x["l0_1"] + x.get("l0_2", 0.0) for x in recs], label=label)
        axes[1, 0].plot(step, [x["fvu"] for x in recs], label=label)
        dead = [100 * (x["dead_1"] + x.get("dead_2", 0.0)) / (2 if "dead_2" in x else 1) for x in recs]
        axes[1, 1].plot(step, dead, label=label)
    for ax, name in zip(axes.flat, ("τ₁(t)", "L0(t), both layers", "FVU(t)", "dead %(t), mean of layers")):
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0, 0].set_yscale("log")
    axes[0, 1].set_yscale("log")
    axes[0, 0].legend()
    fig.suptitle(title)
    _save(fig, path)
    return True


def probing_plot(runs: list[GridRun], path: Path, title: str) -> bool:
    done = [r for r in runs if r.done and r.probing]
    if not done:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for what, ax in zip(("accuracy", "auc"), axes):
        for r in done:
            ax.plot(K_VALUES, [_get(r.probing, "sae", f"sae_top_{k}_test_{what}") for k in K_VALUES], marker="o",
                    label=f"{r.run}: {r.cal.get('name')}")
        llm = done[0].probing.get("llm", {})
        ax.plot(K_VALUES, [llm.get(f"llm_top_{k}_test_{what}") for k in K_VALUES], "k--", label="llm")
        ax.set_xscale("log")
        ax.set_xlabel("k (features the probe sees)")
        ax.set_title(f"mean test {what}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    _save(fig, path)
    return True


def margins_plot(runs: list[GridRun], path: Path, title: str) -> bool:
    """Final μ of both layers, run 2 (clamped) against run 5 (unclamped)."""
    pair = [r for r in runs if r.done and r.run in (2, 5)]
    if not pair:
        return False
    mus = {r.run: np.concatenate([r.weights()[k] for k in ("mu1", "mu2")]) for r in pair}
    lo = min(float(m.min()) for m in mus.values())
    hi = max(float(m.max()) for m in mus.values())
    bins = np.geomspace(max(lo, 1e-6) * 0.9, hi * 1.1, 60) if hi > lo else 30
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in pair:
        ax.hist(mus[r.run], bins=bins, alpha=0.6, label=f"run {r.run}: {'clamped' if r.run == 2 else 'unclamped'}")
    ax.set_xscale("log")
    ax.axvline(0.25, color="k", ls=":")
    ax.axvline(4.0, color="k", ls=":")
    ax.set_xlabel("margin μ (both layers; dotted: the clamp bounds)")
    ax.set_ylabel("features")
    ax.legend()
    ax.set_title(title)
    _save(fig, path)
    return True


def cosine_plot(runs: list[GridRun], path: Path, title: str) -> bool:
    """|cos| between every layer-1 and layer-2 decoder row: run 2 against run 8 (γ = 0)."""
    pair = [r for r in runs if r.done and r.run in (2, 8)]
    if not pair:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in pair:
        w = r.weights()
        w1 = w["W_dec1"] / np.linalg.norm(w["W_dec1"], axis=1, keepdims=True)
        w2 = w["W_dec2"] / np.linalg.norm(w["W_dec2"], axis=1, keepdims=True)
        cos = np.abs(w1 @ w2.T).ravel()  # (m1·m2,)
        ax.hist(cos, bins=100, histtype="step", density=True,
                label=f"run {r.run}: {'orthogonality on' if r.run == 2 else 'γ = 0'} (max {cos.max():.2f})")
    ax.axvline(0.1, color="k", ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("|cos(W_dec1[i], W_dec2[j])| (dotted: ρ)")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title)
    _save(fig, path)
    return True


def fvu_l0_plot(runs: list[GridRun], path: Path, title: str) -> bool:
    done = [r for r in runs if r.done and r.core]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in done:
        l0, fvu = _get(r.core, "sparsity", "l0"), _get(r.core, "reconstruction_quality", "fvu")
        ax.scatter([l0], [fvu])
        ax.annotate(f"{r.run}: {r.cal.get('name')}", (l0, fvu), fontsize=8, xytext=(4, 2), textcoords="offset points")
    target = done[0].cal.get("target_l0")
    if target:
        ax.axvspan(target * 0.8, target * 1.2, color="0.9", label="target L0 ± 20%", zorder=0)
        ax.legend()
    ax.set_xlabel("held-out L0 (both layers)")
    ax.set_ylabel("held-out FVU")
    ax.set_title(title)
    _save(fig, path)
    return True


PLOTS = (("curves", curves_plot, "τ, L0, FVU and dead % over training (exp / linear / const)"),
         ("probing", probing_plot, "sparse probing against k"),
         ("margins", margins_plot, "final margins with and without clamping"),
         ("cosines", cosine_plot, "cross-layer |cos| with and without orthogonality"),
         ("fvu_l0", fvu_l0_plot, "FVU against L0"))


# -- the report ----------------------------------------------------------------------------


def header(out: Path, sources: list[str]) -> list[str]:
    g = _json(out / "grid.json")
    lines = ["# E-SOSAE comparison grid (METHOD.md §8)", ""]
    reading = out / "reading.md"
    if reading.is_file():
        lines += [reading.read_text().strip(), ""]
    lines += ["## How it was run", ""]
    for inv in g.get("invocations", []):
        m = inv.get("machine", {})
        wall = inv.get("wall_s")
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        lines.append(f"- `{inv['command']}` — started {inv['started']}, "
                     f"{'wall ' + f'{wall / 60:.1f} min' if wall is not None else 'did not finish'}; "
                     f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{gpu}, torch {m.get('torch', '?')}")
    lines.append("")
    budgets = g.get("budgets", {})
    if budgets:
        rows = [[s, b["steps"], b["batch_size"], b["steps"] * b["batch_size"], f"{b['m']} + {b['m']}", 2 * b["m"],
                 b["target_l0"]] for s, b in budgets.items() if s in sources]
        lines += table(["source", "steps", "batch", "tokens", "E-SOSAE widths", "baseline width",
                        "target total L0"], rows)
        lines += [f"Every run of a source trains on the same tokens with seed {g.get('seed')} (run 9: "
                  f"seed + 1). Its sparsity knob (τ_T factor for E-SOSAE, λ for ReLU, k for TopK) is "
                  f"calibrated in up to {g.get('max_tries')} tries to land the held-out L0 within "
                  f"±{g.get('band', 0.2):.0%} of the target; the tables say which runs made it.", ""]
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for the grid folder ``out``; returns the report path."""
    out = Path(out)
    grid = load(out)
    lines = header(out, list(grid))
    for source, runs in grid.items():
        title = SOURCE_TITLES.get(source, source)
        lines += [f"## {title} (`{source}`)", "", "### Core metrics (held-out)", ""]
        lines += core_table(runs)
        lines += ["### Sparse probing", ""] + probing_tables(runs)
        lines += ["### AUC consistency", ""] + consistency_tables(runs)
        lines += ["### Curriculum", ""] + curriculum_table(runs)
        lines += ["### Calibration tries", ""] + calibration_table(runs)
        for name, fn, what in PLOTS:
            rel = Path(PLOTS_DIR) / f"{source}_{name}.png"
            if fn(runs, out / rel, f"{title}: {what}"):
                lines += [f"![{what}]({rel.as_posix()})", ""]
    path = out / REPORT_FILE
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "grid.json").is_file():
        print("python -m esosae.report: error: give one grid folder (the --out of esosae.experiments, "
              "with its grid.json)", file=sys.stderr)
        return 2
    print(write_report(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
