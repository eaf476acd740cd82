"""Triton kernels for the SAE hot path, importable as ``esosae.kernels``.

The ops have the signatures and results of their ``esosae.reference`` counterparts and are
differentiable (torch.autograd.Function):

- ``encode(x, W_enc, b_enc, b_dec, theta) -> (f, row_l1, fire_count)``  (encoder.py)
- ``decode(f, W_dec, bias, target) -> (x_hat, sq_err)``                  (decoder.py)
"""

from esosae.kernels.decoder import decode
from esosae.kernels.encoder import encode

__all__ = ["decode", "encode"]
