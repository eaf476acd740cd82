"""The dual-layer SAE of METHOD.md §2 and the two baselines of the grid.

- ``arch='esosae'``: JumpReLU layers with thresholds θ = τ(t)·clamp(μ); layer 2 encodes the
  residual r = x − x̂1 that layer 1 left; m2 = 0 gives a single-layer SAE.
- ``arch='relu'``: vanilla ReLU + L1 (θ = 0), single layer.
- ``arch='topk'``: TopK (k active features), single layer.
- ``arch='batchtopk'``: BatchTopK (the B·k largest activations of the batch) in training;
  at inference a JumpReLU with one global threshold θ (the loop's running estimate).
- ``arch='jumprelu'``: single-layer JumpReLU with a learned θ = τ_T·μ (μ trained).

``margins='learned'`` (and ``jumprelu``) make μ a parameter trained through the
straight-through estimator (``reference.encode_learned``); ``aux_k > 0`` adds the AuxK
loss of the dead features (``reference.auxk_loss``) to ``forward``'s output.

The model works on normalized inputs s·x (METHOD.md §1). ``save`` folds s into the weights
(W_enc·s, W_dec/s, b_dec/s), so a saved SAE maps raw activations and needs no scale.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from esosae.config import ConfigError, SAEConfig
from esosae.errors import UserError
from esosae.run.atomic import atomic_dir, atomic_write_text
from esosae.run.layout import SAE_CONFIG as CONFIG_FILE
from esosae.run.layout import SAE_WEIGHTS as WEIGHTS_FILE
from esosae.sae import reference
from esosae.sae.backend import TORCH, Backend
from esosae.sae.margins import freq_target


class DualLayerSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, d: int, scale: float = 1.0):
        super().__init__()
        if d <= 0:
            raise ConfigError(f"input width d must be > 0 (got {d})")
        unresolved = [n for n in ("m1", "m2", "k", "target_l0", "l1_coeff") if getattr(cfg, n) is None]
        if unresolved:
            raise ConfigError(f"SAEConfig fields {', '.join(unresolved)} are unset; build it through TrainConfig")
        self.cfg, self.d, self.scale = cfg, d, scale
        m1, m2 = cfg.m1, cfg.m2
        self.W_enc1 = nn.Parameter(torch.empty(d, m1))
        self.b_enc1 = nn.Parameter(torch.zeros(m1))
        self.W_dec1 = nn.Parameter(torch.empty(m1, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_enc2 = nn.Parameter(torch.empty(d, m2))
        self.b_enc2 = nn.Parameter(torch.zeros(m2))
        self.W_dec2 = nn.Parameter(torch.empty(m2, d))
        if m2 == 0:  # single layer: the empty layer-2 tensors take no part in training
            for p in (self.W_enc2, self.b_enc2, self.W_dec2):
                p.requires_grad_(False)
        # Adaptive state (METHOD.md §5) and bookkeeping; buffers travel with checkpoints.
        for i, m in ((1, m1), (2, m2)):
            self.register_buffer(f"theta{i}", torch.zeros(m))  # current θ = τ·clamp(μ)
            if cfg.learned_thresholds:
                setattr(self, f"mu{i}", nn.Parameter(torch.ones(m), requires_grad=m > 0))
            else:
                self.register_buffer(f"mu{i}", torch.ones(m))
            self.register_buffer(f"freq{i}", torch.full((m,), freq_target(cfg, max(m, 1))))
            self.register_buffer(f"since_fire{i}", torch.zeros(m, dtype=torch.int64))  # tokens
        self.register_buffer("zero_bias", torch.zeros(d), persistent=False)
        self.taus = (0.0, 0.0)
        """τ_1(t), τ_2(t) of the current step (learned θ = τ·μ keeps μ's gradient)."""

    @property
    def layers(self) -> int:
        return 2 if self.cfg.m2 > 0 else 1

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, sample: torch.Tensor | None = None) -> None:
        """Unit-norm random decoder rows, tied encoder (W_enc = W_decᵀ), b_dec = sample mean."""
        for W_dec, W_enc in ((self.W_dec1, self.W_enc1), (self.W_dec2, self.W_enc2)):
            W_dec.copy_(torch.randn(W_dec.shape, generator=generator))
            W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            W_enc.copy_(W_dec.T)
        if sample is not None:
            self.b_dec.copy_(sample.mean(0))

    def forward(self, x: torch.Tensor, ops: Backend = TORCH,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """x (B, d), normalized. Returns x_hat, per-row squared error, f and L1 per layer.

        ``dtype``: the operands of the products (esosae.sae.precision), the parameters' own by
        default. Weights, biases and x are cast to it here, so the fp32 parameters receive
        fp32 gradients through the casts; θ stays fp32, the L1, squared error and fire
        counts come back fp32, and x_hat in the parameters' dtype. ``W_dec`` holds the two
        decoders as the products saw them, for the orthogonality penalty (no second cast).
        """
        param_dtype = self.W_dec1.dtype

        def op(t: torch.Tensor) -> torch.Tensor:
            return t if dtype is None else t.to(dtype)

        x = op(x)
        cfg, b_dec = self.cfg, op(self.b_dec)
        f1, l1_1, fire1 = self._encode1(x, op, ops)
        W_dec1, W_dec2 = op(self.W_dec1), op(self.W_dec2)
        x_hat, sq_err = ops.decode(f1, W_dec1, b_dec, x)  # (B, d), (B,)
        out = {"f1": f1, "l1_1": l1_1, "fire1": fire1}
        r = x - x_hat  # (B, d): gradients flow through r into layer 1
        if cfg.m2 > 0:
            zero = op(self.zero_bias)
            f2, l1_2, fire2 = self._encode(2, r, op(self.W_enc2), op(self.b_enc2), zero, ops)
            r_hat, sq_err = ops.decode(f2, W_dec2, zero, r)
            x_hat = x_hat + r_hat
            out.update(f2=f2, l1_2=l1_2, fire2=fire2)
        out.update(x_hat=x_hat.to(param_dtype), sq_err=sq_err, W_dec=(W_dec1, W_dec2))
        if cfg.aux_k > 0 and self.training and torch.is_grad_enabled():
            out["aux"] = self.aux_loss(x - b_dec, r.detach(), (x - x_hat).detach(), op)
        return out

    @torch.no_grad()
    def features(self, x: torch.Tensor, ops: Backend = TORCH) -> torch.Tensor:
        """[f1, f2] (B, m1 + m2) of normalized x (B, d), as ``forward`` computes them, without
        the last decode: f2 reads layer 1's residual r = x − x̂₁, and nothing reads x̂₂."""
        f1 = self._encode1(x, lambda t: t, ops)[0]
        if self.cfg.m2 == 0:
            return f1
        r = x - ops.decode(f1, self.W_dec1, self.b_dec, x)[0]  # (B, d)
        f2 = self._encode(2, r, self.W_enc2, self.b_enc2, self.zero_bias, ops)[0]
        return torch.cat([f1, f2], dim=1)

    def _encode1(self, x: torch.Tensor, op: Any, ops: Backend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer 1's (f1, L1, fire counts): TopK, BatchTopK (a batch's top B·k while training)
        or the JumpReLU of ``_encode``; ``op`` casts the parameters to the products' dtype."""
        cfg, b_dec = self.cfg, op(self.b_dec)
        if cfg.arch == "topk":
            return reference.topk_encode(x, op(self.W_enc1), op(self.b_enc1), b_dec, cfg.k)
        if cfg.arch == "batchtopk" and self.training:
            return reference.batchtopk_encode(x, op(self.W_enc1), op(self.b_enc1), b_dec, cfg.k)
        return self._encode(1, x, op(self.W_enc1), op(self.b_enc1), b_dec, ops)

    def _encode(self, i: int, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                ops: Backend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's JumpReLU: θ = τ_i·μ_i with μ's gradient when learned and training, else the θ buffer."""
        if self.cfg.learned_thresholds and self.training and torch.is_grad_enabled():
            theta = self.taus[i - 1] * getattr(self, f"mu{i}")  # (m,), differentiable in μ
            return ops.encode_learned(x, W_enc, b_enc, b_dec, theta, self.cfg.jump_bandwidth,
                                      self.cfg.sparsity == "l0")
        return ops.encode(x, W_enc, b_enc, b_dec, getattr(self, f"theta{i}"))

    def aux_loss(self, xc: torch.Tensor, r: torch.Tensor, e: torch.Tensor, op: Any) -> torch.Tensor:
        """AuxK over the dead features of both layers together (``reference.auxk_loss``):
        layer 1's see x − b_dec, layer 2's the residual r, all explain the error e."""
        pre, rows = [], []
        for i, inp in ((1, xc), (2, r)):
            dead = (getattr(self, f"since_fire{i}") >= self.cfg.aux_dead_tokens).nonzero().squeeze(1)  # (n_i,) host sync
            W_enc, b_enc, W_dec = (getattr(self, f"{n}{i}") for n in ("W_enc", "b_enc", "W_dec"))
            pre.append(inp @ op(W_enc[:, dead]) + op(b_enc[dead]))  # (B, n_i)
            rows.append(op(W_dec[dead]))  # (n_i, d)
        return reference.auxk_loss(e, torch.cat(pre, 1), torch.cat(rows, 0), self.cfg.aux_k)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """g ← g − ⟨g, w⟩ w for each unit decoder row w, so the step keeps rows near unit norm."""
        for W in (self.W_dec1, self.W_dec2):
            if W.grad is not None and W.shape[0] > 0:
                W.grad -= (W.grad * W).sum(1, keepdim=True) * W

    def dead_fraction(self, layer: int, tokens_seen: int, window: int) -> float:
        """Fraction of features that fired on none of the last min(window, tokens_seen) tokens."""
        since = getattr(self, f"since_fire{layer}")
        if since.numel() == 0 or tokens_seen == 0:
            return 0.0
        return (since >= min(window, tokens_seen)).float().mean().item()  # host sync

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for W in (self.W_dec1, self.W_dec2):
            W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- export ---------------------------------------------------------------------------

    @torch.no_grad()
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights that map raw activations: W_enc·s, W_dec/s, b_dec/s; θ and μ unchanged."""
        s = self.scale
        state = {k: v.detach().float().cpu().clone() for k, v in self.state_dict().items()}
        for k in ("W_enc1", "W_enc2"):
            state[k] *= s
        for k in ("W_dec1", "W_dec2", "b_dec"):
            state[k] /= s
        return state

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``sae.safetensors`` (scale folded in) and ``cfg.json`` atomically to ``path``."""
        meta = {"sae": dataclasses.asdict(self.cfg), "d": self.d, "scale": self.scale, "folded": True}
        meta.update(extra or {})
        with atomic_dir(path) as tmp:
            save_file(self.folded_state(), str(tmp / WEIGHTS_FILE))
            atomic_write_text(tmp / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DualLayerSAE:
        """Load a saved SAE; it maps raw activations (its weights carry the folded scale)."""
        path = Path(path)
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            state = load_file(str(path / WEIGHTS_FILE))
            model = cls(SAEConfig(**meta["sae"]), meta["d"], scale=1.0)
        except FileNotFoundError as e:
            raise SAELoadError(f"no saved SAE at {path} ({Path(e.filename).name} missing); "
                               "train one first or point at a run's sae/ folder") from None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise SAELoadError(f"saved SAE at {path} is unreadable or corrupt ({e}); retrain or restore it") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise SAELoadError(f"saved SAE at {path} does not match its cfg.json ({first})") from None
        model.trained_scale = meta.get("scale", 1.0)
        return model.to(device)


class SAELoadError(UserError):
    """A saved SAE that is missing or corrupt; the message names the folder."""

