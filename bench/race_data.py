"""Inputs of the CPU step benchmarks and the peer race, built once and cached on disk.

- ``x``: 1,024 tokens of SmolLM2-135M activations at ``blocks.6.hook_out`` (BOS and
  separators dropped), normalized so that E‖x‖² = d (METHOD.md §1). The 4,096 tokens
  after them (never in ``x``) calibrate the biases below.
- ``relu_init``: a ReLU SAE (d = 576, m = 4,608) as ``DualLayerSAE.init_weights`` leaves it:
  unit decoder rows, tied encoder, b_enc = 0, b_dec = mean. About half the features fire.
- ``relu_l0_32``: the same decoder, each b_enc_j set so that feature j fires on 32/m of the
  calibration tokens: L0 ≈ 32 on ``x``, the sparsity of a trained SAE. Constructed, not
  trained: the benchmarks need the sparsity, not good features.
- ``esosae_l0_32``: a dual-layer E-SOSAE (m1 = m2 = 4,608) built the same way at
  ``STEP``'s thresholds θ = τ(t)·μ: layer 1 calibrated on x, layer 2 on the residual
  r = x − x̂1 that layer 1 leaves; L0 ≈ 32 per layer.

Both trainers load the same tensors (the peer's worker reads the file directly). Delete
the file (``path()``) to rebuild it; building loads the embedded language model (~30 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from esosae.sae.backend import Backend
from esosae.config import SAEConfig, TrainConfig
from esosae.training.profiling import StepTimer, dense_flops_per_token
from esosae.sae.model import DualLayerSAE
from esosae.training.loop import set_thresholds, step_generator, train_step

D, M, B = 576, 4608, 1024
L0 = 32
HOOK = "blocks.6.hook_out"
CAL_TOKENS = 4096
VERSION = 1
LAYER_KEYS = {1: ("W_enc1", "b_enc1", "W_dec1"), 2: ("W_enc2", "b_enc2", "W_dec2")}
CASES = ("relu_init", "relu_l0_32", "esosae_l0_32")


def config(case: str, orth_block_fraction: float | None = None) -> TrainConfig:
    """The TrainConfig of a case at the benchmark sizes (relu: single layer; esosae: dual)."""
    if case.startswith("relu"):
        sae = SAEConfig(arch="relu", m1=M)
    else:
        sae = SAEConfig(arch="esosae", m1=M, m2=M, orth_block_fraction=orth_block_fraction)
    return TrainConfig(sae=sae, batch_size=B, device="cpu", backend="torch")


def step_of(cfg: TrainConfig) -> int:
    """The step the benchmarks time: mid-run, so λ, γ and the learning rate are all on."""
    return cfg.steps // 2


def path() -> Path:
    from esosae.data.models import cache_root

    return cache_root(None) / "bench" / f"race_v{VERSION}.safetensors"


def _harvest(n: int) -> torch.Tensor:
    """n activation rows (text positions only) from the default text mixture, in order."""
    from esosae.data import text as data
    from esosae.data import models
    from esosae.config import DataConfig, ModelConfig

    lm = models.load_model(ModelConfig())
    stream = data.contexts(data.parse_sources(DataConfig().dataset), lm.tokenizer, lm.bos_id, 128, 0)
    rows, have = [], 0
    with torch.no_grad():
        for tokens in data.batches(stream, 16):
            acts = models.hook_activations(lm, tokens, HOOK)  # (b, T, d)
            rows.append(acts[lm.keep(tokens)].float())
            have += rows[-1].shape[0]
            if have >= n:
                break
    return torch.cat(rows)[:n]


@torch.no_grad()
def _calibrate(model: DualLayerSAE, layer: int, inputs: torch.Tensor, bias: torch.Tensor) -> None:
    """b_enc_j = θ_j − q_j with q_j the (1 − L0/m) quantile of (inputs − bias) W_enc[:, j]
    over the calibration rows, so a_j > θ_j on a fraction L0/m of them."""
    W_enc, b_enc, _ = (getattr(model, k) for k in LAYER_KEYS[layer])
    theta = getattr(model, f"theta{layer}")
    pre = (inputs - bias) @ W_enc  # (n, m)
    k = round((1 - L0 / W_enc.shape[1]) * pre.shape[0])
    b_enc.copy_(theta - pre.kthvalue(k, dim=0).values)


def _params(model: DualLayerSAE) -> dict[str, torch.Tensor]:
    keys = ["b_dec", *LAYER_KEYS[1]] + (list(LAYER_KEYS[2]) if model.layers == 2 else [])
    return {k: getattr(model, k).detach().clone() for k in keys}


@torch.no_grad()
def build() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from esosae.sae import reference
    from esosae.data.sources import expected_norm_scale

    raw = _harvest(B + CAL_TOKENS)
    scale = expected_norm_scale(raw)
    rows = raw * scale
    x, cal = rows[:B].contiguous(), rows[B:].contiguous()
    tensors: dict[str, torch.Tensor] = {"x": x}
    l0s: dict[str, list[float]] = {}
    for case in CASES:
        cfg = config(case)
        model = DualLayerSAE(cfg.sae, D, scale=scale)
        model.init_weights(step_generator(cfg.seed, 0, 0), cal[:B])
        set_thresholds(model, cfg, step_of(cfg))
        if case != "relu_init":
            _calibrate(model, 1, cal, model.b_dec)
            if model.layers == 2:
                f1, *_ = reference.encode(cal, model.W_enc1, model.b_enc1, model.b_dec, model.theta1)
                _calibrate(model, 2, cal - (f1 @ model.W_dec1 + model.b_dec), torch.zeros(D))
        out = model(x)
        l0s[case] = [round((out[f"f{i}"] > 0).sum(1).float().mean().item(), 2) for i in range(1, model.layers + 1)]
        tensors.update({f"{case}.{k}": v for k, v in _params(model).items()})
    meta = {"scale": repr(scale), "l0": json.dumps(l0s), "hook": HOOK, "tokens": str(B),
            "calibration_tokens": str(CAL_TOKENS), "version": str(VERSION)}
    return tensors, meta


def load() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The cached tensors and metadata, built first if missing."""
    p = path()
    if not p.exists():
        tensors, meta = build()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(p)
    from safetensors import safe_open

    with safe_open(str(p), "pt") as fh:
        meta = fh.metadata()
    return load_file(str(p)), meta


def load_case(model: DualLayerSAE, tensors: dict[str, torch.Tensor], case: str) -> DualLayerSAE:
    """Copy the case's weights into ``model`` (thresholds are set by the step)."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if f"{case}.{k}" in tensors:
                p.copy_(tensors[f"{case}.{k}"])
    return model


class Runner:
    """One case's model, optimizer and batch, built as the trainer builds them
    (``esosae.training.loop.build``: its Adam, whatever its settings), holding the case's weights;
    ``fused`` swaps in ``torch.optim.Adam(fused=True)``, ``ours`` swaps in ``esosae.training.optim.Adam``
    (fused, stepping on one thread: the optimizer proposed for ``build``). ``reset``
    restores weights and buffers."""

    def __init__(self, race, case: str, fraction: float | None, fused: bool = False, ours: bool = False):
        from esosae.data.sources import ArraySource
        from esosae.training.loop import build

        tensors, _ = race
        self.cfg = config(case, fraction)
        x = tensors["x"]
        self.model, self.opt = build(self.cfg, ArraySource(x, x[:16], scale=1.0), torch.device("cpu"))
        load_case(self.model, tensors, case)
        betas = (self.cfg.adam_beta1, self.cfg.adam_beta2)
        if fused:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=betas, fused=True)
        if ours:
            from esosae.training.optim import Adam

            self.opt = Adam(self.model.parameters(), lr=self.cfg.lr, betas=betas)
        self.start = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.x = tensors["x"]
        self.step_no = step_of(self.cfg)
        self.timer = StepTimer(torch.device("cpu"))

    def reset(self) -> None:
        self.model.load_state_dict(self.start)

    def step(self, ops: Backend, measure: bool = False) -> dict:
        self.timer.start(measuring=measure)
        return train_step(self.model, self.opt, ops, self.x, self.cfg, self.step_no, timer=self.timer)

    @property
    def flops(self) -> float:
        return dense_flops_per_token(self.cfg, D) * B
