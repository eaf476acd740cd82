"""The grid's sparsity calibration: move one knob until a run's held-out L0 is on target.

L0 responds to the knobs roughly as a power law, so each new try solves
``L0 = L0_a · (knob / knob_a)^b`` for the target on a log-log line through a pair of tries:

- the pair is the two tries nearest the target (in |log L0 / target|, the later on a tie)
  at distinct knobs;
- b is the pair's secant slope ``log(L0_b / L0_a) / log(knob_b / knob_a)`` when it moved L0
  the expected way (b · prior > 0.1), but at least a quarter of the prior in size: two tries
  at nearly one knob differ in L0 by noise (a few %), and a near-flat secant would send the
  next knob far past the target (E-SOSAE's τ₂ on the language model: a secant of -0.18
  moved it 1.6×, and layer 2's L0 from 17.5 to 7.0 against 16). Else the prior slope: -1.9
  for the τ_T factor (measured on the default run, docs/default_run.md) and -1 for λ, from
  the last try alone (a knob that did not move L0 is thus pushed further, never tried again);
- once tries bracket the target, the new knob must fall inside the bracket (the narrowest
  pair of tries adjacent in knob order with L0 on either side of the target, a tenth of its
  log-width in from either end); else it is the bracket's geometric middle. A far try (a
  collapsed run at L0 ≈ 0) thus never sets the slope, a bad secant costs one bisection, not a
  crawl, and where L0 is not monotone in the knob (noise) no knob is tried twice;
- a step never scales the knob by more than 8× either way.

A try is accepted when |L0 / target − 1| ≤ the band (``BAND`` unless the budget sets
another); after ``max_tries`` the closest try is kept and the report says it missed the
band. A k (TopK, BatchTopK) moves along L0 ∝ k (slope +1), rounded to an integer, or by
one when the rounding repeats a try; in the band it stops once its L0 is within ``EXACT``
of the target or tries bracket it (TopK's held-out L0 falls below k on tokens with fewer
than k positive pre-activations; BatchTopK's, a global threshold at inference, is not k),
so that its figures can be read at the exact target. A per-layer calibration moves τ₁'s and τ₂'s factors
apart, each by the rule above on its own layer's L0 against half the target.

Any metric y is also read at the exact target from the tries (``interpolate``): linear in
log L0 between the closest try above and the closest below,

    y* = y_a + (y_b − y_a) · log(target / L0_a) / log(L0_b / L0_a),

or, when the tries do not bracket the target and the closest (a) is within ``EXTRAPOLATE`` of
it, the same line through the two closest (``extrapolated``) as long as it reaches no farther
past a than the pair spans, |log(target / L0_a)| ≤ |log(L0_b / L0_a)|; a pair of tries at
nearly one L0 would otherwise turn noise into a slope (two tries at L0 4.18 and 4.19 once
gave an FVU of −0.017 at 4), so then a's own value is read (``nearest``). Farther than
``EXTRAPOLATE``, or from a single try not at the target, nothing. A try within ``EXACT`` of
the target (TopK's) is read as it is (``at the target``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BAND = 0.2
PRIOR_SLOPE = {"tau_scale": -1.9, "l1_coeff": -1.0, "k": 1.0}
MAX_STEP = 8.0
EXTRAPOLATE = 0.1
EXACT = 0.005


@dataclass
class Attempt:
    """One calibration try: the knob's value and the held-out total L0 it trained to."""

    knob: float
    l0: float


def in_band(l0: float, target: float, band: float = BAND) -> bool:
    return abs(l0 / target - 1.0) <= band


def next_knob(knob_name: str, attempts: list[Attempt], target: float) -> float:
    """The knob value for the next try, from the tries so far (at least one)."""
    last, slope = attempts[-1], PRIOR_SLOPE[knob_name]
    live = [a for a in attempts if a.l0 > 0]
    near = sorted(reversed(live), key=lambda a: abs(math.log(a.l0 / target)))  # ties: the later try
    other = [a for a in near[1:] if a.knob != near[0].knob][:1]
    if other:
        secant = math.log(other[0].l0 / near[0].l0) / math.log(other[0].knob / near[0].knob)
        if secant * slope > 0.1:  # moved L0 the expected way
            last, slope = near[0], math.copysign(max(abs(secant), abs(slope) / 4), slope)
    l0 = max(last.l0, 1e-3)  # a run that went silent still needs a finite step
    factor = (target / l0) ** (1.0 / slope)
    knob = last.knob * min(max(factor, 1.0 / MAX_STEP), MAX_STEP)
    by_knob = sorted(attempts, key=lambda a: a.knob)
    brackets = [(a.knob, b.knob) for a, b in zip(by_knob, by_knob[1:])
                if a.knob > 0 and a.knob != b.knob and (a.l0 > target) != (b.l0 > target)]
    if brackets:
        lo, hi = min(brackets, key=lambda p: p[1] / p[0])
        margin = 0.1 * math.log(hi / lo)
        if not math.log(lo) + margin < math.log(knob) < math.log(hi) - margin:
            knob = math.sqrt(lo * hi)
    return knob


def best(attempts: list[Attempt], target: float) -> int:
    """Index of the try closest to the target on a log scale."""
    return min(range(len(attempts)), key=lambda i: abs(math.log(max(attempts[i].l0, 1e-6) / target)))


def interpolate(tries: list[dict], target: float, key: str) -> dict | None:
    """``key`` of the tries (dicts with 'l0', 'try' and maybe ``key``) read at L0 = target:
    {'value', 'from': [try names], 'l0': [their L0s], 'values', 'how'}, 'how' one of 'at the
    target', 'bracketed', 'extrapolated', 'nearest'; or None (see the module docstring)."""
    have = [t for t in tries if t.get(key) is not None and t["l0"] > 0]
    near = sorted(have, key=lambda t: abs(math.log(t["l0"] / target)))
    if near and abs(near[0]["l0"] / target - 1) <= EXACT:  # TopK: L0 = k
        return _reading([near[0]], key, "at the target")
    above = sorted((t for t in have if t["l0"] >= target), key=lambda t: t["l0"])
    below = sorted((t for t in have if t["l0"] < target), key=lambda t: -t["l0"])
    if above and below:
        return _line(below[0], above[0], target, key, "bracketed")
    if not near or abs(near[0]["l0"] / target - 1) > EXTRAPOLATE:
        return None
    a, other = near[0], [t for t in near[1:] if t["l0"] != near[0]["l0"]]
    if not other:
        return None
    if abs(math.log(target / a["l0"])) > abs(math.log(other[0]["l0"] / a["l0"])):
        return _reading([a], key, "nearest")
    return _line(a, other[0], target, key, "extrapolated")


def _line(a: dict, b: dict, target: float, key: str, how: str) -> dict:
    w = math.log(target / a["l0"]) / math.log(b["l0"] / a["l0"])
    return {**_reading([a, b], key, how), "value": a[key] + (b[key] - a[key]) * w}


def _reading(used: list[dict], key: str, how: str) -> dict:
    """The reading's record of the tries it used; its value is the first's own."""
    return {"value": used[0][key], "from": [t["try"] for t in used], "l0": [t["l0"] for t in used],
            "values": [t[key] for t in used], "how": how}
