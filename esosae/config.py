"""Run settings as dataclasses: one per concern, typed, validated on construction.

Every field has one declared type, and the type is the whole of what a value may be:

- a choice set is a ``Literal`` alias declared once, here (``Schedule``, ``Arch``, …):
  validation, the flags' choices and ``--help`` all read it (``choices(Dtype)``);
- a number's range is ``Annotated[int | float, Range(...)]`` (``PosInt``, ``Fraction``, …);
  floats must be finite (a Range with ``finite=False`` would say otherwise; none does);
  ints fit in 64 bits; strings are non-blank and hold no NUL;
- ``X | None`` is "auto": TrainConfig fills a None in from AUTO_DEFAULTS.

``convert`` is the one strict converter that ``--config`` JSON and the flags
(``esosae.args``) share: no bool from a string, no int from 20.5 or "20", no float from
NaN or ±inf, unknown keys rejected; every error is a one-line ConfigError that names the
field, the value and what is allowed. Each ``__post_init__`` converts every field
(``check_fields``), then checks the rules between fields (target L0 ≤ width, τ_0 < τ_T, …),
so a bad setting fails where the config is built, before anything touches the disk.

Every field carries a docstring line (the string literal under it); the CLI turns those
lines into ``--help`` text, so a field and its documentation cannot drift apart.
A ``TrainConfig`` nests the others and round-trips through JSON (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import numbers
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from esosae.errors import UserError


class ConfigError(UserError, ValueError):
    """A setting that cannot be used; its message names the field and what to do."""


# -- the declarations: choice sets and ranges -----------------------------------------------

Source = Literal["lm", "synthetic"]
Activations = Literal["cache", "stream"]
Synthetic = Literal["easy", "hard"]
CacheDtype = Literal["float16", "bfloat16"]
Normalize = Literal["expected_norm", "none"]
Arch = Literal["esosae", "relu", "topk", "batchtopk", "jumprelu"]
Margins = Literal["adaptive", "fixed", "learned"]
Sparsity = Literal["l1", "l0"]
OrthNorm = Literal["pairs", "rows"]
Schedule = Literal["exp", "linear", "const"]
GammaWarmup = Literal["synced", "linear", "none"]
KernelBackend = Literal["auto", "triton", "torch"]
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "bf16", "fp16", "fp32", "tf32"]
Profile = Literal["none", "nvtx", "torch"]
Tracker = Literal["none", "tensorboard", "trackio", "wandb"]


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` choice set, in declaration order."""
    return typing.get_args(alias)


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field (None: unbounded on that side)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = True
    """Floats must be finite; a field whose documentation gives ±inf a meaning sets False."""

    def __contains__(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def __str__(self) -> str:
        lo, hi = (self.gt if self.gt is not None else self.ge), (self.lt if self.lt is not None else self.le)
        if lo is not None and hi is not None:
            return f"in {'(' if self.gt is not None else '['}{lo:g}, {hi:g}{')' if self.lt is not None else ']'}"
        if lo is not None:
            return f"{'>' if self.gt is not None else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.lt is not None else '<='} {hi:g}"
        return ""


PosInt = Annotated[int, Range(gt=0)]
NonNegInt = Annotated[int, Range(ge=0)]
Seed = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
"""A fraction in [0, 1]."""
OpenFraction = Annotated[float, Range(gt=0, le=1)]
"""A fraction in (0, 1]: some of it, at most all."""
Decay = Annotated[float, Range(ge=0, lt=1)]
"""A decay or momentum factor in [0, 1)."""

INT64 = Range(ge=-2**63, lt=2**63)


# -- the one converter ----------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What a field accepts, read from its annotation (``field_specs``)."""

    kind: type
    """bool, int, float, str, tuple (with ``item``), or a config dataclass (a section)."""
    optional: bool = False
    choices: tuple[str, ...] = ()
    range: Range | None = None
    item: Spec | None = None

    def describe(self, flag: bool = False) -> str:
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        elif self.kind is bool:
            what = "true or false"
        elif self.kind is int:
            what = "an integer"
        elif self.kind is float:
            what = "a finite number" if self.range is None or self.range.finite else "a number"
        elif self.kind is str:
            what = "a non-empty string"
        elif self.kind is tuple:
            assert self.item is not None
            what = f"a {'comma ' if flag else ''}list, each {self.item.describe(flag)}"
        else:
            what = f"an object of {self.kind.__name__} fields"
        if self.range is not None and str(self.range):
            what += f" {self.range}"
        if self.optional:
            what += " or auto" if flag else " or null (auto)"
        return what


def spec_of(tp: Any) -> Spec:
    """The Spec of one (resolved) annotation; an annotation outside the supported set is a bug."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {tp!r}: one type or None")
        tp, optional = args[0], True
    rng = None
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        rng = next((m for m in meta if isinstance(m, Range)), None)
    if typing.get_origin(tp) is Literal:
        return Spec(str, optional, choices=choices(tp))
    if typing.get_origin(tp) is tuple:
        item, *rest = typing.get_args(tp)
        if rest != [Ellipsis]:
            raise TypeError(f"unsupported config annotation {tp!r}: tuple[X, ...]")
        return Spec(tuple, optional, item=spec_of(item))
    if tp in (bool, int, float, str) or dataclasses.is_dataclass(tp):
        return Spec(tp, optional, range=rng)
    raise TypeError(f"unsupported config annotation {tp!r}")


@cache
def field_specs(cls: type) -> dict[str, Spec]:
    """{field name: Spec} of a dataclass, from its annotations."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: spec_of(hints[f.name]) for f in dataclasses.fields(cls)}


def show(value: Any) -> str:
    """A value as the user wrote it (JSON spelling), on one line and at most 60 characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<a {value.bit_length()}-bit integer>"
    try:
        text = json.dumps(value)  # ASCII: no character that any reader takes for a line break
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except Exception:  # noqa: BLE001 - any object: say what it is rather than fail
            text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def convert(spec: Spec, value: Any, name: str, flag: bool = False, typed: str | None = None) -> Any:
    """``value`` as the type ``spec`` declares, or a ConfigError naming ``name`` (a field, or a
    flag when ``flag``), the value (``typed``: as the user typed it, else its JSON spelling)
    and what is allowed. Ints become floats for float fields, lists become tuples; nothing
    else is coerced."""
    shown = typed if typed is not None else show(value)

    def bad() -> ConfigError:
        return ConfigError(f"invalid {name} {shown}: must be {spec.describe(flag)}")

    if value is None:
        if spec.optional:
            return None
        raise bad()
    kind = spec.kind
    if spec.choices:
        if not (isinstance(value, str) and value in spec.choices):
            raise bad()
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(value, bool) and kind in (int, float, str, tuple):  # True is not 1 here
        raise bad()
    if kind is int:
        if not isinstance(value, numbers.Integral):
            raise bad()
        value = int(value)
        if value not in INT64:
            raise ConfigError(f"{name} must be {spec.describe(flag)} and fit in 64 bits (got {shown})")
    elif kind is float:
        if not isinstance(value, numbers.Real):
            raise bad()
        try:
            value = float(value)
        except (OverflowError, ValueError, TypeError):
            raise bad() from None
        if not math.isfinite(value) and (spec.range is None or spec.range.finite):
            raise bad()
    elif kind is str:
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise bad()
    elif kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        assert spec.item is not None
        return tuple(convert(spec.item, v, f"{name}[{i}]", flag) for i, v in enumerate(value))
    elif not isinstance(value, kind):
        raise bad()
    if spec.range is not None and value not in spec.range:
        raise ConfigError(f"{name} must be {spec.range} (got {shown})")
    return value


def check_fields(obj: Any) -> None:
    """Convert every field of dataclass instance ``obj`` in place (``convert``)."""
    for name, spec in field_specs(type(obj)).items():
        object.__setattr__(obj, name, convert(spec, getattr(obj, name), name))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# -- the settings ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Where activations come from when the source is a language model."""

    model: str = "smollm2-135m"
    """Language model: 'smollm2-135m' (embedded, offline), a saved transformers model's folder, or a hub name."""
    hook: str = "blocks.6.hook_out"
    """Hook point whose activations the SAE is trained on (residual stream after block 6); a comma list trains one SAE per hook on shared forward passes."""
    cache_dir: str | None = None
    """Cache for dequantized weights and activations (default: $XDG_CACHE_HOME/esosae)."""

    def __post_init__(self) -> None:
        check_fields(self)
        folder = Path(self.model).expanduser()
        if len(folder.parts) > 1 and folder.is_dir():  # a model folder (a bare name is a model's name):
            self.model = str(folder.resolve())  # stored absolute, so caches, resumes and evals find it anywhere
        hooks = self.hooks
        _check(all(hooks), f"hook {self.hook!r} has an empty entry; give a comma list of hook names")
        _check(len(set(hooks)) == len(hooks), f"hook {self.hook!r} names a hook twice")

    @property
    def hooks(self) -> list[str]:
        """The hook points of ``hook``, a comma list."""
        return [h.strip() for h in self.hook.split(",")]


SYNTHETIC_PRESETS: dict[str, dict[str, float]] = {
    "easy": {"d": 128, "atoms": 256, "l0": 4.0},
    "hard": {"d": 64, "atoms": 512, "l0": 8.0},
}
"""Input width, atoms and mean L0 of each planted-dictionary preset: esosae.data.sources.PRESETS
builds the sources from these, and the rules between fields check against them."""


@dataclass
class DataConfig:
    """The activation source: a language model over text, or a synthetic planted dictionary."""

    source: Source = "lm"
    """Activation source: 'lm' (language model over --dataset) or 'synthetic' (planted atoms)."""
    dataset: str = "wikitext:1,pile:1"
    """Comma list of text sources NAME[:WEIGHT]: hub names, local files or folders."""
    context_size: PosInt = 128
    """Tokens per context (BOS is prepended and never trained on)."""
    activations: Activations = "cache"
    """'cache' (harvest to disk once, then train; reused by later runs) or 'stream' (the language model runs beside training; nothing on disk)."""
    buffer_tokens: Annotated[int, Range(ge=1024)] = 1 << 17
    """Stream mode: tokens per shuffled window; memory 2 x buffer_tokens x d x 2 bytes per hook (302 MB at d=576)."""
    harvest_tokens: PosInt = 300_000
    """Activations harvested into the on-disk cache (training tokens repeat past this)."""
    harvest_batch: PosInt = 16
    """Contexts per language-model forward pass while harvesting."""
    cache_dtype: CacheDtype = "float16"
    """Dtype of the on-disk activation cache: float16 or bfloat16."""
    eval_tokens: Annotated[int, Range(ge=2)] = 8192
    """Held-out tokens for evaluation, never seen in training (at least 2: FVU needs their variance)."""
    data_seed: Seed = 0
    """Seed of the data itself: synthetic atoms and samples, and the shuffling order."""
    normalize: Normalize = "expected_norm"
    """Input normalization: 'expected_norm' (scale so E||s x||^2 = d) or 'none'."""
    synthetic: Synthetic = "easy"
    """Synthetic preset: 'easy' (d=128, 256 atoms, uniform, L0~4) or 'hard' (d=64, 512, power law, L0~8)."""
    synthetic_d: PosInt | None = None
    """Override the preset's input width d."""
    synthetic_atoms: PosInt | None = None
    """Override the preset's number of planted atoms."""
    synthetic_l0: PosFloat | None = None
    """Override the preset's mean number of active atoms per sample (at most the atoms)."""
    synthetic_noise: NonNegFloat = 0.01
    """Standard deviation of the Gaussian noise added per dimension of synthetic samples."""

    def __post_init__(self) -> None:
        check_fields(self)
        preset = SYNTHETIC_PRESETS[self.synthetic]
        atoms = self.synthetic_atoms if self.synthetic_atoms is not None else int(preset["atoms"])
        l0 = self.synthetic_l0 if self.synthetic_l0 is not None else preset["l0"]
        _check(l0 <= atoms,
               f"synthetic_l0 {l0:g}{'' if self.synthetic_l0 is not None else f' (the {self.synthetic} preset)'} "
               f"exceeds synthetic_atoms {atoms}"
               f"{'' if self.synthetic_atoms is not None else f' (the {self.synthetic} preset)'}: "
               "a sample cannot have more active atoms than there are atoms")


@dataclass
class SAEConfig:
    """The autoencoder: architecture, widths, sparsity, margins and orthogonality."""

    arch: Arch = "esosae"
    """'esosae' (JumpReLU with scheduled thresholds), 'relu' (ReLU + L1), 'topk', 'batchtopk' or 'jumprelu' (learned θ)."""
    m1: PosInt | None = None
    """Width of layer 1 (default: from the source, see AUTO_DEFAULTS)."""
    m2: NonNegInt | None = None
    """Width of layer 2, trained on layer 1's residual; 0 gives a single-layer SAE (default: m1, or 0 for relu/topk)."""
    k: PosInt | None = None
    """Active features per token for arch='topk' (per token) and 'batchtopk' (batch mean), at most m1 (default: round(target_l0))."""
    target_l0: PosFloat | None = None
    """Target active features per token per layer, at most each layer's width; sets freq_target = target_l0 / m (default: from the source)."""
    l1_coeff: NonNegFloat | None = None
    """Sparsity coefficient λ1 of layer 1, on L1 or L0 as ``sparsity`` says (default: from the source and arch)."""
    l1_coeff2: NonNegFloat | None = None
    """Sparsity coefficient λ2 of layer 2 (default: same as λ1)."""
    margins: Margins = "adaptive"
    """Per-feature margins μ: 'adaptive' (from firing rates), 'fixed' (μ = 1) or 'learned' (JumpReLU STE)."""
    sparsity: Sparsity | None = None
    """Sparsity term: 'l1' (Σ f) or 'l0' (Σ 1[a > θ], gradient to θ only; needs learned θ). Default: l0 for jumprelu, else l1."""
    jump_bandwidth: PosFloat = 0.05
    """ε: width of the rectangle kernel of the threshold's straight-through gradient (learned θ)."""
    clamp_margins: bool = True
    """Clamp μ to [mu_min, mu_max]; False lets μ roam (ablation)."""
    mu_min: OpenFraction = 0.25
    """Lower clamp of the margins, in (0, 1]."""
    mu_max: Annotated[float, Range(ge=1)] = 4.0
    """Upper clamp of the margins, >= 1."""
    margin_lr: NonNegFloat = 0.05
    """Margin step η in μ ← μ·exp(η(log(freq+ε) − log freq_target))."""
    margin_band: Annotated[float, Range(ge=1)] = 3.0
    """Margins move only for features firing outside [target/band, target·band]."""
    margin_freeze: Fraction = 0.3
    """Adaptive margins stay put while the schedule progress s(t) is below this."""
    margin_every: PosInt = 10
    """Steps between margin updates."""
    freq_ema: Decay = 0.9
    """Decay of the firing-frequency moving average."""
    freq_eps: PosFloat = 1e-6
    """ε in log(freq + ε), so a silent feature's margin update stays finite."""
    orth_margin: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """ρ: cosine below which a cross-layer pair costs nothing."""
    gamma_max: NonNegFloat = 1.0
    """Final weight γ_max of the orthogonality penalty (0 disables it)."""
    orth_norm: OrthNorm = "pairs"
    """Normalization of the penalty's sum: 'pairs' (1/(m1·m2)) or 'rows' (1/m1)."""
    aux_k: NonNegInt = 0
    """AuxK: dead features (of both layers) that reconstruct the residual error per token; 0 disables."""
    aux_coeff: NonNegFloat = 1 / 32
    """AuxK loss coefficient."""
    aux_dead_tokens: PosInt = 50_000
    """A feature counts as dead for AuxK after this many tokens without firing."""
    orth_every: PosInt = 1
    """Compute the orthogonality penalty every this many steps."""
    orth_block_fraction: OpenFraction | None = None
    """Fraction of 64x64 tiles sampled per step (unbiased); default auto = min(1, B/(3·m2))."""

    def __post_init__(self) -> None:
        check_fields(self)
        learned = self.margins == "learned" or self.arch == "jumprelu"
        _check(self.sparsity != "l0" or learned,
               f"sparsity=l0 gives a gradient to the thresholds only: use margins=learned or arch=jumprelu "
               f"(got margins={self.margins}, arch={self.arch})")
        _check(self.arch == "esosae" or not self.m2,
               f"arch={self.arch} is single-layer: set m2=0 (got m2={self.m2})")
        _check(self.arch not in ("topk", "batchtopk") or None in (self.k, self.m1) or self.k <= self.m1,  # type: ignore[operator]
               f"k={self.k} exceeds m1={self.m1}: TopK cannot keep more features than layer 1 has")
        if self.target_l0 is not None:
            for name in ("m1", "m2"):
                width = getattr(self, name)
                _check(not width or self.target_l0 <= width,
                       f"target_l0 {self.target_l0:g} exceeds {name}={width}: a layer cannot have more "
                       "active features per token than features")

    @property
    def learned_thresholds(self) -> bool:
        """θ trained through the straight-through estimator (margins=learned, or arch=jumprelu)."""
        return self.margins == "learned" or self.arch == "jumprelu"

    @property
    def lambda2(self) -> float:
        return self.l1_coeff if self.l1_coeff2 is None else self.l1_coeff2


@dataclass
class ScheduleConfig:
    """The threshold curriculum τ(t) and the orthogonality warmup γ(t)."""

    schedule: Schedule = "exp"
    """Threshold schedule: 'exp' (geometric, default), 'linear' or 'const'."""
    tau_0: NonNegFloat = 1e-3
    """Starting threshold τ_0 (exp needs 0 < τ_0 < τ_T; linear and const τ_0 ≤ τ_T)."""
    tau_final: NonNegFloat | None = None
    """Final threshold τ_T of layer 1, in units of the normalized activations (default: from the source)."""
    tau_final2: NonNegFloat | None = None
    """Final threshold of layer 2 (default: same as layer 1)."""
    schedule_fraction: OpenFraction = 0.8
    """Fraction of training over which τ moves from τ_0 to τ_T."""
    gamma_warmup: GammaWarmup = "synced"
    """γ warmup: 'synced' (γ_max·s(t)), 'linear' (γ_max·t/T) or 'none' (γ_max throughout)."""
    l1_warmup_fraction: Fraction = 0.05
    """Fraction of training over which λ rises linearly from 0."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("tau_final", "tau_final2"):
            tau_t = getattr(self, name)
            if tau_t is None:
                continue
            if self.schedule == "exp":
                _check(0 < self.tau_0 < tau_t,
                       f"schedule exp needs 0 < tau_0 < {name} (got tau_0={self.tau_0:g}, {name}={tau_t:g})")
            else:
                _check(self.tau_0 <= tau_t,
                       f"schedule {self.schedule} needs tau_0 <= {name} (got tau_0={self.tau_0:g}, {name}={tau_t:g})")

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
    steps: PosInt = 600
    """Optimizer steps; tokens seen = steps × batch_size."""
    batch_size: Annotated[int, Range(ge=2)] = 1024
    """Activations (tokens) per step (at least 2: FVU needs the batch's variance)."""
    lr: PosFloat | None = None
    """Peak Adam learning rate (default: from the source, see AUTO_DEFAULTS)."""
    lr_warmup_fraction: Fraction = 0.02
    """Fraction of training over which the learning rate rises linearly from 0."""
    lr_decay_fraction: Fraction = 0.2
    """Final fraction of training over which the learning rate decays linearly to 0."""
    adam_beta1: Decay = 0.9
    """Adam β1."""
    adam_beta2: Decay = 0.999
    """Adam β2."""
    grad_clip: NonNegFloat = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: Seed = 0
    """Seed for initialization, data order and tile sampling."""
    dead_window: PosInt = 1_000_000
    """A feature is dead if it has not fired in this many tokens (or in the whole run if shorter)."""
    log_every: PosInt = 10
    """Steps between lines of metrics.jsonl."""
    checkpoint_every: PosInt = 500
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: PosInt = 2
    """Checkpoints kept on disk; older ones are deleted."""
    out_dir: str = "runs/latest"
    """Run directory."""
    backend: KernelBackend = "auto"
    """Kernel backend: 'auto' (triton with CUDA, torch otherwise), 'triton' or 'torch'."""
    device: Device = "auto"
    """Device: 'auto' (cuda when present), 'cpu' or 'cuda'."""
    dtype: Dtype = "auto"
    """Product precision: 'auto' (bf16 on CUDA, fp32 on the CPU), 'bf16', 'fp16', 'tf32' or 'fp32'; weights stay fp32."""
    pairs_max_density: Fraction = 0.01
    """Triton backend: the largest density of f at which the step runs on its active pairs (0: always dense, no host sync)."""
    eval: bool = True
    """Run the evaluations when training ends."""
    profile: Profile = "none"
    """Profiling: 'none', 'nvtx' (NVTX ranges for Nsight) or 'torch' (torch.profiler trace)."""
    log: Tracker = "none"
    """Experiment tracker: 'none', 'tensorboard', 'trackio' or 'wandb' (each a pip extra of esosae)."""

    def __post_init__(self) -> None:
        check_fields(self)
        self._resolve_auto()
        _check(self.data.source == "lm" or len(self.model.hooks) == 1,
               f"hook {self.model.hook!r} names several hooks, which only a language model has: "
               "use --source lm, or one hook")
        _check(self.lr_warmup_fraction + self.lr_decay_fraction <= 1,
               f"lr_warmup_fraction + lr_decay_fraction must be <= 1 (got {self.lr_warmup_fraction:g} + "
               f"{self.lr_decay_fraction:g})")

    def _resolve_auto(self) -> None:
        """Fill the fields left as None ("auto") from AUTO_DEFAULTS for this source and arch,
        then validate the sections again with the concrete values."""
        key = self.data.synthetic if self.data.source == "synthetic" else "lm"
        auto = AUTO_DEFAULTS[key]
        sae, sched = self.sae, self.schedule
        if sae.target_l0 is None:
            sae.target_l0 = auto["target_l0"]
        if sae.m1 is None:
            sae.m1 = int(auto["m"])
        if sae.m2 is None:
            sae.m2 = sae.m1 if sae.arch == "esosae" else 0
        if sae.sparsity is None:
            sae.sparsity = "l0" if sae.arch == "jumprelu" else "l1"
        if sae.k is None:  # capped at m1 so that a target_l0 past m1 is reported as that, below
            sae.k = max(1, round(min(sae.target_l0, sae.m1)))
        if sae.l1_coeff is None:
            sae.l1_coeff = auto["l1_coeff_relu" if sae.arch == "relu" else
                                "l0_coeff" if sae.sparsity == "l0" else "l1_coeff"]
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
        """A TrainConfig from JSON-shaped data: every value converted strictly (``convert``),
        unknown keys rejected, each error a ConfigError naming the field (``sae.m1``)."""
        return _from_dict(cls, d, "")

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
        except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4,300 digits, deep nesting
            raise ConfigError(f"config {path} is not usable JSON ({str(e).splitlines()[0][:80]})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config {path} must hold a JSON object")
        return d


AUTO_DEFAULTS: dict[str, dict[str, float]] = {
    # The embedded language model (SmolLM2-135M, block 6); see README "The default run".
    # One τ_T for both layers under the v2 controller, calibrated on the default run itself
    # (600 × 1,024 tokens, 2 × 1,152 features, target L0 16 per layer): τ_T 0.89 (the v2
    # screening's knob at half the width) gave L0 9.2 + 8.8, 0.6 gave 13.9 + 13.1, 0.5 gave
    # 15.8 + 14.5 (−5%); v1 needed 0.2 / 0.55 (V1_TAU_FINAL).
    "lm": {"lr": 1e-3, "m": 1152, "target_l0": 16.0, "l1_coeff": 0.5, "l1_coeff_relu": 2.0, "l0_coeff": 1.0,
           "tau_final": 0.5},
    # Planted dictionaries (esosae.data.sources.PRESETS). The hard one (512 atoms in 64
    # dimensions, power-law frequencies down to 0.2%) needs a 4x overcomplete dictionary
    # and a larger step for any architecture to reach its rare atoms in 2,000 steps.
    "easy": {"m": 256, "target_l0": 4.0, "l1_coeff": 0.05, "l1_coeff_relu": 1.0, "l0_coeff": 0.1, "tau_final": 1.0,
             "lr": 1e-3},
    "hard": {"m": 2048, "target_l0": 8.0, "l1_coeff": 0.05, "l1_coeff_relu": 1.0, "l0_coeff": 0.5, "tau_final": 1.0,
             "lr": 5e-3},
}
"""Defaults of the fields left as None, by source ('lm') or synthetic preset."""

V1_METHOD: dict[str, Any] = {"freq_ema": 0.99, "margin_band": 10.0, "margin_freeze": 0.0}
"""The SAEConfig fields in which E-SOSAE v1 (docs/METHOD.md §10) differs from today's defaults;
presets/esosae-v1.json sets them (``python train.py --config presets/esosae-v1.json``)."""
V1_TAU_FINAL: dict[str, tuple[float, float]] = {"lm": (0.2, 0.55)}
"""v1's (τ_T1, τ_T2) where they differed from today's auto ones: the language model's split
(layer 1's margins pinned at μ_max under v1's controller; docs/default_run.md)."""
RECOVERING_CONTROLLER: dict[str, Any] = {"freq_ema": 0.9, "margin_band": 3.0, "margin_freeze": 0.3}
"""The v2 controller (METHOD.md §5.1), today's default; presets/esosae-v2-controller.json pins it."""

SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "sae": SAEConfig, "schedule": ScheduleConfig,
}


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    specs = field_specs(cls)
    unknown = sorted((k for k in d if k not in specs), key=str)
    if unknown:
        allowed = [n for n in specs if not (cls is TrainConfig and n in SECTIONS)]
        raise ConfigError(f"unknown {where or 'top-level'} config field(s) {', '.join(map(show, unknown))}; "
                          f"{cls.__name__} has {', '.join(allowed)}"
                          + (f" and the sections {', '.join(SECTIONS)}" if cls is TrainConfig else ""))
    kwargs = {}
    for name, value in d.items():
        sub = SECTIONS.get(name) if cls is TrainConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {name!r} must be an object of {sub.__name__} fields "
                                  f"(got {show(value)})")
            kwargs[name] = _from_dict(sub, value, name)
        else:
            kwargs[name] = convert(specs[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring line under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))  # dedent: a class nested in a function
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = str(nxt.value.value).strip()
    return docs
