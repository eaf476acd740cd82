"""``python -m esosae.experiments``: a comparison grid (METHOD.md §8's, or the Pareto grid
of esosae.experiments.grid.pareto_grid), then its report.

    python -m esosae.experiments                       # the full grid: lm, easy, hard
    python -m esosae.experiments --quick               # ten tiny runs on the embedded model
    python -m esosae.experiments --runs 0,2 --sources lm --out experiments/two
    python -m esosae.experiments --grid pareto --plan  # the Pareto grid: its runs and estimated time

Layout of ``--out``::

    grid.json                               the budgets, seed and evaluation settings
    <source>/runNN_<name>/calibration.json  the knob's tries, the chosen one, status
    <source>/runNN_<name>/tryK/             one train.py run directory per try
    <source>/runNN_<name>/tryK/atoms.json    planted sources: per-atom frequency and best |cos|
    report.md, plots/*.png                  esosae.report, rewritten at every invocation
    runs/<source>/runNN_<name>.json         the Pareto grid: each run's figures, what its report reads

Resumable at any point: finished runs are skipped (a rerun of a finished grid trains
nothing and rewrites the report), an interrupted try resumes from its last checkpoint, and
a run that failed is reported and skipped until ``--retry-failed``. Runs go one after
another, or side by side in ``--jobs`` processes that split the CPU threads between them.

Across machines and fresh clones: with ``--publish DEST``, the finished runs already
published in DEST (its ``runs/`` JSON, same settings) count as done in ``--out`` and are
carried into its report (``adoptable``), so each invocation adds to the committed grid. A
run published mid-calibration (its tries' weights stayed on the machine that trained them)
is trained here from the knob its published tries lead to next (``earlier_tries``), not
from its first knob again; those tries stay in its JSON as ``earlier_tries``.
In the Pareto grid, seed 0 of every method and L0 goes first and the other seeds start
from its calibrated knobs (``start_knobs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from esosae.args import OneLineParser, add_fields
from esosae.config import ConfigError, PosInt, Range, Seed
from esosae.errors import UserError
from esosae.evals.config import EvalConfig
from esosae.experiments import calibrate, report
from esosae.experiments.grid import (
    ATOMS_FILE,
    CALIBRATION_FILE,
    GRID_FILE,
    QUICK_SEEDS,
    Budget,
    Variant,
    budgets,
    default_knob,
    method_of,
    pareto_budgets,
    seed_first,
    select,
    train_config,
)
from esosae.experiments.pareto_report import METHODS, RUNS_DIR
from esosae.run.atomic import atomic_write_text
from esosae.run.layout import EVAL_DIR

PROG = "python -m esosae.experiments"
EVAL_FILES = {"core": "core", "probing": "sparse_probing", "curriculum": "curriculum"}
"""Each evaluation (esosae.evals.run_all's names) and the eval/ file it writes."""
SOURCES = ("lm", "easy", "hard")
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
REPUBLISH_S = 60.0
"""With --publish, the report is rewritten and published after a finished run at most this often."""


@dataclass(frozen=True)
class Settings:
    """Everything that must stay the same across invocations on one ``--out`` folder."""

    grid: str
    quick: bool
    seed: int
    max_tries: int
    budgets: dict[str, Budget]
    evals: EvalConfig

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "quick": self.quick, "seed": self.seed, "max_tries": self.max_tries,
                "band": calibrate.BAND, "budgets": {k: asdict(b) for k, b in self.budgets.items()},
                "evals": asdict(self.evals)}


def eval_config(quick: bool, grid: str = "method") -> EvalConfig:
    """Every evaluation, probing every dataset at full size; ``quick`` probes two datasets on a
    few hundred texts (the Pareto grid's quick runs, many more: four planted atoms at k = 1 and 5)."""
    if quick and grid == "pareto":
        return EvalConfig(datasets=("sst2", "uci_sentiment"), train_size=200, test_size=100, k_values=(1, 5),
                          planted_atoms=4)
    if quick:
        return EvalConfig(datasets=("sst2", "uci_sentiment"), train_size=200, test_size=100)
    return EvalConfig(datasets=("all",))


# -- one run: calibrate, then evaluate the chosen try --------------------------------------


def _save(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(state, indent=1) + "\n")


def train_try(v: Variant, b: Budget, knob: float, seed: int, try_dir: Path,
              knob2: float | None = None) -> dict[str, Any]:
    """Train one try (resuming it if a checkpoint is there); the held-out headline metrics,
    the PCA floor at the try's target L0 and, on a planted source, ``atoms.json``."""
    from esosae.data.sources import SyntheticSource, atom_recovery
    from esosae.evals.core import pca_fvu
    from esosae.evals.summary import headline
    from esosae.run.checkpoint import latest_checkpoint
    from esosae.training.loop import run

    cfg = train_config(v, b, knob, seed, str(try_dir), knob2)
    resume = (latest_checkpoint(try_dir) is not None
              and report.read_json(try_dir / "config.json") == json.loads(json.dumps(cfg.to_dict())))
    if not resume and try_dir.exists():
        shutil.rmtree(try_dir)  # started, but nothing to resume from (or under other settings)
    trained = run(cfg, try_dir, resume=resume, progress=False)
    h = headline(trained)
    h["pca_fvu"] = pca_fvu(trained.source.heldout(), round(b.target(v)))
    if isinstance(trained.source, SyntheticSource):
        _, best = atom_recovery([trained.model.W_dec1, trained.model.W_dec2], trained.source.atoms)
        _save(try_dir / ATOMS_FILE, {"freq": trained.source.freqs.tolist(), "best_cos": best.tolist()})
    return h


def _knobs(v: Variant, b: Budget, state: dict[str, Any], exact: bool = False) -> tuple[float, float | None]:
    """The next try's knob (and τ₂ factor under a per-layer calibration). With ``exact``, once a
    try is in the band and no try lies on the target's other side, the next aims there, at
    the in-band try's mirror image target² / L0 but at least half the band from the target,
    so that the step outruns L0's try-to-try noise (a few %) and the tries bracket the target
    (``_matched``); under a per-layer calibration both τ factors then move together
    (``_across``)."""
    target, tries = b.target(v), state["attempts"]
    if not tries:
        return state["start"], (state.get("start2") or state["start"] if per_layer(v, b) else None)
    aim = target
    if exact and v.knob != "k":
        banded = [a for a in tries if calibrate.in_band(a["l0"], target, b.band)]
        if banded and not min(a["l0"] for a in tries) < target < max(a["l0"] for a in tries):
            near = min(banded, key=lambda a: abs(math.log(a["l0"] / target)))
            aim = target * min(target / near["l0"], 1 - b.band / 2) if near["l0"] > target else \
                target * max(target / near["l0"], 1 + b.band / 2)
            if per_layer(v, b):
                return _across(v, tries, near, aim, target, b.band)
    if not per_layer(v, b):
        knob = calibrate.next_knob(v.knob, [calibrate.Attempt(a["knob"], a["l0"]) for a in tries], aim)
        return (float(max(1, round(knob))) if v.knob == "k" else knob), None
    return tuple(calibrate.next_knob(v.knob, [calibrate.Attempt(a[k], a[l0] or 0.0) for a in tries], aim / 2)
                 for k, l0 in (("knob", "l0_1"), ("knob2", "l0_2")))  # type: ignore[return-value]


def _across(v: Variant, tries: list[dict[str, Any]], near: dict[str, Any], aim: float, target: float,
            band: float) -> tuple[float, float]:
    """A per-layer calibration's step across the target once a try is in the band: both τ
    factors of the in-band try ``near`` scaled by one c along the prior slope of the total L0,

        c = (aim / L0_near)^(2ⁿ / prior),   n = the tries after the first in-band one,

    all on ``near``'s side (else the target is bracketed): the layer ratio stays as
    calibrated, and a step that fell short doubles in log until one lands across. Per layer,
    a bracket would pair tries whose other τ differed (layer 1's L0 moves with τ₂ through
    training), and bisecting it crawls: 0.3% steps of τ₁ on the language model."""
    first = next(i for i, a in enumerate(tries) if calibrate.in_band(a["l0"], target, band))
    c = (aim / near["l0"]) ** (2 ** (len(tries) - 1 - first) / calibrate.PRIOR_SLOPE[v.knob])
    return near["knob"] * c, near["knob2"] * c


def _matched(v: Variant, b: Budget, attempts: list[calibrate.Attempt], target: float, exact: bool = False) -> bool:
    """Calibration is over: a try is in the band (the method grid: the last), and for a k
    (TopK, BatchTopK), or any knob with ``exact`` (the Pareto grid), a try has also landed
    within ``calibrate.EXACT`` of the target or tries lie on both sides of it, so that its
    figures can be read at the exact target (the try that brackets it need not be in the band:
    the closest try is the one chosen)."""
    l0s = [a.l0 for a in attempts]
    if v.knob != "k" and not exact:
        return calibrate.in_band(l0s[-1], target, b.band)
    if not any(calibrate.in_band(l0, target, b.band) for l0 in l0s):
        return False
    return any(abs(l0 / target - 1) <= calibrate.EXACT for l0 in l0s) or (min(l0s) < target < max(l0s))


def evals_of(v: Variant, s: Settings) -> tuple[str, ...]:
    """A run's evaluations: those of ``s.evals``; in the Pareto grid the ablations and the
    convergence runs skip sparse probing (the report's probing figures are the six methods'
    curves over L0), which on the language model is most of a run's evaluation time."""
    only = tuple(e for e in EVAL_FILES if e in s.evals.only)
    if s.grid == "pareto" and (method_of(v) not in METHODS or v.steps_factor != 1.0):
        return tuple(e for e in only if e != "probing")
    return only


def per_layer(v: Variant, b: Budget) -> bool:
    return b.per_layer and v.arch == "esosae" and v.layers == 2


def _try_core(try_dir: Path) -> dict[str, Any]:
    """A try's CE figures from its eval/core.json (empty when it has none)."""
    m = report.read_json(try_dir / EVAL_DIR / "core.json") or {}
    return m.get("eval_result_metrics", {}).get("model_performance_preservation", {})


def finished(out: Path, source: str, slug: str) -> dict[str, Any] | None:
    """A finished run's calibration ({'attempts', 'chosen', ...}): its own calibration.json, or
    the per-run JSON adopted from a published grid when ``out`` has no folder for it."""
    cal = report.read_json(out / source / slug / CALIBRATION_FILE)
    if cal is not None:
        return cal if cal.get("status") == "done" else None
    rec = report.read_json(out / RUNS_DIR / source / f"{slug}.json")
    if rec and rec.get("status") == "done" and rec.get("chosen") is not None:
        return {"attempts": rec["tries"], "chosen": rec["chosen"]}
    return None


def earlier_tries(out: Path, source: str, slug: str) -> list[dict[str, Any]]:
    """The tries of a run adopted unfinished from a published grid (``adoptable``): its JSON
    in ``out/runs/`` says training (or evaluating), and ``out`` has no folder for it; else []."""
    rec = report.read_json(out / RUNS_DIR / source / f"{slug}.json") or {}
    if rec.get("status") not in ("training", "evaluating") or (out / source / slug / CALIBRATION_FILE).exists():
        return []
    return [t for t in rec.get("tries") or [] if isinstance(t, dict) and t.get("l0")]


def start_knobs(v: Variant, b: Budget, out: Path, source: str,
                variants: tuple[Variant, ...]) -> tuple[float, float | None] | None:
    """The Pareto grid's first try from the chosen try of the nearest finished relative:

    1. the same method at the same L0 and steps, another seed: its knobs as they are;
    2. (λ, τ factors) the same method at the middle L0 and steps: moved to this target along
       the prior slope, knob · l0_factor^(1 / prior);
    3. (an ablation of v2) v2 at the same L0: its τ factors as they are.

    None (the source's defaults) when no relative has finished."""
    def knobs_of(u: Variant, move: float = 1.0) -> tuple[float, float | None] | None:
        cal = finished(out, source, u.slug)
        if cal is None:
            return None
        t = cal["attempts"][cal["chosen"]]
        return t["knob"] * move, (t["knob2"] * move if t.get("knob2") else None)

    name = method_of(v)
    same = [u for u in variants if method_of(u) == name and u.seed_offset != v.seed_offset
            and (u.l0_factor, u.steps_factor) == (v.l0_factor, v.steps_factor)]
    middle = [u for u in variants if method_of(u) == name and (u.l0_factor, u.steps_factor) == (1.0, 1.0)
              and u.run != v.run and v.knob != "k"]
    move = v.l0_factor ** (1 / calibrate.PRIOR_SLOPE[v.knob])
    parent = [u for u in variants if method_of(u) == "esosae_v2" and u.l0_factor == v.l0_factor
              and u.steps_factor == 1.0 and v.arch == "esosae" and name not in ("esosae_v1", "esosae_v2")]
    key = lambda u: (u.seed_offset != v.seed_offset, u.seed_offset)  # noqa: E731 (same seed first)
    for found in ([knobs_of(u) for u in sorted(same, key=key)] + [knobs_of(u, move) for u in sorted(middle, key=key)]
                  + [knobs_of(u) for u in sorted(parent, key=key)]):
        if found is not None:
            return found
    return None


def _keep_closest(state: dict[str, Any], attempts: list[calibrate.Attempt], target: float, band: float) -> None:
    """Calibration ends: the try closest to the target is chosen, and evaluated next."""
    state["chosen"] = calibrate.best(attempts, target)
    state["in_band"] = calibrate.in_band(attempts[state["chosen"]].l0, target, band)
    state["status"] = "evaluating"


def run_variant(v: Variant, b: Budget, s: Settings, vdir: Path, start_knob: tuple[float, float | None] | None,
                say: Any, earlier: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Calibrate ``v`` on ``b`` (or pick up where an earlier invocation stopped), evaluate the
    chosen try (on the language model also the CE figures of the try that the reading at the
    exact target pairs it with); returns calibration.json's contents. ``earlier``: the tries
    of an unfinished calibration published elsewhere that chose ``start_knob``, recorded."""
    from esosae.evals.run import run_all

    path = vdir / CALIBRATION_FILE
    state = report.read_json(path) or {}
    target, steps = b.target(v), b.steps_of(v)
    exact = s.grid == "pareto"
    done = [calibrate.Attempt(a["knob"], a["l0"]) for a in state.get("attempts", [])]
    if (state.get("status") == "done" and exact and done and len(done) < s.max_tries
            and not _matched(v, b, done, target, exact)):
        state["status"] = "training"  # finished before the tries had to bracket the target: one more
    if state.get("status") not in ("done", "training") or not state.get("attempts"):
        start, start2 = start_knob if start_knob is not None else (default_knob(v, b), None)
        if v.knob == "k":
            start = float(max(1, round(start)))
        state = {"run": v.run, "name": v.name, "note": v.note, "variant": asdict(v), "source": b.source,
                 "knob": v.knob, "target_l0": target, "band": b.band, "steps": steps, "start": start,
                 "start2": start2, "attempts": state.get("attempts", []), "pending": state.get("pending"),
                 "chosen": None, "status": "training", **({"earlier": earlier} if earlier else {})}
    while state["status"] == "training":
        attempts = [calibrate.Attempt(a["knob"], a["l0"]) for a in state["attempts"]]
        if attempts and (_matched(v, b, attempts, target, exact) or len(attempts) >= s.max_tries):
            _keep_closest(state, attempts, target, b.band)
            break
        pending = state.get("pending") or {}
        knob, knob2 = ((pending["knob"], pending["knob2"]) if pending.get("try") == f"try{len(attempts)}"
                       else _knobs(v, b, state, exact))  # an interrupted try resumes with its own knobs
        if v.knob == "k" and any(a.knob == knob for a in attempts):  # no other integer k is nearer: step by 1
            knob = attempts[-1].knob + (1.0 if attempts[-1].l0 < target else -1.0)
            if any(a.knob == knob for a in attempts) or knob < 1:  # both neighbours tried: keep the closest
                _keep_closest(state, attempts, target, b.band)
                break
        name = f"try{len(attempts)}"
        shown = f"{knob:.4g}" + (f", τ₂ factor {knob2:.4g}" if knob2 is not None else "")
        say(f"{v.slug}: {name}, {v.knob} = {shown} ({steps} steps × {b.batch_size})")
        state["pending"] = {"try": name, "knob": knob, "knob2": knob2}
        _save(path, state)
        t0 = time.perf_counter()
        h = train_try(v, b, knob, s.seed, vdir / name, knob2)
        state.pop("pending")
        state["attempts"].append({"try": name, "knob": knob, "knob2": knob2, "l0": h["l0"], "l0_1": h.get("l0_1"),
                                  "l0_2": h.get("l0_2"), "fvu": h["fvu"], "pca_fvu": h["pca_fvu"],
                                  "wall_s": time.perf_counter() - t0})
        _save(path, state)
        say(f"{v.slug}: {name} → L0 {h['l0']:.1f} (target {target:g} ± {b.band:.0%}), "
            f"FVU {h['fvu']:.3f}, {time.perf_counter() - t0:.0f} s")
    chosen = vdir / state["attempts"][state["chosen"]]["try"]
    only = evals_of(v, s)
    missing = [e for e in only if not (chosen / EVAL_DIR / f"{EVAL_FILES[e]}.json").is_file()]
    if missing:
        t0 = time.perf_counter()
        run_all(chosen, only=only, progress=False, config=s.evals)
        say(f"{v.slug}: evaluated {chosen.name} ({time.perf_counter() - t0:.0f} s)")
    if b.source == "lm":  # the CE figures of the interpolation's other try (one forward pass each)
        pair = calibrate.interpolate(state["attempts"], target, "fvu")
        for name in (pair or {}).get("from", []):
            if not _try_core(vdir / name):
                run_all(vdir / name, only=["core"], progress=False, config=s.evals)
        for a in state["attempts"]:
            ce = _try_core(vdir / a["try"])
            if ce:
                a.update(ce_loss_score=ce["ce_loss_score"], ce_delta_nats=ce.get("ce_delta_nats"),
                         kl_div=ce.get("kl_div"))
    state["status"] = "done"
    _save(path, state)
    return state


def run_source(source: str, variants: tuple[Variant, ...], s: Settings, out: Path, retry_failed: bool,
               threads: int | None) -> dict[str, str]:
    """Every variant of one source, in order; {slug: 'done' | 'failed' | 'interrupted'}. In the
    Pareto grid each run's first try comes from ``start_knobs`` over the whole grid."""
    from esosae.experiments.grid import GRIDS

    from esosae.training.loop import Interrupted

    if threads is not None:
        torch.set_num_threads(threads)
    b = s.budgets[source]
    result: dict[str, str] = {}

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} {source}] {msg}", flush=True)

    for i, v in enumerate(variants, 1):
        vdir = out / source / v.slug
        state = report.read_json(vdir / CALIBRATION_FILE) or {}
        if not state and finished(out, source, v.slug):
            result[v.slug] = "done"  # adopted from the published grid
            continue
        vdir.mkdir(parents=True, exist_ok=True)
        if state.get("status") == "failed" and not retry_failed:
            say(f"{v.slug} ({i}/{len(variants)}): failed earlier, skipped (--retry-failed to rerun): {state['error']}")
            result[v.slug] = "failed"
            continue
        earlier = earlier_tries(out, source, v.slug) if s.grid == "pareto" else []
        if earlier:  # published mid-calibration: go on from the knob its tries lead to
            start = _knobs(v, b, {"attempts": earlier}, exact=True)
            say(f"{v.slug}: its calibration was published unfinished after {len(earlier)} tries "
                "(their weights are not here); it goes on from the knob they lead to")
        elif s.grid == "pareto":
            start = start_knobs(v, b, out, source, GRIDS["pareto"])
        else:  # the method grid: runs after 2 start from run 2's τ factor
            ref = report.read_json(out / source / "run02_esosae" / CALIBRATION_FILE) if v.run > 2 else None
            start = ((ref["attempts"][ref["chosen"]]["knob"], None)
                     if ref and ref.get("status") == "done" and v.knob == "tau_scale" else None)
        if state.get("status") != "done":
            say(f"{v.slug}{f' ({i}/{len(variants)})' if len(variants) > 1 else ''}: {v.note}")
        try:
            run_variant(v, b, s, vdir, start, say, earlier)
            result[v.slug] = "done"
        except UserError:
            raise  # bad input (model, dataset, cache): the same for every run; one line, exit 2
        except (Interrupted, KeyboardInterrupt):
            say(f"{v.slug}: interrupted; rerun the same command to continue")
            result[v.slug] = "interrupted"
            break
        except Exception as e:  # one broken run must not stop the grid: record it, go on
            state = report.read_json(vdir / CALIBRATION_FILE) or {"run": v.run, "name": v.name, "attempts": []}
            state.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0],
                         traceback=traceback.format_exc())
            _save(vdir / CALIBRATION_FILE, state)
            say(f"{v.slug}: FAILED ({state['error']}); continuing")
            result[v.slug] = "failed"
    return result


# -- the plan and its estimated time -------------------------------------------------------

SECONDS_PER_STEP = {"lm": 0.47, "easy": 0.06, "hard": 0.115}
"""Seconds per training step of the first grid's full budgets (1,024 tokens; lm 2 × 1,152
features, easy 2 × 256, hard 2 × 1,024), two runs side by side on the 2-core machine
(docs/results/report.md's calibration tables); scaled by batch × width for other budgets."""
EVAL_SECONDS = {"lm": 240.0, "easy": 20.0, "hard": 40.0}
"""Seconds for a run's evaluations (lm: CE with KL, sparse probing on 8 tasks), a rough figure."""
REF_WIDTH = {"lm": 1152, "easy": 256, "hard": 1024}


def seconds_per_step(source: str, b: Budget, out: Path) -> tuple[float, str]:
    """This grid's own seconds per step on ``source``: the median over its finished tries, so
    that tries slowed by other work on the machine (a test suite, a second grid) do not set
    the estimate; else the first grid's scaled to ``b``; and which one it is."""
    rates = [a["wall_s"] / cal.get("steps", b.steps) for p in out.glob(f"{source}/run*/{CALIBRATION_FILE}")
             for cal in [report.read_json(p) or {}] for a in cal.get("attempts", []) if a.get("wall_s")]
    if rates:
        return float(np.median(rates)), f"median of {len(rates)} tries"
    scale = b.batch_size * b.m / (1024 * REF_WIDTH[source])
    return SECONDS_PER_STEP[source] * scale, "the first grid's rate"


def plan(sources: list[str], variants: tuple[Variant, ...], s: Settings, out: Path, jobs: int,
         adopted: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """One line per source: runs, the ones still to train (``adopted`` slugs count as done),
    and the estimated wall time: three tries per calibrated run, 1.5 for TopK and for a Pareto
    run that starts from a relative's knobs (another seed of its method and L0 runs first), at
    the rate of ``seconds_per_step``, plus ``EVAL_SECONDS`` per run, halved for two runs side
    by side (the rate was measured so)."""
    lines, total = [], 0.0
    for src in sources:
        b, vs = s.budgets[src], variants
        todo = [v for v in vs if finished(out, src, v.slug) is None and f"{src}/{v.slug}" not in adopted]
        rate, how = seconds_per_step(src, b, out)
        firsts = {(method_of(v), v.l0_factor, v.steps_factor) for v in vs if v.seed_offset == 0}
        tries = [1.5 if v.arch == "topk" or (s.grid == "pareto" and (method_of(v), v.l0_factor, v.steps_factor)
                                             not in firsts) else min(3, s.max_tries) for v in todo]
        secs = sum(n * b.steps_of(v) * rate + EVAL_SECONDS[src] for n, v in zip(tries, todo)) / 2  # side by side
        total += secs
        lines.append(f"plan {src}: {len(vs)} runs ({len(vs) - len(todo)} done), {b.steps} steps × {b.batch_size}, "
                     f"target L0 {b.target_l0:g} ± {b.band:.0%}; ~{secs / 3600:.1f} h left ({how})")
    lines.append(f"plan total: ~{total / 3600:.1f} h on 2 cores with --jobs {jobs}")
    return lines


def run_parallel(sources: list[str], variants: tuple[Variant, ...], s: Settings, out: Path, retry_failed: bool,
                 jobs: int, results: dict[str, dict[str, str]], finished_one: Any = None) -> None:
    """Runs side by side in ``jobs`` processes of cores/jobs threads each, in the order given;
    in the method grid a source's runs after run 2 wait for it (they start from its calibrated
    knob). ``finished_one()`` is called after every run that ends."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    chained = s.grid == "method"  # its runs after run 2 start from run 2's knob
    first = [(src, v) for src in sources for v in variants if v.run <= 2 or not chained]
    later = {src: [v for v in variants if v.run > 2 and chained] for src in sources}
    has_run2 = chained and any(v.run == 2 for v in variants)
    queue = first + ([] if has_run2 else [(src, v) for src in sources for v in later.pop(src)])
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"))
    running: dict[Future, tuple[str, Variant]] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                src, v = queue.pop(0)
                running[pool.submit(run_source, src, (v,), s, out, retry_failed, threads)] = (src, v)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                src, v = running.pop(fut)
                results[src].update(fut.result())
                if "interrupted" in results[src].values():
                    raise KeyboardInterrupt
                if chained and v.run == 2:
                    queue += [(src, w) for w in later.pop(src, [])]
                if finished_one is not None:
                    finished_one()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- the command ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GridFlags:
    """The flags of ``python -m esosae.experiments`` (esosae.args builds the parser from these)."""

    grid: str = "method"
    """Which grid: method (the ten runs of METHOD.md §8), v2 (baselines, v1, v2 and each v2 mechanism) or
    pareto (six methods × three L0s × three seeds, eight ablations, a convergence check)."""
    out: str | None = None
    """Output folder (default: experiments/method, or experiments/quick with --quick)."""
    quick: bool = False
    """Tiny budgets: the ten runs in minutes on 2 CPU cores."""
    tokens: PosInt | None = None
    """Training tokens per language-model run (default: 307,200)."""
    synthetic_steps: PosInt | None = None
    """Steps per planted-source run (default: 1,000)."""
    sources: str | None = None
    """Comma list of lm, easy, hard (default: all three; with --quick lm alone, easy for the pareto grid)."""
    runs: str | None = None
    """Comma list of run numbers or ranges a-b (default: all)."""
    seed: Seed = 0
    """Seed of every run (plus the variant's seed offset: run 9 of the method grid, the pareto grid's seeds 1, 2)."""
    max_tries: Annotated[int, Range(ge=1)] | None = None
    """Calibration tries per run (default: 3, 2 with --quick; the pareto grid 6, 4 with --quick)."""
    jobs: Annotated[int, Range(ge=1)] = min(2, os.cpu_count() or 1)
    """Runs trained side by side, each on cores/jobs threads (default: 2, or 1 on one core)."""
    retry_failed: bool = False
    """Rerun runs that failed in an earlier invocation."""
    plan: bool = False
    """Print the plan (runs per source, those left, estimated time) and exit."""
    publish: str | None = None
    """After the report, copy report.md, grid.json, plots/ and runs/ (the per-run JSON) to this folder."""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Run the METHOD.md §8 comparison grid and write its report.")
    add_fields(p, GridFlags, defaults=True)
    return p


def _int_list(text: str, flag: str) -> list[int]:
    """'0,3,5-7' → [0, 3, 5, 6, 7]."""
    try:
        out: list[int] = []
        for t in (t.strip() for t in text.split(",") if t.strip()):
            lo, _, hi = t.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
        return out
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list of integers or ranges a-b (got {text!r})") from None


def prepare(argv: list[str]) -> tuple[Settings, Path, list[str], tuple[Variant, ...], argparse.Namespace]:
    """Parse and check everything; writes nothing."""
    ns = build_parser().parse_args(argv)
    quick_source = "easy" if ns.grid == "pareto" else "lm"  # the Pareto grid's many runs: the fast source
    sources = [t.strip() for t in (ns.sources or (quick_source if ns.quick else ",".join(SOURCES))).split(",")
               if t.strip()]
    bad = [t for t in sources if t not in SOURCES]
    if bad or not sources:
        raise ConfigError(f"--sources takes a comma list of {', '.join(SOURCES)} (got {ns.sources!r})")
    variants = select(ns.grid, _int_list(ns.runs, "--runs") if ns.runs else None)
    if ns.grid == "pareto" and ns.quick:
        variants = tuple(v for v in variants if v.seed_offset < QUICK_SEEDS)
    if ns.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (got {ns.jobs})")
    max_tries = ns.max_tries if ns.max_tries is not None else {("method", False): 3, ("method", True): 2,
                                                                ("pareto", False): 6, ("pareto", True): 4}[ns.grid, ns.quick]
    if max_tries < 1:
        raise ConfigError(f"--max-tries must be >= 1 (got {max_tries})")
    b = (pareto_budgets(ns.quick, ns.tokens, ns.synthetic_steps) if ns.grid == "pareto"
         else budgets(ns.quick, ns.tokens, ns.synthetic_steps))
    s = Settings(ns.grid, ns.quick, ns.seed, max_tries, b, eval_config(ns.quick, ns.grid))
    out = Path(ns.out or f"experiments/{'quick' if ns.quick else ns.grid}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if ns.publish and Path(ns.publish).resolve() == out.resolve():
        raise ConfigError(f"--publish {ns.publish} is the --out folder itself; publish to another folder "
                          "(e.g. docs/results/pareto)")
    if ns.publish and Path(ns.publish).exists() and not Path(ns.publish).is_dir():
        raise ConfigError(f"--publish {ns.publish} is a file; give a folder")
    old = report.read_json(out / GRID_FILE)
    if old is None and (out / GRID_FILE).exists():
        raise ConfigError(f"{out / GRID_FILE} is not valid JSON; delete it (or the folder) to start over")
    begun = [src for src in sources if any((out / src).glob("run*")) or any((out / RUNS_DIR / src).glob("*.json"))]
    diff = settings_diff(old, s, begun) if old is not None else []  # a source with no run yet takes new budgets
    if diff:
        raise ConfigError(f"{out} holds a grid run with other settings ({', '.join(diff)}); "
                          "use another --out or the same flags as before")
    if ns.grid == "pareto":
        variants = seed_first(variants)
    return s, out, sources, variants, ns


def settings_diff(old: dict[str, Any], s: Settings, sources: list[str]) -> list[str]:
    """The settings in which a grid.json differs from ``s`` (budgets: of ``sources`` only)."""
    new = json.loads(json.dumps(s.to_dict()))
    diff = [k for k in ("grid", "quick", "seed", "max_tries", "evals") if old.get(k) != new[k]]
    return diff + [f"budgets.{src}" for src in sources if src in old.get("budgets", {})
                   and old["budgets"][src] != new["budgets"][src]]


def adoptable(dest: Path, out: Path, s: Settings) -> dict[str, Path]:
    """{'source/slug': path} of the runs published in ``dest`` (a --publish folder) that ``out``
    has neither trained nor adopted, when dest's grid.json has the settings of ``s`` for their
    sources; else {} (a grid with other settings is never mixed in). The finished ones, and
    those published mid-calibration with tries (``earlier_tries``), so that a publish from
    ``out`` keeps them too."""
    g = report.read_json(dest / GRID_FILE)
    if g is None:
        return {}
    found = {}
    for path in sorted((dest / RUNS_DIR).glob("*/*.json")):
        src, slug = path.parent.name, path.stem
        rec = report.read_json(path) or {}
        if ((rec.get("status") == "done" or (rec.get("status") in ("training", "evaluating") and rec.get("tries")))
                and src in s.budgets and not (out / src / slug / CALIBRATION_FILE).exists()
                and not (out / RUNS_DIR / src / path.name).exists()):
            found[f"{src}/{slug}"] = path
    if settings_diff(g, s, sorted({k.split("/")[0] for k in found})):
        return {}
    return found


def adopt(dest: Path, out: Path, s: Settings, found: dict[str, Path]) -> None:
    """Copy the ``adoptable`` runs into ``out/runs/`` (and, into a new ``out``, dest's grid.json
    with its invocations and its reading.md), so that ``out``'s report carries them."""
    for key, path in found.items():
        to = out / RUNS_DIR / key.split("/")[0] / path.name
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, to)
    for name in (GRID_FILE, "reading.md"):
        if found and (dest / name).is_file() and not (out / name).exists():
            shutil.copy2(dest / name, out / name)


def machine() -> dict[str, Any]:
    """The CPU (as /proc/cpuinfo names it), its cores, torch, and the GPU if any."""
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu}


def record_invocation(out: Path, s: Settings, argv: list[str], sources: list[str], index: int | None = None,
                      wall_s: float | None = None) -> int:
    """grid.json: the settings (the budgets of ``sources``, the others' as recorded before),
    and every invocation's command, machine, date and wall time. A new invocation is
    appended (returns its index); ``index`` fills in its wall time."""
    old = report.read_json(out / GRID_FILE) or {}
    d = s.to_dict()
    d["budgets"] = {**old.get("budgets", {}), **{src: d["budgets"][src] for src in sources}}
    calls = old.get("invocations", [])
    if index is None:
        calls.append({"command": " ".join([PROG, *argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "machine": machine(), "load": round(os.getloadavg()[0], 1), "wall_s": None})
        index = len(calls) - 1
    else:
        calls[index]["wall_s"] = wall_s
    d["invocations"] = calls
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / GRID_FILE, json.dumps(d, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        s, out, sources, variants, ns = prepare(argv)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    found = adoptable(Path(ns.publish), out, s) if ns.publish else {}
    done = {k for k, path in found.items() if (report.read_json(path) or {}).get("status") == "done"}
    for line in plan(sources, variants, s, out, ns.jobs, done):
        print(line, flush=True)
    if ns.plan:
        return 0
    if found:
        adopt(Path(ns.publish), out, s, found)
        print(f"adopted {len(done)} finished runs published in {ns.publish}"
              + (f" and {len(found) - len(done)} published mid-calibration" if len(found) > len(done) else ""),
              flush=True)
    me = record_invocation(out, s, argv, sources)
    t0 = time.perf_counter()
    results: dict[str, dict[str, str]] = {src: {} for src in sources}
    interrupted = False

    published = [time.perf_counter()]

    def finished_one() -> None:  # the published report follows the finished runs, at most once a minute
        if ns.publish and time.perf_counter() - published[0] > REPUBLISH_S:
            report.write_report(out)
            report.publish(out, Path(ns.publish))
            published[0] = time.perf_counter()

    try:
        if ns.jobs == 1:
            for src, v in ((src, v) for src in sources for v in variants):
                results[src].update(run_source(src, (v,), s, out, ns.retry_failed, None))
                if "interrupted" in results[src].values():
                    break
                finished_one()
        else:
            run_parallel(sources, variants, s, out, ns.retry_failed, ns.jobs, results, finished_one)
    except KeyboardInterrupt:
        interrupted = True
    except UserError as e:  # e.g. the language model or dataset cannot be found: same for every run
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    record_invocation(out, s, argv, sources, me, time.perf_counter() - t0)
    path = report.write_report(out)
    if ns.publish:
        report.publish(out, Path(ns.publish))
    states = [st for r in results.values() for st in r.values()]
    print(f"report: {path} ({time.perf_counter() - t0:.0f} s; "
          f"{states.count('done')} done, {states.count('failed')} failed)")
    if interrupted or "interrupted" in states:
        print(f"{PROG}: interrupted; rerun the same command to finish the remaining runs", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if "failed" in states else 0
