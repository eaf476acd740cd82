"""Activation sources: what the trainer reads batches from.

A source is random-access by step: ``batch(step, batch_size)`` returns the same rows every
time it is asked, so a resumed run sees exactly the tokens an uninterrupted one would,
and data-parallel ranks can each read their own disjoint shard of a global batch. The
streamed source (esosae/data/stream.py) is read in order instead; its data position goes
into each checkpoint (``position``) and a resume starts it there (``seek``).

- ``ArraySource``: rows of any (N, d) array (a tensor, or a memory-mapped cache), shuffled
  per epoch by a seeded permutation.
- ``SyntheticSource``: a planted dictionary, the ground truth that recovery tests use:
  ``x = Σ_i c_i·atom_i + noise`` with unit atoms, Bernoulli(p_i) activity, and non-negative
  magnitudes ``c_i ~ U(0.5, 1.5)``; ``p_i`` is uniform or a power law, with Σ p_i = L0.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from esosae.config import SYNTHETIC_PRESETS, DataConfig


class ActivationSource(Protocol):
    d: int

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Rows of global batch ``step`` owned by ``shard = (rank, world)``: (B / world, d) fp32."""
        ...

    def heldout(self) -> torch.Tensor:
        """Held-out rows for evaluation (never in a training batch): (N_eval, d) fp32."""
        ...

    def init_sample(self, batch_size: int) -> torch.Tensor:
        """Rows whose mean initializes the decoder bias: (≤ batch_size, d) fp32."""
        ...

    def position(self, step: int, batch_size: int) -> dict[str, int] | None:
        """The data position after ``step`` steps when the step alone does not give it, else None."""
        ...

    def seek(self, position: dict[str, int]) -> None:
        """Continue from a checkpoint's ``position`` (before the first batch)."""
        ...

    def close(self) -> None:
        """Stop any work the source does in the background."""
        ...

    def norm_scale(self) -> float:
        """s with E‖s·x‖² = d, estimated from training rows (METHOD.md §1)."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for config.json and summary.md."""
        ...


def generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of ``key``, e.g. ("atoms", seed) or ("train", seed, step).

    Hashing keeps every stream independent: seeding the planted atoms and the model's
    initialization with the same integer would make the initial decoder equal the atoms.
    """
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def expected_norm_scale(x: torch.Tensor) -> float:
    """s = sqrt(d / mean‖x‖²), so that E‖s·x‖² = d."""
    mean_sq = x.double().square().sum(-1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError("cannot normalize activations whose mean squared norm is zero or not finite")
    return math.sqrt(x.shape[-1] / mean_sq)


def shard_rows(global_rows: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """The contiguous slice of a global batch that rank ``shard[0]`` of ``shard[1]`` owns."""
    rank, world = shard
    n = global_rows.shape[0]
    if n % world:
        raise ValueError(f"batch_size {n} must be divisible by the number of ranks {world}")
    per = n // world
    return global_rows[rank * per:(rank + 1) * per]


class StepSource:
    """What every random-access source shares: the step is the whole data position."""

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        raise NotImplementedError

    def init_sample(self, batch_size: int) -> torch.Tensor:
        return self.batch(0, batch_size)

    def position(self, step: int, batch_size: int) -> dict[str, int] | None:
        return None

    def seek(self, position: dict[str, int]) -> None:
        raise ValueError("a random-access source has no data position to seek to")

    def close(self) -> None:
        pass


class ArraySource(StepSource):
    """Rows of an (N, d) array, visited in a fresh seeded permutation each epoch."""

    def __init__(self, train: Any, heldout: Any, seed: int = 0, scale: float | None = None,
                 info: dict[str, Any] | None = None):
        if len(train) == 0:
            raise ValueError("activation source has no training rows")
        self.train, self._heldout, self.seed = train, heldout, seed
        self.n, self.d = int(train.shape[0]), int(train.shape[1])
        self._scale, self._info = scale, info or {}
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = generator("permutation", self.seed, epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        pos = shard_rows(torch.arange(step * batch_size, (step + 1) * batch_size), shard)
        epochs, within = pos // self.n, pos % self.n
        idx = torch.cat([self._permutation(int(e))[within[epochs == e]] for e in epochs.unique()])
        idx = idx.sort().values.numpy()  # sorted reads are sequential on a memory map
        return _as_float(self.train[idx])

    def heldout(self) -> torch.Tensor:
        return _as_float(self._heldout[:])

    def norm_scale(self) -> float:
        if self._scale is None:
            self._scale = expected_norm_scale(self.batch(0, min(self.n, 16384)))
        return self._scale

    def describe(self) -> dict[str, Any]:
        return {"kind": "array", "rows": self.n, "d": self.d, **self._info}


def _as_float(rows: Any) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rows)) if isinstance(rows, np.ndarray) else rows
    return t.float().contiguous()


@dataclass(frozen=True)
class SyntheticSpec:
    d: int
    atoms: int
    l0: float
    power_law: bool
    noise: float
    alpha: float = 1.0  # power-law exponent: p_i ∝ (i+1)^-alpha


PRESETS = {name: SyntheticSpec(d=int(shape["d"]), atoms=int(shape["atoms"]), l0=shape["l0"],
                               power_law=name == "hard", noise=0.01)
           for name, shape in SYNTHETIC_PRESETS.items()}
"""The planted dictionaries: the shapes of esosae.config.SYNTHETIC_PRESETS; the hard one's
atom frequencies follow a power law."""


def spec_from_config(cfg: DataConfig) -> SyntheticSpec:
    base = PRESETS[cfg.synthetic]
    return SyntheticSpec(
        d=cfg.synthetic_d or base.d,
        atoms=cfg.synthetic_atoms or base.atoms,
        l0=cfg.synthetic_l0 or base.l0,
        power_law=base.power_law,
        noise=cfg.synthetic_noise,
        alpha=base.alpha,
    )


def atom_frequencies(atoms: int, l0: float, power_law: bool, alpha: float = 1.0) -> torch.Tensor:
    """Per-atom activity probabilities with Σ p_i = l0 and p_i ≤ 1: uniform, or ∝ (i+1)^-α."""
    if l0 > atoms:
        raise ValueError(f"mean L0 {l0} exceeds the number of atoms {atoms}")
    w = torch.arange(1, atoms + 1, dtype=torch.float64) ** -alpha if power_law else torch.ones(atoms, dtype=torch.float64)
    p = w * (l0 / w.sum())
    for _ in range(100):  # push the mass clipped at 1 onto the unclipped atoms
        over = p > 1
        if not over.any():
            break
        free = ~over
        p[over] = 1.0
        p[free] *= (l0 - over.sum()) / p[free].sum()
    return p.float()


class SyntheticSource(StepSource):
    """A planted dictionary; batch ``step`` is drawn from a generator seeded by (seed, step)."""

    HELDOUT_STREAM = -1

    def __init__(self, spec: SyntheticSpec, seed: int = 0, eval_rows: int = 8192):
        self.spec, self.seed, self.d, self.eval_rows = spec, seed, spec.d, eval_rows
        g = generator("atoms", seed)
        atoms = torch.randn(spec.atoms, spec.d, generator=g)
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)  # (n_atoms, d) unit rows
        self.freqs = atom_frequencies(spec.atoms, spec.l0, spec.power_law, spec.alpha)  # (n_atoms,)
        self._scale: float | None = None

    def sample(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples and their codes (n, n_atoms) from the generator of ``stream``."""
        g = generator("sample", self.seed, stream)
        active = torch.rand(n, self.spec.atoms, generator=g) < self.freqs  # (n, n_atoms)
        mags = 0.5 + torch.rand(n, self.spec.atoms, generator=g)
        codes = active * mags
        x = codes @ self.atoms + self.spec.noise * torch.randn(n, self.d, generator=g)  # (n, d)
        return x, codes

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        if step < 0:
            raise ValueError("step must be >= 0")
        return shard_rows(self.sample(batch_size, step)[0], shard)

    def heldout(self) -> torch.Tensor:
        return self.sample(self.eval_rows, self.HELDOUT_STREAM)[0]

    def heldout_codes(self) -> torch.Tensor:
        return self.sample(self.eval_rows, self.HELDOUT_STREAM)[1]

    def norm_scale(self) -> float:
        if self._scale is None:
            self._scale = expected_norm_scale(self.sample(16384, -2)[0])
        return self._scale

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {"kind": "synthetic", "d": s.d, "atoms": s.atoms, "l0": s.l0,
                "frequencies": "power_law" if s.power_law else "uniform", "noise": s.noise}


def atom_recovery(decoders: list[torch.Tensor], atoms: torch.Tensor, threshold: float = 0.9) -> tuple[float, torch.Tensor]:
    """Fraction of planted atoms whose best cosine with any decoder row (of any layer) is
    ≥ ``threshold``, and the per-atom best cosines (n_atoms,)."""
    rows = torch.cat([w for w in decoders if w.shape[0] > 0]).float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (atoms @ rows.T).max(dim=1).values  # (n_atoms,)
    return (best >= threshold).float().mean().item(), best
