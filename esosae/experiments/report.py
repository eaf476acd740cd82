"""The grid's report: ``report.md`` and ``plots/*.png`` from the files a grid run wrote.

Every number comes from a file under the grid folder: ``grid.json`` (settings,
invocations), each run's ``calibration.json`` (the knob's tries) and, in the chosen try's
run directory, ``eval/{core,sparse_probing,curriculum}.json``, ``metrics.jsonl`` and
``sae/sae.safetensors`` (margins μ and decoders, for the histograms) and ``config.json``
(the clamp bounds μ_min/μ_max and ρ the histograms mark). Which run is the full method
and which ablates what comes from the grid's variants (``esosae.experiments.grid``), the
k of the probing tables from the grid's evaluation settings. A ``reading.md`` next to
``grid.json``, if present, is placed at the top. The figures are drawn with the shared
helpers of ``esosae.evals.plots``.

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

import matplotlib.pyplot as plt  # its backend: Agg, chosen by esosae.evals.plots
import numpy as np
from safetensors.numpy import load_file

from esosae.config import ConfigError, SAEConfig, TrainConfig
from esosae.evals import plots
from esosae.evals.config import EvalConfig
from esosae.experiments.grid import CALIBRATION_FILE, GRID_FILE, GRIDS, Variant, ablations, full_method
from esosae.run.atomic import atomic_write_text
from esosae.run.layout import CONFIG_FILE, EVAL_DIR, METRICS_FILE, PLOTS_DIR, SAE_DIR, SAE_WEIGHTS, read_metrics

REPORT_FILE = "report.md"
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

    def setting(self, name: str) -> Any:
        """A setting of the grid variant this run trained (``calibration.json``'s copy of it)."""
        return self.cal["variant"][name]

    def sae_config(self) -> SAEConfig:
        """The SAE settings in the run's ``config.json`` (the defaults when it cannot be read)."""
        try:
            return TrainConfig.from_json(self.dir / CONFIG_FILE).sae
        except ConfigError:
            return SAEConfig()


@dataclass(frozen=True)
class Grid:
    """What the report needs from ``grid.json``: the grid's variants and the probing's k."""

    variants: tuple[Variant, ...]
    k_values: tuple[int, ...]

    @classmethod
    def read(cls, out: Path) -> Grid:
        g = _json(out / GRID_FILE)
        k = _get(g, "evals", "k_values")
        return cls(GRIDS.get(g.get("grid", "method"), ()), tuple(k) if k else EvalConfig().k_values)

    def compared(self, runs: list[GridRun], setting: str) -> list[GridRun]:
        """The finished runs of the full method and of the variants that change ``setting``
        alone (grid.ablations), in run order: what a plot or table of that ablation compares."""
        full = full_method(self.variants)
        wanted = {v.run for v in ablations(setting, self.variants)} | ({full.run} if full else set())
        return [r for r in runs if r.done and r.run in wanted]


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
    for cal_path in sorted(out.glob(f"*/run*/{CALIBRATION_FILE}")):
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


NUMBERS = {2: "two", 3: "three", 4: "four"}


def _and(items: Any) -> str:
    """'2', '2 and 9', '2, 9 and 10'."""
    words = [str(x) for x in items]
    return " and ".join(filter(None, [", ".join(words[:-1]), words[-1]])) if words else ""


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


def probing_tables(runs: list[GridRun], grid: Grid) -> list[str]:
    done = [r for r in runs if r.done and r.probing]
    if not done:
        return ["No sparse-probing results.", ""]
    ks = grid.k_values
    out = []
    for what, name in (("accuracy", "test accuracy"), ("auc", "test AUC")):
        head = ["run", "variant"] + [f"top-{k}" for k in ks] + ["all features"]
        rows = [[r.run, r.cal.get("name", r.slug)] + [_get(r.probing, "sae", f"sae_top_{k}_test_{what}") for k in ks]
                + [_get(r.probing, "sae", f"sae_test_{what}")] for r in done]
        llm = done[0].probing.get("llm", {})
        rows.append(["llm", "the model's own units"] + [llm.get(f"llm_top_{k}_test_{what}") for k in ks]
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


def consistency_tables(runs: list[GridRun], grid: Grid) -> list[str]:
    done = [r for r in runs if r.done and r.probing]
    if not done:
        return []
    keys = [f"top_{k}_" for k in grid.k_values] + [""]
    head = ["run", "variant"] + [f"top-{k}" for k in grid.k_values] + ["all features"]
    rows = [[r.run, r.cal.get("name", r.slug)] + [_get(r.probing, "consistency", f"sae_{k}test_auc_task_std")
                                                   for k in keys] for r in done]
    out = ["Standard deviation of the test AUC across tasks:", ""] + table(head, rows)
    seeds = grid.compared(done, "seed_offset")  # the full method and its other seeds
    if len(seeds) >= 2:
        per_task = [{d["dataset_name"]: d for d in r.probing_details} for r in seeds]
        tasks = sorted(set.intersection(*(set(p) for p in per_task)))
        seed_rows = []
        for label, across_tasks in (("std of the mean AUC", False),
                                    ("mean over datasets of the per-dataset std", True)):
            row: list[Any] = [label]
            for k in keys:
                key = f"sae_{k}test_auc"
                if not across_tasks:
                    vals = [_get(r.probing, "sae", key) for r in seeds]
                    row.append(statistics.stdev(vals) if None not in vals else None)
                else:
                    stds = [statistics.stdev([p[t][key] for p in per_task]) for t in tasks
                            if all(key in p[t] for p in per_task)]
                    row.append(statistics.fmean(stds) if stds else None)
            seed_rows.append(row)
        n = NUMBERS.get(len(seeds), str(len(seeds)))
        out += [f"Across the {n} seeds of runs {_and(r.run for r in seeds)} (sample std of {n} values):", ""]
        out += table(["", *head[2:]], seed_rows)
    return out


# -- plots ---------------------------------------------------------------------------------


def curves_plot(runs: list[GridRun], grid: Grid, path: Path, title: str) -> bool:
    """τ(t), L0(t), FVU(t), dead %(t) of the full method and its schedule ablations
    (exp / linear / const: runs 2, 3, 4 of the method grid) overlaid."""
    chosen = grid.compared(runs, "schedule")
    if not chosen:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for r in chosen:
        recs = r.records()
        step = [x["step"] for x in recs]
        label = f"run {r.run}: {r.setting('schedule')}"
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
    plots.save(fig, path)
    return True


def probing_plot(runs: list[GridRun], grid: Grid, path: Path, title: str) -> bool:
    """Every finished run's sparse probing against k, and the model's own units."""
    done = [r for r in runs if r.done and r.probing]
    if not done:
        return False
    plots.probing_plot([(f"{r.run}: {r.cal.get('name')}", r.probing.get("sae", {})) for r in done],
                       ("llm", done[0].probing.get("llm", {})), grid.k_values, path, title)
    return True


def margins_plot(runs: list[GridRun], grid: Grid, path: Path, title: str) -> bool:
    """Final μ of both layers, the full method (clamped) against its clamping ablation (run 2
    against run 5 of the method grid); dotted: the clamp bounds of the clamped runs' configs."""
    pair = grid.compared(runs, "clamp_margins")
    if not pair:
        return False
    mus = {r.run: np.concatenate([r.weights()[k] for k in ("mu1", "mu2")]) for r in pair}
    lo = min(float(m.min()) for m in mus.values())
    hi = max(float(m.max()) for m in mus.values())
    bins = np.geomspace(max(lo, 1e-6) * 0.9, hi * 1.1, 60) if hi > lo else 30
    clamped = [r.sae_config() for r in pair if r.setting("clamp_margins")] or [SAEConfig()]
    plots.histogram_plot([(f"run {r.run}: {'clamped' if r.setting('clamp_margins') else 'unclamped'}", mus[r.run])
                          for r in pair], path, title, "margin μ (both layers; dotted: the clamp bounds)",
                         "features", bins=bins, marks=sorted({b for c in clamped for b in (c.mu_min, c.mu_max)}),
                         xlog=True, alpha=0.6)
    return True


def cosine_plot(runs: list[GridRun], grid: Grid, path: Path, title: str) -> bool:
    """|cos| between every layer-1 and layer-2 decoder row: the full method against its
    orthogonality ablation (γ = 0; run 2 against run 8 of the method grid); dotted: ρ."""
    pair = grid.compared(runs, "orthogonality")
    if not pair:
        return False
    samples, rhos = [], set()
    for r in pair:
        w = r.weights()
        w1 = w["W_dec1"] / np.linalg.norm(w["W_dec1"], axis=1, keepdims=True)
        w2 = w["W_dec2"] / np.linalg.norm(w["W_dec2"], axis=1, keepdims=True)
        cos = np.abs(w1 @ w2.T).ravel()  # (m1·m2,)
        on = r.setting("orthogonality")
        rhos |= {r.sae_config().orth_margin} if on else set()
        samples.append((f"run {r.run}: {'orthogonality on' if on else 'γ = 0'} (max {cos.max():.2f})", cos))
    plots.histogram_plot(samples, path, title, "|cos(W_dec1[i], W_dec2[j])| (dotted: ρ)", "density", bins=100,
                         marks=sorted(rhos or {SAEConfig().orth_margin}), ylog=True, histtype="step", density=True)
    return True


def fvu_l0_plot(runs: list[GridRun], grid: Grid, path: Path, title: str) -> bool:
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
    plots.save(fig, path)
    return True


PLOTS = (("curves", curves_plot, "τ, L0, FVU and dead % over training (exp / linear / const)"),
         ("probing", probing_plot, "sparse probing against k"),
         ("margins", margins_plot, "final margins with and without clamping"),
         ("cosines", cosine_plot, "cross-layer |cos| with and without orthogonality"),
         ("fvu_l0", fvu_l0_plot, "FVU against L0"))


# -- the report ----------------------------------------------------------------------------


def header(out: Path, sources: list[str], grid: Grid) -> list[str]:
    g = _json(out / GRID_FILE)
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
        reseeded = "; ".join(f"run {v.run}: seed + {v.seed_offset}" for v in ablations("seed_offset", grid.variants))
        lines += [f"Every run of a source trains on the same tokens with seed {g.get('seed')}"
                  f"{f' ({reseeded})' if reseeded else ''}. Its sparsity knob (τ_T factor for E-SOSAE, λ for "
                  f"ReLU, k for TopK) is calibrated in up to {g.get('max_tries')} tries to land the held-out L0 within "
                  f"±{g.get('band', 0.2):.0%} of the target; the tables say which runs made it.", ""]
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for the grid folder ``out``; returns the report path.
    A Pareto grid's report is esosae.experiments.pareto_report's."""
    out = Path(out)
    if _json(out / GRID_FILE).get("grid") == "pareto":
        from esosae.experiments import pareto_report

        return pareto_report.write(out)
    found, grid = load(out), Grid.read(out)
    lines = header(out, list(found), grid)
    for source, runs in found.items():
        title = SOURCE_TITLES.get(source, source)
        lines += [f"## {title} (`{source}`)", "", "### Core metrics (held-out)", ""]
        lines += core_table(runs)
        lines += ["### Sparse probing", ""] + probing_tables(runs, grid)
        lines += ["### AUC consistency", ""] + consistency_tables(runs, grid)
        lines += ["### Curriculum", ""] + curriculum_table(runs)
        lines += ["### Calibration tries", ""] + calibration_table(runs)
        for name, fn, what in PLOTS:
            rel = Path(PLOTS_DIR) / f"{source}_{name}.png"
            if fn(runs, grid, out / rel, f"{title}: {what}"):
                lines += [f"![{what}]({rel.as_posix()})", ""]
    path = out / REPORT_FILE
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


PUBLISHED = (REPORT_FILE, GRID_FILE, "reading.md", PLOTS_DIR, "runs")
"""What ``publish`` copies: the report, its plots, and the small JSON it was written from."""


def publish(out: Path, dest: Path) -> None:
    """Copy the report of ``out``, its plots and the JSON behind it to ``dest`` (e.g.
    docs/results/pareto), replacing what an earlier publish put there."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        src, to = out / name, dest / name
        if src.is_dir():
            shutil.rmtree(to, ignore_errors=True)
            shutil.copytree(src, to)
        elif src.is_file():
            shutil.copy2(src, to)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / GRID_FILE).is_file():
        print("python -m esosae.report: error: give one grid folder (the --out of esosae.experiments, "
              "with its grid.json)", file=sys.stderr)
        return 2
    print(write_report(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
