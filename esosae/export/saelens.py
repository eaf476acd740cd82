"""A saved SAE in SAELens 6's on-disk format: ``cfg.json`` + ``sae_weights.safetensors``.

Each of our layers becomes one SAELens SAE that ``sae_lens.SAE.load_from_disk`` reads, with
the architecture SAELens computes the same function with (names from sae_lens's registry,
tensor names from its ``state_dict``):

    ours      SAELens     encode f(x), a = (x − b_dec) W_enc + b_enc          tensors
    relu      standard    f = relu(a)                                        W_enc b_enc W_dec b_dec
    topk      topk        f = the k largest of relu(a)   (cfg field k)       W_enc b_enc W_dec b_dec
    esosae    jumprelu    f = relu(a) · 1[a > θ]                             + threshold
    jumprelu  jumprelu    (its learned θ)                                    + threshold
    batchtopk jumprelu    (θ its global inference threshold, every feature)  + threshold

and decode x̂ = f W_dec + b_dec for all. E-SOSAE's θ is the threshold the saved SAE encodes
with (its ``theta`` buffers): τ·clamp(μ, μ_min, μ_max) as set for the last step, which is
τ_T·clamp(μ) once the schedule has reached τ_T (by ``schedule_fraction`` of training). θ ≥ 0,
so relu(a)·1[a > θ] = a·1[a > θ], our JumpReLU.

A dual-layer E-SOSAE is two SAEs, ``layer1/`` and ``layer2/``: layer 2 reads layer 1's
residual r = x − x̂1 (x̂1 = layer 1's decode of its encode), has b_dec = 0 and returns r̂;
the whole model's reconstruction is x̂1 + r̂. A single-layer SAE is written to OUT itself.

The saved weights already carry the input scale s (esosae.sae.model), so every export maps
raw activations: ``normalize_activations`` is "none". The metadata names the model and the
hook in the name both TransformerLens 3 (SAELens's) and 4 accept (``blocks.6.hook_out`` is
``blocks.6.hook_resid_post``), the BOS convention (``prepend_bos``: every context starts with
BOS; special-token positions were never trained on) and the context size.

A new architecture is one entry of ``ARCHS``: a function from the folded state and the
SAEConfig to layer 1's (SAELens architecture, tensors, extra cfg fields).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from esosae.config import SAEConfig, TrainConfig
from esosae.sae.model import DualLayerSAE

WEIGHTS = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CONFIG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
FORMAT_VERSION = "6.0.0"
"""The SAELens cfg.json format written (metadata.sae_lens_version); below 6.0 SAELens would
read the file as a pre-6 config and drop the metadata."""
LAYER_DIRS = ("layer1", "layer2")
LEGACY_HOOKS = [(r"^blocks\.(\d+)\.hook_out$", r"blocks.\1.hook_resid_post"),
                (r"^blocks\.(\d+)\.hook_in$", r"blocks.\1.hook_resid_pre"),
                (r"^blocks\.(\d+)\.attn\.hook_out$", r"blocks.\1.hook_attn_out"),
                (r"^blocks\.(\d+)\.mlp\.hook_out$", r"blocks.\1.hook_mlp_out")]
"""TransformerLens 4 bridge hook names → the HookedTransformer names (TransformerLens < 4,
SAELens's) of the same activations; the bridge answers to both."""


@dataclass
class Layer:
    """One SAELens SAE: its architecture, its tensors by SAELens name, extra cfg fields."""

    architecture: str
    tensors: dict[str, torch.Tensor]
    fields: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _affine(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Layer i's encoder and decoder: W_enc (d, m), b_enc (m,), W_dec (m, d), b_dec (d,)."""
    d = state["W_enc1"].shape[0]
    b_dec = state["b_dec"] if i == 1 else torch.zeros(d)  # layer 2 decodes the residual without a bias
    return {"W_enc": state[f"W_enc{i}"], "b_enc": state[f"b_enc{i}"], "W_dec": state[f"W_dec{i}"], "b_dec": b_dec}


def standard(state: dict[str, torch.Tensor], cfg: SAEConfig) -> Layer:
    return Layer("standard", _affine(state, 1))


def topk(state: dict[str, torch.Tensor], cfg: SAEConfig) -> Layer:
    return Layer("topk", _affine(state, 1), {"k": cfg.k, "rescale_acts_by_decoder_norm": False})


def jumprelu(state: dict[str, torch.Tensor], cfg: SAEConfig, i: int = 1) -> Layer:
    return Layer("jumprelu", {**_affine(state, i), "threshold": state[f"theta{i}"]})


ARCHS: dict[str, Callable[[dict[str, torch.Tensor], SAEConfig], Layer]] = {
    "relu": standard, "topk": topk, "esosae": jumprelu, "jumprelu": jumprelu, "batchtopk": jumprelu,
}
"""Our architecture → its layer 1 as a SAELens SAE. Layer 2 (E-SOSAE only) is a jumprelu. A
saved JumpReLU SAE encodes with its learned θ = τ·μ, a saved BatchTopK SAE with its one
global inference threshold (both in ``theta1``): each a SAELens jumprelu."""


def hook_name(hook: str) -> str:
    """The HookedTransformer name of a bridge hook, when it has one; the hook otherwise."""
    for pattern, legacy in LEGACY_HOOKS:
        if re.match(pattern, hook):
            return re.sub(pattern, legacy, hook)
    return hook


def layers(sae: DualLayerSAE, train: TrainConfig) -> list[Layer]:
    """The SAELens SAEs of a saved SAE (scale already folded in): one, or two for a dual E-SOSAE."""
    state = sae.folded_state()
    out = [ARCHS[sae.cfg.arch](state, sae.cfg)]
    if sae.layers == 2:
        out.append(jumprelu(state, sae.cfg, 2))
        out[1].metadata["esosae_input"] = f"the residual x - x_hat1 of {LAYER_DIRS[0]} (its decode of its encode of x)"
    lm = train.data.source == "lm"
    for i, layer in enumerate(out, 1):
        layer.metadata.update({
            "model_name": train.model.model if lm else None,
            "hook_name": hook_name(train.model.hook) if lm else None,
            "hook_name_bridge": train.model.hook if lm else None,
            "hook_head_index": None,
            "prepend_bos": True,
            "exclude_special_tokens": True,
            "context_size": train.data.context_size,
            "dataset_path": train.data.dataset if lm else f"synthetic:{train.data.synthetic}",
            "esosae_arch": sae.cfg.arch,
            "esosae_layer": i,
        })
    return out


def cfg_dict(layer: Layer, d: int) -> dict[str, Any]:
    """The cfg.json SAELens's ``SAEConfig.to_dict`` would write for this layer."""
    return {
        "architecture": layer.architecture,
        "d_in": d,
        "d_sae": layer.tensors["W_enc"].shape[1],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **layer.fields,
        "metadata": {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None, **layer.metadata},
    }


def write(sae: DualLayerSAE, train: TrainConfig, folder: Path) -> list[Path]:
    """Write the SAELens SAEs of ``sae`` into ``folder`` (which exists and is empty); returns
    the folders ``SAE.load_from_disk`` takes."""
    out = layers(sae, train)
    dirs = [folder] if len(out) == 1 else [folder / name for name in LAYER_DIRS]
    for layer, where in zip(out, dirs):
        where.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().float() for k, v in layer.tensors.items()}, str(where / WEIGHTS))
        (where / CONFIG).write_text(json.dumps(cfg_dict(layer, sae.d), indent=2) + "\n")
    return dirs
