"""The trainer's optimizer: torch's Adam with its fused kernel, stepping on one intra-op thread.

``torch.optim.Adam`` without options runs, on the CPU, seven elementwise passes per
parameter tensor (lerp, mul, addcmul, sqrt, div, add, addcdiv), each its own OpenMP
parallel region. ``fused=True`` is torch's own one-pass kernel for the same update (the
same formulas; roundings differ from the unfused passes by a few ulps). On the CPU the
step is ``torch_ops.wide`` work: elementwise, so the same numbers on any thread count; it
takes every intra-op thread while other processes leave the cores free and one otherwise
(on a shared machine a parallel region waits for whichever thread was descheduled).

Measured at d = 576, m = 4,608 (5.3M parameters, single layer; twice that dual-layer), on
the project's 2-core machine with other jobs on it (load average ~2.7): one step of the
default Adam 22.9 ms on one thread and 116 ms on two; fused on one thread 3.4 ms (dual
layer: 49 ms / 232 ms against 11 ms).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from esosae.sae.torch_ops import wide

FUSED_DEVICES = ("cpu", "cuda")
"""Devices whose tensors torch's fused Adam takes."""


class Adam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` (plain Adam where a parameter is on another device),
    whose ``step`` on the CPU is ``torch_ops.wide`` work (one thread while the cores are busy)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float]):
        params = list(params)
        fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params) or None
        super().__init__(params, lr=lr, betas=betas, fused=fused)

    def step(self, closure=None):
        # read from the parameters each step: a deepcopy or pickle keeps only torch's own state
        if not any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        with wide():
            return super().step(closure)


__all__ = ["Adam"]
