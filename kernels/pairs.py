"""The active (row, feature) pairs of an encoder output f, on f's device.

f is 0.1–3% dense once training has left the dense start of its curriculum. The pair
kernels (``sparse.py``) work on the pairs where f ≠ 0 in two orders at once:

- by row (CSR): ``rows``, ``cols``, ``vals`` in row-major order, ``row_ptr`` (B + 1,): the
  token-wise gathers, x̂[b] = Σ f_bj W_dec[j], grad_f on the pairs and grad_x[b] = Σ grad_a_bj W_encᵀ[j];
- by feature (CSC): ``order`` (nnz,), the pair indices sorted by feature, rows ascending
  within one, and ``col_ptr`` (m + 1,): the feature-wise segment reductions
  grad_W_dec[j] = Σ_b f_bj G[b] and grad_W_encᵀ[j] = Σ_b grad_a_bj (x − b_dec)[b], one
  program per (feature, d-chunk) summing its pairs in that fixed order: no atomics, no hot
  rows, bit-identical runs.

Why not the alternatives: per-row ELL needs a cap on the pairs of a row, and a JumpReLU
SAE's L0 per row varies widely (a cap at the worst row wastes, a lower one drops pairs); a
feature-sorted COO alone would turn the token-wise gathers into scatters (atomics). Both
orders come from one ``nonzero`` and one stable sort of nnz int32 keys.

Choosing the path reads the count of fires on the host, and ``nonzero`` reads the count of
pairs again to size the lists: two host syncs per layer in a step that takes the pair path
(the fire count excludes NaN pre-activations, which f keeps, so it cannot size the lists
itself). Above ``PAIRS_MAX_DENSITY`` the dense kernels run and only the first is paid.
"""

from __future__ import annotations

import torch

PAIRS_MAX_DENSITY = 0.01
"""Largest density nnz(f)/(B·m) at which the Triton backend takes the pair path. From the
roofline model (``bench/roofline.py`` → bench/results/roofline.md, a model, not a measurement):
the pair ops cost what the dense products they replace cost at a density of 1.4% (H100) and
2.0% (H200) in bf16 at d 2,304, m 16,384, B 4,096 (0.75% / 1.1% in tf32), and at 3.6–4.4%
in bf16 at the default d 576, m 1,152. 1% stays below the large bf16 figures. To be replaced
by the crossover ``bench/gpu_check.sh`` measures on a device (it times both paths at L0 8,
32 and 128 per layer and at this density)."""


class Pairs:
    """The pairs where f ≠ 0, in row order and in feature order (see the module doc).

    rows, cols (nnz,) int32; indices (2, nnz) int64 (the sparse gradient's); vals (nnz,)
    f's values; row_ptr (B + 1,) and col_ptr (m + 1,) int32; order (nnz,) int32.
    ``version`` is the version of the f the pairs were read from.
    """

    __slots__ = ("shape", "indices", "rows", "cols", "vals", "row_ptr", "order", "col_ptr", "version")

    def __init__(self, indices: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]):
        """Pairs at ``indices`` (2, nnz) int64, rows ascending, with values ``vals`` (nnz,)."""
        B, m = shape
        self.shape = shape
        self.indices = indices
        self.rows, self.cols = (i.int() for i in indices)
        self.vals = vals
        self.row_ptr = _offsets(self.rows, B)
        order = torch.argsort(self.cols, stable=True)  # (nnz,) by feature, rows ascending within one
        self.order = order.int()
        self.col_ptr = _offsets(self.cols[order], m)
        self.version = -1

    @classmethod
    def of(cls, f: torch.Tensor) -> Pairs:
        """The pairs where the (B, m) f is non-zero, read on f's device."""
        indices = torch.nonzero(f).T.contiguous()  # (2, nnz) row-major; host sync: nnz sizes it
        pairs = cls(indices, f[indices[0], indices[1]], tuple(f.shape))
        pairs.version = f._version
        return pairs

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def values_of(self, grad: torch.Tensor) -> torch.Tensor:
        """A (B, m) gradient on the pairs, fp32: the pair decoder's sparse one directly, any other gathered."""
        if grad.layout == torch.sparse_coo:
            if grad._nnz() == self.nnz and grad._indices().data_ptr() == self.indices.data_ptr():
                return grad._values().float()
            grad = grad.to_dense()
        return grad[self.indices[0], self.indices[1]].float()

    def sparse(self, values: torch.Tensor) -> torch.Tensor:
        """The (B, m) sparse COO tensor with ``values`` on the pairs (the pair decoder's grad_f)."""
        return torch.sparse_coo_tensor(self.indices, values, self.shape, is_coalesced=True, check_invariants=False)


def _offsets(sorted_keys: torch.Tensor, n: int) -> torch.Tensor:
    """(n + 1,) int32: where each key 0..n−1 starts in the ascending ``sorted_keys``, and its end."""
    bounds = torch.arange(n + 1, dtype=sorted_keys.dtype, device=sorted_keys.device)
    return torch.searchsorted(sorted_keys, bounds).int()


def attached(f: torch.Tensor) -> Pairs | None:
    """The pairs of an encoder output f, if f is unmodified since the encoder wrote it."""
    pairs = getattr(f, "_esosae_pairs", None)
    return pairs if pairs is not None and pairs.version == f._version else None


def density_limit(max_density: float | None) -> float:
    """The pair path's density limit: ``max_density``, or ``PAIRS_MAX_DENSITY`` when None."""
    return PAIRS_MAX_DENSITY if max_density is None else max_density
