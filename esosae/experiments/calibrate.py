"""The grid's sparsity calibration: move one knob until a run's held-out L0 is on target.

L0 responds to the knobs roughly as a power law, so each new try solves
``L0 = L0_a · (knob / knob_a)^b`` for the target on a log-log line through a pair of tries:

- the pair is the closest try above the target and the closest below it once the tries
  bracket the target (the step is then an interpolation), else the last two tries;
- b is the pair's secant slope ``log(L0_b / L0_a) / log(knob_b / knob_a)`` when it moved L0
  the expected way (b < -0.1), else the prior slope: -1.9 for the τ_T factor (measured on
  the default run, docs/default_run.md) and -1 for λ, from the last try alone;
- a step never scales the knob by more than 8× either way.

A try is accepted when |L0 / target − 1| ≤ ``BAND``; after ``max_tries`` the closest try is
kept and the report says it missed the band. TopK's L0 is k itself: one try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BAND = 0.2
PRIOR_SLOPE = {"tau_scale": -1.9, "l1_coeff": -1.0}
MAX_STEP = 8.0


@dataclass
class Attempt:
    """One calibration try: the knob's value and the held-out total L0 it trained to."""

    knob: float
    l0: float


def in_band(l0: float, target: float) -> bool:
    return abs(l0 / target - 1.0) <= BAND


def next_knob(knob_name: str, attempts: list[Attempt], target: float) -> float:
    """The knob value for the next try, from the tries so far (at least one)."""
    last, slope = attempts[-1], PRIOR_SLOPE[knob_name]
    above = [a for a in attempts if a.l0 > target]
    below = [a for a in attempts if 0 < a.l0 <= target]
    if above and below:
        pair = (min(above, key=lambda a: a.l0), max(below, key=lambda a: a.l0))
    else:
        pair = tuple(attempts[-2:])
    if len(pair) == 2 and pair[0].l0 > 0 and pair[1].l0 > 0 and pair[0].knob != pair[1].knob:
        secant = math.log(pair[1].l0 / pair[0].l0) / math.log(pair[1].knob / pair[0].knob)
        if secant < -0.1:
            last, slope = pair[1], secant
    l0 = max(last.l0, 1e-3)  # a run that went silent still needs a finite step
    factor = (target / l0) ** (1.0 / slope)
    return last.knob * min(max(factor, 1.0 / MAX_STEP), MAX_STEP)


def best(attempts: list[Attempt], target: float) -> int:
    """Index of the try closest to the target on a log scale."""
    return min(range(len(attempts)), key=lambda i: abs(math.log(max(attempts[i].l0, 1e-6) / target)))
