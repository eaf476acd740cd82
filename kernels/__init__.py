"""Triton kernels for the SAE hot path, importable as ``esosae.kernels``.

The ops have the signatures and results of their ``esosae.reference`` counterparts and are
differentiable (torch.autograd.Function):

- ``encode(x, W_enc, b_enc, b_dec, theta) -> (f, row_l1, fire_count)``  (encoder.py)
"""

from esosae.kernels.encoder import encode

__all__ = ["encode"]
