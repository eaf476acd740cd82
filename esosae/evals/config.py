"""Settings of the evaluations, one dataclass; every field has its docstring line (``--help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from esosae.config import ConfigError, Device, choices

EVALS = ("core", "probing", "curriculum")

ALL_DATASETS = ("ag_news", "sst2", "amazon_sentiment", "amazon_category", "amazon_stars",
                "uci_sentiment", "bias_in_bios_gender", "bias_in_bios_accountant", "code_language",
                "europarl_language")
"""Every labelled set in the data dir's probing/ folder (esosae.evals.tasks.BUILTIN)."""
QUICK_DATASETS = ("ag_news", "sst2", "europarl_language", "bias_in_bios_gender")
"""The end-of-run subset: topic (4 tasks), sentiment, language (5 tasks) and gender, the
four families with the shortest texts (docs/evals.md, "The default subset")."""
PRESETS = {"quick": (QUICK_DATASETS, 300, 150), "all": (ALL_DATASETS, 1000, 400)}
"""``--datasets quick`` (the default) and ``--datasets all``: (datasets, train size, test size)."""
EXPLICIT_SIZES = (1000, 400)
"""Train and test sizes per task for a --datasets list that names datasets itself."""


@dataclass
class EvalConfig:
    """What the evaluations run and how big they are; defaults are sized for 2 CPU cores."""

    only: tuple[str, ...] = EVALS
    """Evaluations to run: any of core, probing, curriculum."""
    datasets: tuple[str, ...] = ("quick",)
    """Probing datasets: quick (4 of them, the default), all (every built-in one), or a list of built-in
    names, local .jsonl files (text, label[, split]) and hub:NAME[:LABEL[:TEXT]]."""
    train_size: int | None = None
    """Most train texts per binary probing task, half positive and half negative (auto: 300 for quick, else 1000)."""
    test_size: int | None = None
    """Most test texts per binary probing task, half positive and half negative (auto: 150 for quick, else 400)."""
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
        self._resolve_datasets()
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

    def _resolve_datasets(self) -> None:
        """Expand a preset name and fill the auto sizes; reject names no dataset can have."""
        if not self.datasets:
            raise ConfigError("--datasets must name at least one probing dataset")
        presets = [name for name in self.datasets if name in PRESETS]
        if presets and len(self.datasets) > 1:
            raise ConfigError(f"--datasets {presets[0]} stands alone (got {','.join(self.datasets)!r})")
        names, train, test = PRESETS[presets[0]] if presets else (self.datasets, *EXPLICIT_SIZES)
        bad = [n for n in names if n not in ALL_DATASETS and not n.startswith("hub:") and not n.endswith(".jsonl")]
        if bad:
            raise ConfigError(f"unknown probing dataset {bad[0]!r}: use quick, all, a comma list of "
                              f"{', '.join(ALL_DATASETS)}, a .jsonl file, or hub:NAME[:LABEL[:TEXT]]")
        self.datasets = tuple(names)
        self.train_size = train if self.train_size is None else self.train_size
        self.test_size = test if self.test_size is None else self.test_size

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
