"""Data-parallel training under ``torchrun``: DistributedDataParallel, NCCL on CUDA, gloo on CPU.

What is averaged and what is not:

- Gradients: DDP all-reduces them (mean over ranks) during ``backward``. Every rank's loss
  is a mean over its B/world rows of the global batch, so the averaged gradient equals the
  gradient of one process on the whole global batch.
- Firing statistics: each step's per-feature fire counts are summed over ranks, so every
  rank applies the same frequency EMA, dead-feature counter and margin update.
- Several hooks trained side by side (esosae/training/hooks.py, stream mode) run a thread
  each; each thread's collectives go through a process group of its own (``subgroup``),
  since collectives of different threads must not interleave on one group.
- Not communicated: the orthogonality penalty (computed identically on every rank from the
  same weights and the same tiles, drawn from (seed, step)) and the decoder-norm constraint
  (applied identically after the identical optimizer step), which keep ranks bit-identical
  without traffic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device  # this rank's device; collectives run on it (NCCL needs CUDA tensors)
    group: Any = None  # the process group of the collectives (None: the default, every rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model; buffers are kept in sync by the reduced statistics instead."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, process_group=self.group)

    def subgroup(self) -> Dist:
        """This Dist over a new process group of every rank: every rank must call it, in the
        same order (from the main thread)."""
        return replace(self, group=torch_dist.new_group(list(range(self.world))))

    def sum_fire_counts(self, fire: torch.Tensor) -> torch.Tensor:
        """Per-feature fire counts summed over ranks: (m,) int32 → (m,) int64."""
        total = fire.to(torch.int64)
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM, group=self.group)
        return total

    def min(self, value: torch.Tensor) -> torch.Tensor:
        """A scalar's minimum over ranks (BatchTopK's kept-activation floor)."""
        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (e.g. one rank saw Ctrl-C)."""
        t = torch.tensor([int(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def check_in_sync(self, model: nn.Module) -> None:
        """Raise if any rank's parameters differ from rank 0's (a cheap checksum all-gather)."""
        local = torch.stack([p.detach().double().sum() for p in model.parameters()])
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        torch_dist.all_gather(gathered, local, group=self.group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError("data-parallel ranks hold different weights; this is a bug")

    def barrier(self) -> None:
        torch_dist.barrier(group=self.group)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before any process group."""
    return int(os.environ.get("RANK", "0"))


def from_environment(device_kind: str) -> Dist | None:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    cuda = device_kind != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return Dist(rank=torch_dist.get_rank(), world=torch_dist.get_world_size(), device=device)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
