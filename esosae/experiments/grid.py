"""The experiment grid of METHOD.md §8: ten variants, three sources, one budget each.

Every run of a source sees the same tokens, data seed and token budget; run 9 alone
changes the initialization seed (the consistency check of run 2). The comparison is at a
matched total L0 (L0_1 + L0_2): each run's sparsity knob is calibrated to land within
±20% of ``Budget.target_l0`` (see ``esosae.experiments.calibrate``):

- E-SOSAE runs (2–9): a factor c on both layers' τ_T (their ratio is kept: one τ_T
  today, v1's 0.2 / 0.55 on the language model for ``v1_taus`` variants), each layer
  targeting half the total L0;
- the vanilla ReLU + L1 baseline (0): λ;
- TopK (1): k = the total target, which fixes L0 exactly (no sweep).

The single-layer baselines get the width of both E-SOSAE layers together (m1 + m2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from esosae.config import (AUTO_DEFAULTS, V1_METHOD, V1_TAU_FINAL, ConfigError, SAEConfig, Synthetic, TrainConfig,
                           choices, field_specs)
from esosae.experiments.calibrate import PRIOR_SLOPE

GRID_FILE = "grid.json"
"""The grid folder's record of its settings, variants and invocations (runner writes, report reads)."""
CALIBRATION_FILE = "calibration.json"
"""Each run folder's calibration tries and chosen try."""
ATOMS_FILE = "atoms.json"
"""A planted-source try's per-atom frequency and best decoder cosine (the recovery plot)."""


@dataclass(frozen=True)
class Variant:
    """One row of METHOD.md §8."""

    run: int
    name: str
    arch: str = "esosae"
    schedule: str = "exp"
    margins: str = "adaptive"
    clamp_margins: bool = True
    gamma_warmup: str = "synced"
    orthogonality: bool = True
    seed_offset: int = 0
    layers: int = 2
    """E-SOSAE's layers: 1 is layer 1 alone, at both layers' width and the whole target L0."""
    l0_factor: float = 1.0
    """Target total L0 = the budget's target × this (the Pareto grid's three L0s)."""
    steps_factor: float = 1.0
    """Steps = the budget's steps × this (the Pareto grid's convergence check)."""
    note: str = ""
    v1_taus: bool = False
    """Layer 2's τ_T at v1's ratio to layer 1's where v1 had one (esosae.config.V1_TAU_FINAL)."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Further SAEConfig or ScheduleConfig fields, (name, value), set on top of the above."""

    @property
    def slug(self) -> str:
        return f"run{self.run:02d}_{self.name}"

    @property
    def knob(self) -> str:
        """The sparsity knob the calibration moves: 'tau_scale', 'l1_coeff' (λ of L1, or of L0 for
        jumprelu) or 'k'."""
        return {"esosae": "tau_scale", "relu": "l1_coeff", "topk": "k", "batchtopk": "k",
                "jumprelu": "l1_coeff"}[self.arch]


METHOD_GRID: tuple[Variant, ...] = (
    Variant(0, "relu", arch="relu", note="vanilla ReLU + L1 baseline (θ = 0)"),
    Variant(1, "topk", arch="topk", note="TopK baseline (k = target L0)"),
    Variant(2, "esosae", note="full E-SOSAE"),
    Variant(3, "linear", schedule="linear", note="schedule ablation"),
    Variant(4, "const", schedule="const", note="no curriculum"),
    Variant(5, "unclamped", clamp_margins=False, note="clamping ablation"),
    Variant(6, "fixed_mu", margins="fixed", note="adaptation ablation (μ = 1)"),
    Variant(7, "gamma_linear", gamma_warmup="linear", note="unsynchronized γ warmup"),
    Variant(8, "no_orth", orthogonality=False, note="no orthogonality (γ = 0)"),
    Variant(9, "esosae_seed1", seed_offset=1, note="second seed of run 2 (consistency)"),
)
LEARNED_L0 = (("margins", "learned"), ("sparsity", "l0"))
V2_GRID: tuple[Variant, ...] = (
    Variant(0, "batchtopk", arch="batchtopk", note="BatchTopK baseline (B·k per batch, global θ at inference)"),
    Variant(1, "topk", arch="topk", note="TopK baseline (k = target L0)"),
    Variant(2, "esosae", note="E-SOSAE v2 (today's defaults, METHOD.md §9)"),
    Variant(3, "v1", extra=tuple(V1_METHOD.items()), v1_taus=True, note="E-SOSAE v1 (its controller and τ_T)"),
    Variant(4, "jumprelu", arch="jumprelu", note="JumpReLU baseline (learned θ, L0 via STE)"),
    Variant(5, "learned_l0", extra=LEARNED_L0, note="learned clamped margins, L0"),
    Variant(6, "auxk", extra=(("aux_k", 64),), note="AuxK dead-feature revival (k_aux = 64)"),
    Variant(7, "orth_rows", extra=(("orth_norm", "rows"),), note="orthogonality normalized by rows (1/m1)"),
    Variant(8, "no_orth", orthogonality=False, note="no orthogonality (γ = 0)"),
    Variant(9, "esosae_seed1", seed_offset=1, note="second seed of run 2 (consistency)"),
)
"""The v2 comparison (``--grid v2``): the baselines, v2, v1 and each v2 mechanism alone."""


def pareto_grid() -> tuple[Variant, ...]:
    """The Pareto grid, run numbers in this order:

    - 0–53: six methods (ReLU, TopK, BatchTopK, JumpReLU, E-SOSAE v1, E-SOSAE v2 = today's
      SAEConfig defaults) × three target L0s (½, 1, 2 × the budget's) × seeds 0, 1, 2;
    - 54–77: eight ablations of v2 at the middle L0 × three seeds: linear / const schedule,
      unclamped / fixed margins, linear / no γ warmup, no orthogonality, layer 1 alone;
    - 78–89: the six methods at the middle L0, seed 0, at ½ and 2 × the steps (with the
      1 × runs above: the convergence check).

    ``--quick`` keeps seeds 0 and 1 (``QUICK_SEEDS``).
    """
    methods = (Variant(0, "relu", arch="relu", note="ReLU + L1"),
               Variant(0, "topk", arch="topk", note="TopK"),
               Variant(0, "batchtopk", arch="batchtopk", note="BatchTopK"),
               Variant(0, "jumprelu", arch="jumprelu", note="JumpReLU"),
               Variant(0, "esosae_v1", extra=tuple(V1_METHOD.items()), v1_taus=True, note="E-SOSAE v1"),
               Variant(0, "esosae_v2", note="E-SOSAE v2"))
    ablation = (Variant(0, "linear", schedule="linear", note="v2, linear schedule"),
                Variant(0, "const", schedule="const", note="v2, no curriculum"),
                Variant(0, "unclamped", clamp_margins=False, note="v2, unclamped margins"),
                Variant(0, "fixed_mu", margins="fixed", note="v2, fixed margins (μ = 1)"),
                Variant(0, "gamma_linear", gamma_warmup="linear", note="v2, unsynchronized γ warmup"),
                Variant(0, "gamma_none", gamma_warmup="none", note="v2, no γ warmup"),
                Variant(0, "no_orth", orthogonality=False, note="v2, no orthogonality (γ = 0)"),
                Variant(0, "layer1", layers=1, note="v2, layer 1 alone"))
    rows = [(m, f, s, 1.0) for m in methods for f in (0.5, 1.0, 2.0) for s in range(3)]
    rows += [(a, 1.0, s, 1.0) for a in ablation for s in range(3)]
    rows += [(m, 1.0, 0, t) for m in methods for t in (0.5, 2.0)]
    out = []
    for run, (v, f, seed, t) in enumerate(rows):
        steps = f"_steps{t:g}x" if t != 1 else ""
        out.append(dataclasses.replace(v, run=run, name=f"{v.name}_l0x{f:g}_s{seed}{steps}", seed_offset=seed,
                                       l0_factor=f, steps_factor=t,
                                       note=f"{v.note}, L0 × {f:g}, seed {seed}" + (f", steps × {t:g}" if t != 1 else "")))
    return tuple(out)


PARETO_GRID = pareto_grid()


def method_of(v: Variant) -> str:
    """The method (or ablation) a Pareto run belongs to: its name before the L0 factor."""
    return v.name.split("_l0x")[0]


def seed_first(variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
    """The Pareto grid's running order: seed 0 before seeds 1 and 2, and within a seed the
    middle L0 before ½× and 2× and the convergence runs, so that most runs can start from a
    finished relative's calibrated knobs (runner.start_knobs)."""
    return tuple(sorted(variants, key=lambda v: (v.seed_offset, v.l0_factor != 1.0, v.steps_factor != 1.0, v.run)))
QUICK_SEEDS = 2
GRIDS = {"method": METHOD_GRID, "v2": V2_GRID, "pareto": PARETO_GRID}

IDENTITY = ("run", "name", "note")
"""The fields of a Variant that name it; every other field is a setting."""


def changes(v: Variant) -> set[str]:
    """The settings in which ``v`` departs from the full method (Variant's defaults)."""
    return {f.name for f in dataclasses.fields(Variant)
            if f.name not in IDENTITY and getattr(v, f.name) != f.default}


def full_method(variants: tuple[Variant, ...]) -> Variant | None:
    """The full E-SOSAE: the one variant with every setting at its default (run 2 of the
    method grid), or None when the grid has none; two such variants are an error."""
    found = [v for v in variants if not changes(v)]
    if len(found) > 1:
        raise ValueError(f"runs {', '.join(str(v.run) for v in found)} all have the default settings")
    return found[0] if found else None


def ablations(setting: str, variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
    """The variants that change ``setting`` alone from the full method, in run order (in the
    method grid: 'schedule' → runs 3 and 4, 'clamp_margins' → 5, 'orthogonality' → 8,
    'seed_offset' → 9)."""
    if setting in IDENTITY or setting not in {f.name for f in dataclasses.fields(Variant)}:
        raise ValueError(f"{setting!r} is not a setting of Variant")
    return tuple(v for v in variants if changes(v) == {setting})


@dataclass(frozen=True)
class Budget:
    """What every run of one source trains on, and the matched total L0 it aims at."""

    source: str
    """'lm' (the language model's cached activations) or a synthetic preset: 'easy', 'hard'."""
    steps: int
    batch_size: int
    m: int
    """Width of each E-SOSAE layer; the single-layer baselines get 2·m."""
    target_l0: float
    """Matched total L0 (both layers together) of every run."""
    harvest_tokens: int | None = None
    eval_tokens: int | None = None
    lr: float | None = None
    band: float = 0.2
    """A run is matched when |L0 / target − 1| ≤ band."""
    per_layer: bool = False
    """Calibrate E-SOSAE's τ₁ and τ₂ factors apart (each layer to half the target), so that
    every variant gets its own layer ratio; else one factor on both (the default run's ratio)."""
    dead_window: int | None = None
    """Tokens without firing that make a feature dead in the logged dead % (default: the trainer's)."""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size

    def target(self, v: Variant) -> float:
        """Variant ``v``'s target total L0."""
        return self.target_l0 * v.l0_factor

    def steps_of(self, v: Variant) -> int:
        return max(1, round(self.steps * v.steps_factor))


def budgets(quick: bool, tokens: int | None = None, synthetic_steps: int | None = None) -> dict[str, Budget]:
    """Per-source budgets: the full grid or ``quick`` (a tiny grid that exercises everything
    in a few minutes on 2 CPU cores).

    The full grid fits 90 minutes on 2 CPU cores: on the language model, the default run's
    widths and L0 (16 + 16 of 1,152 + 1,152) at half its tokens (300 steps × 1,024, one pass
    over the 300k-token cache); on the planted sources, 1,000 steps × 1,024 at a total L0
    equal to the planted one.
    """
    if quick:
        full = {
            # 4 per layer at m = 128: a target rate the margins' band can act on
            "lm": Budget("lm", 40, 256, 128, 8.0, harvest_tokens=16_384, eval_tokens=2_048),
            "easy": Budget("easy", 100, 256, 128, 4.0),
            "hard": Budget("hard", 100, 256, 256, 8.0),
        }
    else:
        full = {
            "lm": Budget("lm", 300, 1024, int(AUTO_DEFAULTS["lm"]["m"]), 2 * AUTO_DEFAULTS["lm"]["target_l0"]),
            "easy": Budget("easy", 1000, 1024, 256, 4.0),
            "hard": Budget("hard", 1000, 1024, 1024, 8.0),
        }
    if tokens is not None:
        b = full["lm"]
        if tokens < b.batch_size:
            raise ConfigError(f"--tokens must be at least one batch ({b.batch_size}); got {tokens}")
        full["lm"] = dataclasses.replace(b, steps=tokens // b.batch_size)
    if synthetic_steps is not None:
        if synthetic_steps <= 0:
            raise ConfigError(f"--synthetic-steps must be > 0; got {synthetic_steps}")
        for s in choices(Synthetic):
            full[s] = dataclasses.replace(full[s], steps=synthetic_steps)
    return full


PARETO_HARVEST_TOKENS = 600_000
"""The Pareto grid's language-model cache, in tokens: the bundled text at the default mix
(wikitext:1,pile:1) runs out after 674,851 tokens, held-out set included, so a 1,200-step
run (1.23M tokens) reads these about twice, each pass in a fresh order."""


def pareto_budgets(quick: bool, tokens: int | None = None, synthetic_steps: int | None = None) -> dict[str, Budget]:
    """The Pareto grid's budgets: the method grid's widths and middle L0s, ±5% matching,
    per-layer τ calibration, and a dead window of a tenth of the run's tokens.

    Full: 1,200 steps × 1,024 tokens on the language model (middle total L0 32: 16, 32, 64)
    over a cache of ``PARETO_HARVEST_TOKENS`` (read about twice), 2,000 × 1,024 on the planted
    sources (easy 2, 4, 8; hard 4, 8, 16). ``quick``: the quick method budgets, the same rules.
    ``tokens`` and ``synthetic_steps`` replace the language model's tokens and the planted
    sources' steps.
    """
    if quick:
        base = budgets(True, tokens, synthetic_steps or 100)
    else:
        base = budgets(False, tokens or 1200 * 1024, synthetic_steps or 2000)
        harvest = min(max(300_000, base["lm"].tokens), PARETO_HARVEST_TOKENS)
        base["lm"] = dataclasses.replace(base["lm"], harvest_tokens=harvest)
    return {k: dataclasses.replace(b, band=0.05, per_layer=True, dead_window=max(b.batch_size, b.tokens // 10))
            for k, b in base.items()}


def default_knob(v: Variant, b: Budget) -> float:
    """The knob's starting value: the source's defaults, moved along the calibration's prior
    slope to a target of l0_factor × the default one (TopK, BatchTopK: the target itself)."""
    move = v.l0_factor ** (1 / PRIOR_SLOPE[v.knob]) if v.knob in PRIOR_SLOPE else 1.0
    if v.knob == "tau_scale":
        return move
    if v.knob == "l1_coeff":
        return move * float(AUTO_DEFAULTS[b.source]["l0_coeff" if v.arch == "jumprelu" else "l1_coeff_relu"])
    return float(round(b.target(v)))


def train_config(v: Variant, b: Budget, knob: float, seed: int, run_dir: str,
                 knob2: float | None = None) -> TrainConfig:
    """The TrainConfig of variant ``v`` at knob value ``knob`` (and ``knob2``, the τ₂ factor
    of a per-layer calibration; default ``knob``); evaluation is the grid's job."""
    auto = AUTO_DEFAULTS[b.source]
    data: dict[str, Any] = {"source": "lm" if b.source == "lm" else "synthetic"}
    if b.source != "lm":
        data["synthetic"] = b.source
    if b.harvest_tokens is not None:
        data["harvest_tokens"] = b.harvest_tokens
    if b.eval_tokens is not None:
        data["eval_tokens"] = b.eval_tokens
    sae: dict[str, Any] = {"arch": v.arch}
    schedule: dict[str, Any] = {"schedule": v.schedule, "gamma_warmup": v.gamma_warmup}
    target = b.target(v)
    if v.arch == "esosae" and v.layers == 1:
        sae.update(m1=2 * b.m, m2=0, target_l0=target, margins=v.margins, clamp_margins=v.clamp_margins,
                   gamma_max=0.0)
        schedule.update(tau_final=auto["tau_final"] * knob)
    elif v.arch == "esosae":
        tau1 = auto["tau_final"] * knob
        tau2 = auto.get("tau_final2", auto["tau_final"]) * (knob if knob2 is None else knob2)
        if v.v1_taus and b.source in V1_TAU_FINAL:
            v1_tau1, v1_tau2 = V1_TAU_FINAL[b.source]
            tau1, tau2 = v1_tau1 * knob, v1_tau2 * (knob if knob2 is None else knob2)
        sae.update(m1=b.m, m2=b.m, target_l0=target / 2, margins=v.margins, clamp_margins=v.clamp_margins,
                   gamma_max=1.0 if v.orthogonality else 0.0)
        schedule.update(tau_final=tau1, tau_final2=tau2)
    else:
        sae.update(m1=2 * b.m, m2=0, target_l0=target)
        if v.knob == "l1_coeff":
            sae["l1_coeff"] = knob
        else:
            sae["k"] = int(round(knob))
    for name, value in v.extra:
        (sae if name in field_specs(SAEConfig) else schedule)[name] = value
    steps = b.steps_of(v)
    d: dict[str, Any] = {"data": data, "sae": sae, "schedule": schedule, "steps": steps,
                         "batch_size": b.batch_size, "seed": seed + v.seed_offset, "eval": False,
                         "log_every": max(1, steps // 100), "checkpoint_every": max(1, steps // 6),
                         "out_dir": run_dir}
    if b.dead_window is not None:
        d["dead_window"] = b.dead_window
    if b.lr is not None:
        d["lr"] = b.lr
    return TrainConfig.from_dict(d)


def select(grid: str, runs: list[int] | None) -> tuple[Variant, ...]:
    if grid not in GRIDS:
        raise ConfigError(f"--grid {grid!r} is unknown; choose one of {', '.join(GRIDS)}")
    variants = GRIDS[grid]
    if runs is None:
        return variants
    known = {v.run for v in variants}
    bad = sorted(set(runs) - known)
    if bad:
        raise ConfigError(f"--runs {','.join(map(str, bad))}: the {grid} grid has runs "
                          f"{min(known)}–{max(known)}")
    return tuple(v for v in variants if v.run in set(runs))
