"""Settings of the evaluations, one dataclass; every field has its docstring line (``--help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from esosae.config import ConfigError, Device, choices

EVALS = ("core", "probing", "curriculum")

DEFAULT_DATASETS = ("ag_news", "sst2", "amazon_sentiment", "amazon_category", "amazon_stars",
                    "uci_sentiment", "bias_in_bios_gender", "bias_in_bios_accountant", "code_language",
                    "europarl_language")
"""Every labelled set in the data dir's probing/ folder (esosae.evals.tasks.BUILTIN)."""


@dataclass
class EvalConfig:
    """What the evaluations run and how big they are; defaults are sized for 2 CPU cores."""

    only: tuple[str, ...] = EVALS
    """Evaluations to run: any of core, probing, curriculum."""
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    """Probing datasets: built-in names, local .jsonl files (text, label[, split]) or hub:NAME[:LABEL[:TEXT]]."""
    train_size: int = 1000
    """Most train texts per binary probing task, half positive and half negative."""
    test_size: int = 400
    """Most test texts per binary probing task, half positive and half negative."""
    context_size: int = 128
    """Text tokens kept per probing text (BOS is prepended; longer texts are cut)."""
    k_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    """Numbers of features (top-k by mean difference) that the sparse probes see."""
    seed: int = 42
    """Seed of the train/test splits, the balanced sampling and the planted-atom samples."""
    standardize: bool = True
    """Scale each probe's inputs to mean 0 and variance 1 on its train split before fitting."""
    probe_c: float = 1.0
    """Inverse L2 strength C of the logistic-regression probes."""
    max_iter: int = 1000
    """Iteration cap of each probe's L-BFGS fit."""
    llm_batch_tokens: int = 4096
    """Padded tokens per language-model forward pass when caching probing activations."""
    sae_batch: int = 8192
    """Tokens per SAE forward pass."""
    ce_batch: int = 8
    """Held-out contexts per language-model forward pass for CE loss recovered."""
    planted_atoms: int = 8
    """Synthetic runs: probe whether each of the first N planted atoms is active."""
    device: str = "auto"
    """Device: 'auto' (cuda when present), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        self.only = tuple(self.only)
        self.datasets = tuple(self.datasets)
        self.k_values = tuple(sorted(set(self.k_values)))
        bad = [e for e in self.only if e not in EVALS]
        if bad or not self.only:
            raise ConfigError(f"--only takes a comma list of {', '.join(EVALS)} (got {','.join(self.only)!r})")
        if not self.datasets:
            raise ConfigError("--datasets must name at least one probing dataset")
        for name in ("train_size", "test_size"):
            if getattr(self, name) < 4:
                raise ConfigError(f"{name} must be >= 4 (two texts per class; got {getattr(self, name)})")
        for name in ("context_size", "max_iter", "llm_batch_tokens", "sae_batch", "ce_batch", "planted_atoms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")
        if not self.k_values or min(self.k_values) <= 0:
            raise ConfigError(f"k_values must be positive integers (got {self.k_values})")
        if not self.probe_c > 0:
            raise ConfigError(f"probe_c must be > 0 (got {self.probe_c})")
        if self.device not in choices(Device):
            raise ConfigError(f"device must be one of {', '.join(choices(Device))} (got {self.device!r})")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
