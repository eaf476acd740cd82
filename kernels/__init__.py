"""Triton kernels for the SAE hot path, importable as ``esosae.kernels``.

The three ops have the signatures and results of their ``esosae.sae.reference`` counterparts
and are differentiable (torch.autograd.Function):

- ``encode(x, W_enc, b_enc, b_dec, theta) -> (f, row_l1, fire_count)``  (encoder.py)
- ``decode(f, W_dec, bias, target) -> (x_hat, sq_err)``                  (decoder.py)
- ``orth_penalty(W_dec1, W_dec2, margin, tiles=None) -> scalar``         (orthogonality.py)

``sparse.encode`` / ``sparse.decode`` are the same two ops on f's active pairs where f is
sparse (``pairs.PAIRS_MAX_DENSITY``) and the dense kernels elsewhere: what the trainer runs.
"""

from esosae.kernels.decoder import decode
from esosae.kernels.encoder import encode, encode_learned
from esosae.kernels.orthogonality import orth_penalty

__all__ = ["decode", "encode", "encode_learned", "orth_penalty"]
