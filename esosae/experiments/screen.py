"""``python -m esosae.experiments.screen``: the v2 mechanisms against the baselines, on the CPU.

Each candidate (a grid ``Variant``) trains on one source under a small budget: seed 0
calibrates the sparsity knob to the target total L0 (``esosae.experiments.calibrate``,
as the grid does), the other seeds reuse the chosen knob, so every seed of a candidate
has the same settings and the spread across seeds is the seed noise. One JSON per
(source, candidate, seed) is written under ``--out`` as soon as that run finishes, and a
run whose JSON is there is skipped: the script resumes where it stopped.

    python -m esosae.experiments.screen --sources hard,lm --seeds 0,1 --out docs/results/method-v2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from esosae.config import RECOVERING_CONTROLLER, V1_METHOD
from esosae.experiments import calibrate
from esosae.experiments.grid import Budget, Variant, default_knob, train_config
from esosae.run.atomic import atomic_write_text

BUDGETS = {
    # 512 atoms in 64 dimensions: a dual SAE of 2 × 512 (baselines 1,024 wide), 500 × 512 tokens
    "hard": Budget("hard", 500, 512, 512, 8.0),
    # the default hook of the embedded SmolLM2, half the default widths, 150 × 1,024 tokens
    "lm": Budget("lm", 150, 1024, 576, 16.0),
}
AUX_K = {"hard": 32, "lm": 288}
"""k_aux = d / 2 per source (Gao et al. 2024)."""

V1 = tuple(V1_METHOD.items())
CTL = tuple(RECOVERING_CONTROLLER.items())
"""The v2ctl candidates pin the recovering controller (the defaults moved while they ran).
Every E-SOSAE candidate but ``v2ctl_tau1`` ran with v1's τ_T split on the language model
(``v1_taus``): 0.2 / 0.55 times the knob."""


def candidates(source: str) -> tuple[Variant, ...]:
    """The screened variants of one source, most informative first."""
    aux = (("aux_k", AUX_K[source]),)
    learned = (("margins", "learned"),)
    l0 = learned + (("sparsity", "l0"),)
    return (
        Variant(1, "topk", arch="topk", note="TopK baseline"),
        Variant(2, "v1", v1_taus=True, extra=V1, note="E-SOSAE v1 (freq_ema 0.99, band 10, no freeze)"),
        Variant(3, "v2ctl", v1_taus=True, extra=CTL, note="recovering controller (freq_ema 0.9, band 3, freeze 0.3)"),
        Variant(4, "learned_l0", v1_taus=True, extra=CTL + l0, note="learned clamped margins, L0 via STE"),
        Variant(5, "batchtopk", arch="batchtopk", note="BatchTopK baseline"),
        Variant(6, "v2ctl_aux", v1_taus=True, extra=CTL + aux, note="recovering controller + AuxK"),
        Variant(7, "learned_l0_aux", v1_taus=True, extra=CTL + l0 + aux, note="learned margins, L0, AuxK"),
        Variant(8, "learned_l1", v1_taus=True, extra=CTL + learned, note="learned clamped margins, L1"),
        Variant(9, "jumprelu", arch="jumprelu", note="JumpReLU baseline (learned θ, L0 via STE)"),
        Variant(10, "v2ctl_rows", v1_taus=True, extra=CTL + (("orth_norm", "rows"),),
                note="orthogonality normalized by rows"),
        Variant(11, "v2ctl_nogamma", v1_taus=True, orthogonality=False, extra=CTL, note="no orthogonality (γ = 0)"),
        Variant(12, "v2ctl_sf03", v1_taus=True, extra=CTL + (("schedule_fraction", 0.3),),
                note="recovering controller, τ reaches τ_T at 30%"),
        Variant(13, "learned_l0_aux_sf03", v1_taus=True, extra=CTL + l0 + aux + (("schedule_fraction", 0.3),),
                note="learned margins, L0, AuxK, τ reaches τ_T at 30%"),
        Variant(14, "v2ctl_const", v1_taus=True, schedule="const", extra=CTL,
                note="recovering controller, no curriculum (reference point)"),
        Variant(15, "topk_k12", arch="topk", extra=(("k", 12),),
                note="TopK at k = 12: the L0 the controller settles at"),
        Variant(16, "v2ctl_const_rows", v1_taus=True, schedule="const", extra=CTL + (("orth_norm", "rows"),),
                note="no curriculum, orthogonality by rows (γ_max 1)"),
        Variant(17, "v2ctl_const_rows_g10", v1_taus=True, schedule="const",
                extra=CTL + (("orth_norm", "rows"), ("gamma_max", 10.0)),
                note="no curriculum, orthogonality by rows, γ_max 10"),
        Variant(18, "v1_rows", v1_taus=True, extra=V1 + (("orth_norm", "rows"),), note="v1 with orthogonality by rows"),
        Variant(19, "v1_aux", v1_taus=True, extra=V1 + aux, note="v1 with AuxK"),
        Variant(21, "v1_fastema", v1_taus=True, extra=(("freq_ema", 0.9), ("margin_band", 3.0), ("margin_freeze", 0.0)),
                note="v1 with the faster EMA and narrower band, no freeze"),
        Variant(22, "v1_freeze", v1_taus=True,
                extra=(("freq_ema", 0.99), ("margin_band", 10.0), ("margin_freeze", 0.3)),
                note="v1 with the freeze alone"),
        Variant(23, "v2ctl_tau1", extra=CTL + (("tau_final2", None),),
                note="recovering controller, one τ_T for both layers (the LM's 0.2/0.55 split was v1's)"),
        Variant(20, "v2ctl_const_l1low", v1_taus=True, schedule="const", extra=CTL + (("l1_coeff", 0.01),),
                note="no curriculum, λ 5× lower (the thresholds set the sparsity)"),
    )


def train_one(v: Variant, b: Budget, knob: float, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train one run from scratch; its held-out headline plus the end-of-run state of μ,
    the logged figures of its last step, and its wall time."""
    from esosae.evals.summary import headline
    from esosae.training.loop import run

    cfg = train_config(v, b, knob, seed, str(run_dir))
    cfg.checkpoint_every = cfg.steps  # one checkpoint, at the end
    trained = run(cfg, run_dir, resume=False, progress=False)
    h = headline(trained)
    model = trained.model
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    h["last"] = {k: last[k] for k in ("pinned_min_1", "pinned_max_1", "pinned_min_2", "pinned_max_2", "cos_max",
                                      "cos_high_pairs", "orth_grad_ratio", "dead_1", "dead_2") if k in last}
    h["mu_hist"] = {f"mu{i}": torch.histc(getattr(model, f"mu{i}").detach().float(), 8, 0, 4).int().tolist()
                    for i in range(1, model.layers + 1)}
    return h


def screen_one(v: Variant, b: Budget, seeds: list[int], out: Path, work: Path, max_tries: int) -> None:
    """Calibrate on the first seed, then the other seeds at the chosen knob; one JSON each."""
    base = {"source": b.source, "variant": asdict(v), "budget": asdict(b), "band": calibrate.BAND}
    first = out / b.source / f"{v.name}_seed{seeds[0]}.json"
    if first.is_file():
        knob = json.loads(first.read_text())["knob"]
    else:
        attempts: list[dict[str, Any]] = []
        knob = start_knob(v, b, out, seeds[0])
        while True:
            t0 = time.perf_counter()
            h = train_one(v, b, knob, seeds[0], work / b.source / v.name / f"seed{seeds[0]}_try{len(attempts)}")
            attempts.append({"knob": knob, "l0": h["l0"], "metrics": h, "wall_s": time.perf_counter() - t0})
            say(f"{b.source}/{v.name} seed {seeds[0]} try {len(attempts) - 1}: knob {knob:.4g} → L0 {h['l0']:.2f}, "
                f"FVU {h['fvu']:.4f}, recovery {h.get('atom_recovery', float('nan')):.3f}")
            tries = [calibrate.Attempt(a["knob"], a["l0"]) for a in attempts]
            if v.knob == "k" or calibrate.in_band(h["l0"], b.target_l0) or len(attempts) >= max_tries:
                break
            knob = calibrate.next_knob(v.knob, tries, b.target_l0)
        chosen = calibrate.best([calibrate.Attempt(a["knob"], a["l0"]) for a in attempts], b.target_l0)
        knob = attempts[chosen]["knob"]
        write(first, {**base, "seed": seeds[0], "knob": knob, "metrics": attempts[chosen]["metrics"],
                      "in_band": calibrate.in_band(attempts[chosen]["l0"], b.target_l0), "attempts": attempts})
    for seed in seeds[1:]:
        path = out / b.source / f"{v.name}_seed{seed}.json"
        if path.is_file():
            continue
        t0 = time.perf_counter()
        h = train_one(v, b, knob, seed, work / b.source / v.name / f"seed{seed}")
        say(f"{b.source}/{v.name} seed {seed}: L0 {h['l0']:.2f}, FVU {h['fvu']:.4f}, "
            f"recovery {h.get('atom_recovery', float('nan')):.3f}")
        write(path, {**base, "seed": seed, "knob": knob, "metrics": h,
                     "in_band": calibrate.in_band(h["l0"], b.target_l0), "wall_s": time.perf_counter() - t0})


def summary(out: Path) -> str:
    """A markdown table per source: each candidate's mean ± std over its seeds."""
    lines = []
    for src in sorted(p.name for p in out.iterdir() if p.is_dir()):
        runs: dict[str, list[dict[str, Any]]] = {}
        for path in sorted((out / src).glob("*_seed*.json")):
            d = json.loads(path.read_text())
            runs.setdefault(d["variant"]["name"], []).append(d)
        lines += [f"### {src}", "", "| candidate | seeds | knob | L0 | FVU | atom recovery | dead % (held-out, all layers) "
                  "| pairs \\|c\\| > 0.9 | orth grad ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for name, ds in sorted(runs.items(), key=lambda kv: kv[1][0]["variant"]["run"]):
            ms = [d["metrics"] for d in ds]

            def stat(key: str, fmt: str = ".3f", ms: list[dict[str, Any]] = ms) -> str:
                vals = torch.tensor([float(m[key]) for m in ms if key in m], dtype=torch.float64)
                if vals.numel() == 0:
                    return "—"
                std = f" ± {vals.std():{fmt}}" if vals.numel() > 1 else ""
                return f"{vals.mean():{fmt}}{std}"

            for m in ms:
                dead = [v for k, v in m.items() if k.startswith("dead_pct_")]
                m["dead_pct"] = sum(dead) / len(dead)  # layers of equal width: the share of all features
                m.update({k: v for k, v in m.get("last", {}).items() if k in ("cos_high_pairs", "orth_grad_ratio")})
            lines.append(f"| {name} | {len(ds)} | {ds[0]['knob']:.3g} | {stat('l0', '.2f')} | {stat('fvu', '.4f')} "
                         f"| {stat('atom_recovery')} | {stat('dead_pct', '.1f')} | {stat('cos_high_pairs', '.1f')} "
                         f"| {stat('orth_grad_ratio', '.2g')} |")
        lines.append("")
    return "\n".join(lines)


def start_knob(v: Variant, b: Budget, out: Path, seed: int) -> float:
    """The knob a candidate's calibration starts from: its base's chosen one (``v1_rows`` → ``v1``)
    when that has been screened, else the source's default."""
    base = out / b.source / f"{v.name.split('_')[0]}_seed{seed}.json"
    if v.knob == "tau_scale" and base.is_file():
        return float(json.loads(base.read_text())["knob"])
    return default_knob(v, b)


def write(path: Path, d: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(d, indent=1) + "\n")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esosae.experiments.screen", description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="hard,lm", help="comma list of hard, lm")
    p.add_argument("--only", default=None, help="comma list of candidate names, run in that order (default: all)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds; the first calibrates")
    p.add_argument("--max-tries", type=int, default=3, help="calibration tries on the first seed")
    p.add_argument("--steps", type=int, default=None, help="override the budget's steps (smoke tests)")
    p.add_argument("--out", default="docs/results/method-v2", help="folder of the per-run JSON files")
    p.add_argument("--work", default="runs/screen", help="folder of the run directories (not kept)")
    p.add_argument("--summary", action="store_true", help="print the tables of what --out holds, train nothing")
    ns = p.parse_args(argv)
    if ns.summary:
        print(summary(Path(ns.out)))
        return 0
    seeds = [int(t) for t in ns.seeds.split(",")]
    for source in ns.sources.split(","):
        b = BUDGETS[source] if ns.steps is None else replace(BUDGETS[source], steps=ns.steps)
        known = {v.name: v for v in candidates(source)}
        names = ns.only.split(",") if ns.only else list(known)
        bad = [n for n in names if n not in known]
        if bad:
            p.error(f"--only: unknown candidate(s) {', '.join(bad)}; choose from {', '.join(known)}")
        for name in names:
            screen_one(known[name], b, seeds, Path(ns.out), Path(ns.work), ns.max_tries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
