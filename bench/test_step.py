"""The full training step on the CPU: ``pytest bench/test_step.py --benchmark-only``.

``esosae.training.loop.train_step`` as the trainer runs it (schedules, forward, loss, backward,
parallel-gradient removal, clipping, Adam, decoder renormalization, firing statistics) at
d = 576, m = 4,608, B = 1,024 on real activations (bench/race_data.py), mid-run (λ, γ and
the learning rate all on), for:
- ``relu_l0_32`` / ``relu_init``: the single-layer ReLU + L1 SAE at L0 ≈ 32 and at
  initialization (about half the features fire);
- ``esosae_l0_32``: the dual-layer E-SOSAE (m1 = m2 = 4,608, L0 ≈ 32 per layer) with the
  default tile fraction min(1, B/(3·m2)) and with the exact penalty (fraction 1).

Variants, each timed side by side with a partner (one partner step, untimed, before every
timed round, so both see the same load; the ratio is of the medians):
- ``torch`` (esosae.sae.torch_ops, the CPU default), partner ``reference`` (the oracle's functions);
- ``torch+fused_adam``: ``Adam(fused=True)`` instead of the trainer's default Adam, partner ``torch``;
- ``torch+fused_adam+1_thread``: the same with the whole step on one intra-op thread,
  partner ``torch+fused_adam``.
Every step starts from the case's weights (restored untimed); Adam's state carries over, as
in training. ``extra_info`` holds the phase split (forward / backward / optimizer) of the
last round of each, the partner's times and the machine.
"""

from __future__ import annotations

import statistics
import time

import pytest
import race_data
import torch

from esosae.sae import reference
from esosae.sae.backend import TORCH, Backend

REF = Backend("reference", reference.encode, reference.decode, reference.orth_penalty)
CASES = {"relu_l0_32": ("relu_l0_32", None), "relu_init": ("relu_init", None),
         "esosae_l0_32-orth_auto": ("esosae_l0_32", None), "esosae_l0_32-orth_exact": ("esosae_l0_32", 1.0)}
VARIANTS = {  # name: (ops, fused Adam, one thread, partner)
    "torch": (TORCH, False, False, "reference"),
    "torch+fused_adam": (TORCH, True, False, "torch"),
    "torch+fused_adam+1_thread": (TORCH, True, True, "torch+fused_adam"),
    "reference": (REF, False, False, None),
}
RUNS = [("relu_l0_32", "torch"), ("relu_l0_32", "torch+fused_adam"), ("relu_l0_32", "torch+fused_adam+1_thread"),
        ("relu_init", "torch"), ("esosae_l0_32-orth_auto", "torch"), ("esosae_l0_32-orth_auto", "torch+fused_adam"),
        ("esosae_l0_32-orth_auto", "torch+fused_adam+1_thread"), ("esosae_l0_32-orth_exact", "torch")]


class Stepper:
    """A variant's Runner and how it steps."""

    def __init__(self, race, case: str, variant: str):
        self.ops, fused, self.one_thread, self.partner = VARIANTS[variant]
        self.run = race_data.Runner(race, *CASES[case], fused=fused)

    def __call__(self) -> dict:
        if not self.one_thread:
            return self.run.step(self.ops, measure=True)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.run.step(self.ops, measure=True)
        finally:
            torch.set_num_threads(n)


@pytest.mark.parametrize("case,variant", [pytest.param(c, v, id=f"{c}-{v}") for c, v in RUNS])
def test_train_step(benchmark, report, machine_info, race, case, variant):
    ours = Stepper(race, case, variant)
    partner = Stepper(race, case, ours.partner)
    partner_times: list[float] = []

    def partner_step_then_reset() -> None:
        partner.run.reset()
        t0 = time.perf_counter()
        partner()
        partner_times.append(time.perf_counter() - t0)
        ours.run.reset()

    partner_step_then_reset()  # warm-up of both (allocates Adam's state), not counted
    ours()
    partner_times.clear()
    slow = ours.partner == "reference" and case != "relu_l0_32"
    res = benchmark.pedantic(ours, setup=partner_step_then_reset, rounds=3 if slow else 5)
    t, t_partner = benchmark.stats.stats.median, statistics.median(partner_times)
    out, run = res["out"], ours.run
    l0 = [round((out[f"f{i}"] > 0).sum(1).float().mean().item(), 2) for i in range(1, run.model.layers + 1)]
    benchmark.extra_info.update(
        machine_info, variant=variant, flops=run.flops, l0=l0, partner=ours.partner, partner_s=t_partner,
        partner_times_s=partner_times, tile_fraction=run.cfg.orth_block_fraction if run.model.layers == 2 else None,
        phases_ms={k: round(1e3 * v, 1) for k, v in run.timer.phases.items()},
        partner_phases_ms={k: round(1e3 * v, 1) for k, v in partner.run.timer.phases.items()})
    report("tokens/s", race_data.B / t)
    report("GFLOP/s (dense-equivalent)", run.flops / t / 1e9, ".1f")
    report(f"{ours.partner} s/step (side by side)", t_partner, ".3f")
    report(f"{ours.partner} time / ours", t_partner / t, ".2f")
