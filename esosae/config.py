"""Run settings as dataclasses: one per concern, validated on construction.

Every field carries a docstring line (the string literal under it); the CLI turns those
lines into ``--help`` text, so a field and its documentation cannot drift apart.
A ``TrainConfig`` nests the others and round-trips through JSON (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from esosae.errors import UserError


class ConfigError(UserError, ValueError):
    """A setting that cannot be used; its message names the field and what to do."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name} must be one of {', '.join(allowed)} (got {value!r})")


@dataclass
class ModelConfig:
    """Where activations come from when the source is a language model."""

    model: str = "smollm2-135m"
    """Language model: 'smollm2-135m' (embedded, offline) or any TransformerLens 4 hub name."""
    hook: str = "blocks.6.hook_out"
    """Hook point whose activations the SAE is trained on (residual stream after block 6)."""
    cache_dir: str | None = None
    """Cache for dequantized weights and activations (default: $XDG_CACHE_HOME/esosae)."""

    def __post_init__(self) -> None:
        _check(bool(self.model), "model must be a model name, e.g. smollm2-135m")
        _check(bool(self.hook), "hook must be a hook name, e.g. blocks.6.hook_out")


@dataclass
class DataConfig:
    """The activation source: a language model over text, or a synthetic planted dictionary."""

    source: str = "lm"
    """Activation source: 'lm' (language model over --dataset) or 'synthetic' (planted atoms)."""
    dataset: str = "wikitext:1,pile:1"
    """Comma list of text sources NAME[:WEIGHT]: hub names, local files or folders."""
    context_size: int = 128
    """Tokens per context (BOS is prepended and never trained on)."""
    harvest_tokens: int = 300_000
    """Activations harvested into the on-disk cache (training tokens repeat past this)."""
    harvest_batch: int = 16
    """Contexts per language-model forward pass while harvesting."""
    cache_dtype: str = "float16"
    """Dtype of the on-disk activation cache: float16 or bfloat16."""
    eval_tokens: int = 8192
    """Held-out tokens for evaluation, never seen in training."""
    data_seed: int = 0
    """Seed of the data itself: synthetic atoms and samples, and the shuffling order."""
    normalize: str = "expected_norm"
    """Input normalization: 'expected_norm' (scale so E||s x||^2 = d) or 'none'."""
    synthetic: str = "easy"
    """Synthetic preset: 'easy' (d=128, 256 atoms, uniform, L0~4) or 'hard' (d=64, 512, power law, L0~8)."""
    synthetic_d: int | None = None
    """Override the preset's input width d."""
    synthetic_atoms: int | None = None
    """Override the preset's number of planted atoms."""
    synthetic_l0: float | None = None
    """Override the preset's mean number of active atoms per sample."""
    synthetic_noise: float = 0.01
    """Standard deviation of the Gaussian noise added per dimension of synthetic samples."""

    def __post_init__(self) -> None:
        _one_of("source", self.source, ("lm", "synthetic"))
        _one_of("cache_dtype", self.cache_dtype, ("float16", "bfloat16"))
        _one_of("normalize", self.normalize, ("expected_norm", "none"))
        _one_of("synthetic", self.synthetic, ("easy", "hard"))
        _check(self.context_size > 0, f"context_size must be > 0 (got {self.context_size})")
        _check(self.harvest_tokens > 0, f"harvest_tokens must be > 0 (got {self.harvest_tokens})")
        _check(self.harvest_batch > 0, f"harvest_batch must be > 0 (got {self.harvest_batch})")
        _check(self.eval_tokens > 0, f"eval_tokens must be > 0 (got {self.eval_tokens})")
        _check(bool(self.dataset.strip()), "dataset must name at least one text source")
        for name in ("synthetic_d", "synthetic_atoms"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{name} must be > 0 (got {v})")
        _check(self.synthetic_l0 is None or self.synthetic_l0 > 0, "synthetic_l0 must be > 0")
        _check(self.synthetic_noise >= 0, "synthetic_noise must be >= 0")


@dataclass
class SAEConfig:
    """The autoencoder: architecture, widths, sparsity, margins and orthogonality."""

    arch: str = "esosae"
    """'esosae' (JumpReLU with scheduled thresholds), 'relu' (vanilla ReLU + L1) or 'topk'."""
    m1: int | None = None
    """Width of layer 1 (default: from the source, see AUTO_DEFAULTS)."""
    m2: int | None = None
    """Width of layer 2, trained on layer 1's residual; 0 gives a single-layer SAE (default: m1, or 0 for relu/topk)."""
    k: int | None = None
    """Active features per token for arch='topk' (default: round(target_l0))."""
    target_l0: float | None = None
    """Target active features per token per layer; sets freq_target = target_l0 / m (default: from the source)."""
    l1_coeff: float | None = None
    """L1 coefficient λ1 of layer 1 (default: from the source and arch)."""
    l1_coeff2: float | None = None
    """L1 coefficient λ2 of layer 2 (default: same as λ1)."""
    margins: str = "adaptive"
    """Per-feature margins μ: 'adaptive' (from firing rates) or 'fixed' (μ = 1)."""
    clamp_margins: bool = True
    """Clamp μ to [mu_min, mu_max]; False lets μ roam (ablation)."""
    mu_min: float = 0.25
    """Lower clamp of the margins."""
    mu_max: float = 4.0
    """Upper clamp of the margins."""
    margin_lr: float = 0.05
    """Margin step η in μ ← μ·exp(η(log(freq+ε) − log freq_target))."""
    margin_band: float = 10.0
    """Margins move only for features firing outside [target/band, target·band]."""
    margin_every: int = 10
    """Steps between margin updates."""
    freq_ema: float = 0.99
    """Decay of the firing-frequency moving average."""
    freq_eps: float = 1e-6
    """ε in log(freq + ε), so a silent feature's margin update stays finite."""
    orth_margin: float = 0.1
    """ρ: cosine below which a cross-layer pair costs nothing."""
    gamma_max: float = 1.0
    """Final weight γ_max of the orthogonality penalty (0 disables it)."""
    orth_every: int = 1
    """Compute the orthogonality penalty every this many steps."""
    orth_block_fraction: float | None = None
    """Fraction of 64x64 tiles sampled per step (unbiased); default auto = min(1, B/(3·m2))."""

    def __post_init__(self) -> None:
        _one_of("arch", self.arch, ("esosae", "relu", "topk"))
        _one_of("margins", self.margins, ("adaptive", "fixed"))
        _check(self.m1 is None or self.m1 > 0, f"m1 must be > 0 (got {self.m1})")
        _check(self.m2 is None or self.m2 >= 0, f"m2 must be >= 0 (got {self.m2})")
        _check(self.arch == "esosae" or not self.m2, f"arch={self.arch} is single-layer: set m2=0")
        _check(self.k is None or self.k > 0, f"k must be > 0 (got {self.k})")
        _check(self.arch != "topk" or None in (self.k, self.m1) or self.k <= self.m1,
               f"k={self.k} exceeds m1={self.m1}")
        _check(self.target_l0 is None or self.target_l0 > 0, f"target_l0 must be > 0 (got {self.target_l0})")
        _check(self.l1_coeff is None or self.l1_coeff >= 0, f"l1_coeff must be >= 0 (got {self.l1_coeff})")
        _check(self.l1_coeff2 is None or self.l1_coeff2 >= 0, "l1_coeff2 must be >= 0")
        _check(0 < self.mu_min <= 1 <= self.mu_max,
               f"need 0 < mu_min <= 1 <= mu_max (got mu_min={self.mu_min}, mu_max={self.mu_max})")
        _check(self.margin_lr >= 0, "margin_lr must be >= 0")
        _check(self.margin_band >= 1, f"margin_band must be >= 1 (got {self.margin_band})")
        _check(self.margin_every > 0, "margin_every must be > 0")
        _check(0 <= self.freq_ema < 1, f"freq_ema must be in [0, 1) (got {self.freq_ema})")
        _check(self.freq_eps > 0, "freq_eps must be > 0")
        _check(0 <= self.orth_margin < 1, f"orth_margin must be in [0, 1) (got {self.orth_margin})")
        _check(self.gamma_max >= 0, "gamma_max must be >= 0")
        _check(self.orth_every > 0, "orth_every must be > 0")
        f = self.orth_block_fraction
        _check(f is None or 0 < f <= 1, f"orth_block_fraction must be in (0, 1] (got {f})")

    @property
    def lambda2(self) -> float:
        return self.l1_coeff if self.l1_coeff2 is None else self.l1_coeff2


@dataclass
class ScheduleConfig:
    """The threshold curriculum τ(t) and the orthogonality warmup γ(t)."""

    schedule: str = "exp"
    """Threshold schedule: 'exp' (geometric, default), 'linear' or 'const'."""
    tau_0: float = 1e-3
    """Starting threshold τ_0 (exp needs 0 < τ_0 < τ_T)."""
    tau_final: float | None = None
    """Final threshold τ_T of layer 1, in units of the normalized activations (default: from the source)."""
    tau_final2: float | None = None
    """Final threshold of layer 2 (default: same as layer 1)."""
    schedule_fraction: float = 0.8
    """Fraction of training over which τ moves from τ_0 to τ_T."""
    gamma_warmup: str = "synced"
    """γ warmup: 'synced' (γ_max·s(t)), 'linear' (γ_max·t/T) or 'none' (γ_max throughout)."""
    l1_warmup_fraction: float = 0.05
    """Fraction of training over which λ rises linearly from 0."""

    def __post_init__(self) -> None:
        _one_of("schedule", self.schedule, ("exp", "linear", "const"))
        _one_of("gamma_warmup", self.gamma_warmup, ("synced", "linear", "none"))
        _check(0 < self.schedule_fraction <= 1, "schedule_fraction must be in (0, 1]")
        _check(0 <= self.l1_warmup_fraction <= 1, "l1_warmup_fraction must be in [0, 1]")
        _check(self.tau_0 >= 0, f"tau_0 must be >= 0 (got {self.tau_0})")
        for name in ("tau_final", "tau_final2"):
            tau_t = getattr(self, name)
            if tau_t is None:
                continue
            _check(tau_t >= 0, f"{name} must be >= 0 (got {tau_t})")
            if self.schedule == "exp":
                _check(0 < self.tau_0 < tau_t,
                       f"schedule exp needs 0 < tau_0 < {name} (got tau_0={self.tau_0}, {name}={tau_t})")
            else:
                _check(0 <= self.tau_0 <= tau_t, f"need 0 <= tau_0 <= {name}")

    @property
    def tau_final_2(self) -> float:
        return self.tau_final if self.tau_final2 is None else self.tau_final2


@dataclass
class TrainConfig:
    """One training run; nests the model, data, SAE and schedule settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 600
    """Optimizer steps; tokens seen = steps × batch_size."""
    batch_size: int = 1024
    """Activations (tokens) per step."""
    lr: float | None = None
    """Peak Adam learning rate (default: from the source, see AUTO_DEFAULTS)."""
    lr_warmup_fraction: float = 0.02
    """Fraction of training over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.2
    """Final fraction of training over which the learning rate decays linearly to 0."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.999
    """Adam β2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed for initialization, data order and tile sampling."""
    dead_window: int = 1_000_000
    """A feature is dead if it has not fired in this many tokens (or in the whole run if shorter)."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted."""
    out_dir: str = "runs/latest"
    """Run directory."""
    backend: str = "auto"
    """Kernel backend: 'auto' (triton with CUDA, torch otherwise), 'triton' or 'torch'."""
    device: str = "auto"
    """Device: 'auto' (cuda when present), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """Product precision: 'auto' (bf16 on CUDA, fp32 on the CPU), 'bf16', 'fp16', 'tf32' or 'fp32'; weights stay fp32."""
    eval: bool = True
    """Run the evaluations when training ends."""
    profile: str = "none"
    """Profiling: 'none', 'nvtx' (NVTX ranges for Nsight) or 'torch' (torch.profiler trace)."""

    def __post_init__(self) -> None:
        self._resolve_auto()
        _check(self.steps > 0, f"steps must be > 0 (got {self.steps})")
        _check(self.batch_size > 0, f"batch_size must be > 0 (got {self.batch_size})")
        _check(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        _check(0 <= self.lr_warmup_fraction <= 1, "lr_warmup_fraction must be in [0, 1]")
        _check(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction must be in [0, 1]")
        _check(self.lr_warmup_fraction + self.lr_decay_fraction <= 1,
               "lr_warmup_fraction + lr_decay_fraction must be <= 1")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "Adam betas must be in [0, 1)")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0")
        _check(self.dead_window > 0, "dead_window must be > 0")
        _check(self.log_every > 0, "log_every must be > 0")
        _check(self.checkpoint_every > 0, "checkpoint_every must be > 0")
        _check(self.keep_checkpoints > 0, "keep_checkpoints must be > 0")
        _check(bool(self.out_dir), "out_dir must be a directory path")
        _one_of("backend", self.backend, ("auto", "triton", "torch"))
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        _one_of("dtype", self.dtype, ("auto", "bf16", "fp16", "fp32", "tf32"))
        _one_of("profile", self.profile, ("none", "nvtx", "torch"))

    def _resolve_auto(self) -> None:
        """Fill the fields left as None ("auto") from AUTO_DEFAULTS for this source and arch,
        then validate the sections again with the concrete values."""
        key = self.data.synthetic if self.data.source == "synthetic" else "lm"
        auto = AUTO_DEFAULTS[key]
        sae, sched = self.sae, self.schedule
        if sae.target_l0 is None:
            sae.target_l0 = auto["target_l0"]
        if sae.m1 is None:
            sae.m1 = auto["m"]
        if sae.m2 is None:
            sae.m2 = sae.m1 if sae.arch == "esosae" else 0
        if sae.k is None:
            sae.k = max(1, round(sae.target_l0))
        if sae.l1_coeff is None:
            sae.l1_coeff = auto["l1_coeff_relu" if sae.arch == "relu" else "l1_coeff"]
        if self.lr is None:
            self.lr = auto["lr"]
        if sched.tau_final is None:
            sched.tau_final = auto["tau_final"]
            if sched.tau_final2 is None:  # an explicit τ_T alone keeps meaning "both layers"
                sched.tau_final2 = auto.get("tau_final2")
        sae.__post_init__()
        sched.__post_init__()

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size

    @property
    def orth_block_fraction(self) -> float:
        """METHOD.md §3: auto = min(1, B / (3·m2)), about one encoder matmul of work."""
        if self.sae.orth_block_fraction is not None:
            return self.sae.orth_block_fraction
        return min(1.0, self.batch_size / (3 * max(self.sae.m2, 1)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(cls.read_json(path))

    @staticmethod
    def read_json(path: str | Path) -> dict[str, Any]:
        """The JSON object in ``path``, or a ConfigError naming the file and the problem."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config {path} must hold a JSON object")
        return d


AUTO_DEFAULTS: dict[str, dict[str, float]] = {
    # The embedded language model (SmolLM2-135M, block 6); see README "The default run".
    # Calibrated on 600 steps × 1,024 tokens (docs/default_run.md): with one τ_T, layer 1
    # ends 7× sparser than layer 2 (its margins pin at μ_max while everything fires early),
    # so each layer gets its own τ_T.
    "lm": {"lr": 1e-3, "m": 1152, "target_l0": 16.0, "l1_coeff": 0.5, "l1_coeff_relu": 2.0, "tau_final": 0.2,
           "tau_final2": 0.55},
    # Planted dictionaries (esosae.sources.PRESETS). The hard one (512 atoms in 64
    # dimensions, power-law frequencies down to 0.2%) needs a 4x overcomplete dictionary
    # and a larger step for any architecture to reach its rare atoms in 2,000 steps.
    "easy": {"m": 256, "target_l0": 4.0, "l1_coeff": 0.05, "l1_coeff_relu": 1.0, "tau_final": 1.0, "lr": 1e-3},
    "hard": {"m": 2048, "target_l0": 8.0, "l1_coeff": 0.05, "l1_coeff_relu": 1.0, "tau_final": 1.0, "lr": 5e-3},
}
"""Defaults of the fields left as None, by source ('lm') or synthetic preset."""

SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "sae": SAEConfig, "schedule": ScheduleConfig,
}


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    kwargs = {}
    for name, value in d.items():
        sub = SECTIONS.get(name) if cls is TrainConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {name!r} must be an object")
            value = _from_dict(sub, value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__}: {e}") from None


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring line under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = str(nxt.value.value).strip()
    return docs
