"""Picks the implementation of the SAE's hot ops: Triton kernels or plain PyTorch.

``auto`` is ``triton`` when CUDA is present and ``torch`` otherwise. ``triton`` on a machine
without CUDA is allowed only under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used
by the tests). Both backends expose the same three functions with the same signatures, so
the model and the trainer run one code path whichever is chosen. ``encode_learned`` (θ
trained through the straight-through estimator) is the reference's dense path on the
CPU: it needs every pre-activation near θ, which the sparse CPU encoder never forms. ``torch`` is
``esosae.sae.torch_ops``: the reference's math (``esosae.sae.reference``, the oracle) with the
work cut to what a sparse SAE needs on the CPU.

Both pick, per encoder call, between dense products and the active (row, feature) pairs
of f by f's density: the Triton backend's encode/decode are ``esosae.kernels.sparse``'s,
which run the dense kernels above ``kernels.pairs.PAIRS_MAX_DENSITY``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from esosae.errors import UserError
from esosae.sae import torch_ops


class BackendError(UserError):
    """The requested backend cannot run here; the message says what to do."""


@dataclass(frozen=True)
class Backend:
    name: str
    encode: Callable  # (x, W_enc, b_enc, b_dec, theta) -> (f, row_l1, fire_count)
    decode: Callable  # (f, W_dec, bias, target) -> (x_hat, row_sq_err)
    orth_penalty: Callable  # (W_dec1, W_dec2, margin, tiles) -> scalar
    encode_learned: Callable = torch_ops.encode_learned  # (x, W_enc, b_enc, b_dec, theta, eps, l0) -> (f, row, fire)


TORCH = Backend("torch", torch_ops.encode, torch_ops.decode, torch_ops.orth_penalty)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def get_backend(name: str, device: torch.device, pairs_max_density: float | None = None) -> Backend:
    """The backend for ``name`` ('auto', 'triton' or 'torch') on ``device``; the Triton one
    takes f's active pairs up to ``pairs_max_density`` (``kernels.pairs.PAIRS_MAX_DENSITY``
    by default; 0 keeps every step on the dense kernels, without the count's host sync)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TORCH
    if device.type != "cuda" and not interpreting():
        raise BackendError("--backend triton needs a CUDA device, or TRITON_INTERPRET=1 to run "
                           "the kernels on the CPU (slow; for tests); use --backend torch")
    from esosae.kernels import encode_learned, orth_penalty, sparse
    from esosae.kernels.utils import UnsupportedArchError, arch_family

    if device.type == "cuda":
        try:
            arch_family(device)
        except UnsupportedArchError as e:
            raise BackendError(str(e)) from None
    encode = sparse.encode if pairs_max_density is None else functools.partial(sparse.encode,
                                                                               max_density=pairs_max_density)
    return Backend("triton", encode, sparse.decode, orth_penalty, encode_learned)


def path(f: torch.Tensor) -> str:
    """Which path an encoder output took to its decoder: ``pairs`` when the encoder found f
    sparse enough to hand over its active pairs (``kernels.pairs.PAIRS_MAX_DENSITY`` on the
    Triton backend, ``torch_ops.SPARSE_MAX_DENSITY`` on the torch one), else ``dense``."""
    return "pairs" if hasattr(f, "_esosae_pairs") or hasattr(f, "_esosae_active") else "dense"
