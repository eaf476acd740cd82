"""The blocked margin-orthogonality kernels against the float64 reference: the penalty and
the gradients of both decoders, over all tiles or a sampled subset of them.

fp32 must match tightly; bf16 and fp16 follow the 2× rule against ``reference.orth_penalty``
run in that dtype. The penalty's partial sums are poisoned with NaN before the kernel writes
them (the gradients accumulate into zeroed buffers, so they cannot be).
"""

import pytest
import torch
from helpers import DEVICE, F64, FP32_TOL, PRECISION_OF, assert_matches

from esosae.sae import reference
from esosae.kernels import orth_penalty

SHAPES = [(256, 256, 64), (200, 130, 48)]  # (m1, m2, d): tile multiples, and not


pytestmark = pytest.mark.usefixtures("poisoned")


def unit_rows(m, d):
    return torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE), dim=1)


def run(op, W1, W2, margin, tiles, dtype, g_out=2.5, same=False):
    """Penalty and gradients with the weights cast to ``dtype``; ``same`` passes one tensor twice."""
    w1 = W1.to(dtype).detach().requires_grad_()
    w2 = w1 if same else W2.to(dtype).detach().requires_grad_()
    loss = op(w1, w2, margin, tiles)
    loss.backward(torch.tensor(g_out, dtype=loss.dtype, device=DEVICE))
    out = {"loss": loss.detach(), "grad_W1": w1.grad}
    if not same:
        out["grad_W2"] = w2.grad
    return out




def subset(m1, m2):
    n1, n2 = reference.tile_grid(m1, m2)
    return reference.sample_tiles(m1, m2, 0.5, torch.Generator().manual_seed(n1 * n2)).to(DEVICE)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m1,m2,d", SHAPES)
def test_orth_penalty_matches_reference(m1, m2, d, dtype, margin, sampled):
    W1, W2 = unit_rows(m1, d).to(dtype), unit_rows(m2, d).to(dtype)
    tiles = subset(m1, m2) if sampled else None
    out = run(orth_penalty, W1, W2, margin, tiles, dtype)
    assert out["loss"].dim() == 0 and out["loss"].dtype == torch.float32
    assert out["grad_W1"].dtype == dtype and out["grad_W2"].dtype == dtype
    low = None if dtype == torch.float32 else run(reference.orth_penalty, W1, W2, margin, tiles, dtype)
    ref = run(reference.orth_penalty, W1, W2, margin, tiles, F64)
    assert ref["loss"] > 0
    assert_matches(out, ref, low, PRECISION_OF[dtype])


def test_orth_margin_leaves_some_tiles_free():
    """At ρ = 0.45 (d = 64) some tiles lie entirely within the margin and skip their
    gradient products, others do not: the test above covers both branches."""
    W1, W2 = unit_rows(256, 64), unit_rows(256, 64)
    c = (W1 @ W2.T).abs().reshape(4, 64, 4, 64).amax(dim=(1, 3))  # (4, 4) max |c| per tile
    assert 0 < (c <= 0.45).sum() < 16


@pytest.mark.parametrize("margin", [0.0, 0.1])
@pytest.mark.parametrize("m1,m2,d", SHAPES)
def test_orth_same_dictionary_penalizes_every_pair(m1, m2, d, margin):
    """W_dec1 = W_dec2 (one tensor passed twice): the diagonal c_ii = 1 counts too, and
    autograd sums the two gradients."""
    W = unit_rows(m1, d)
    out = run(orth_penalty, W, W, margin, None, torch.float32, same=True)
    ref = run(reference.orth_penalty, W, W, margin, None, F64, same=True)
    assert ref["loss"] >= (1 - margin) ** 2 / m1  # at least the diagonal
    assert_matches(out, ref)


def test_orth_zero_margin_equals_gram_identity():
    W1, W2 = unit_rows(200, 48), unit_rows(130, 48)
    gram = reference.orth_penalty_gram(W1.double(), W2.double())
    assert abs(orth_penalty(W1, W2, 0.0).item() - gram.item()) <= FP32_TOL * gram.item()


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_orth_orthogonal_dictionaries_cost_nothing(margin):
    q = torch.linalg.qr(torch.randn(64, 64, dtype=F64, device=DEVICE)).Q.float().contiguous()  # orthonormal rows
    out = run(orth_penalty, q[:20], q[20:50], margin, None, torch.float32)
    assert out["loss"].abs() <= 1e-12
    assert out["grad_W1"].abs().max() <= 1e-6 and out["grad_W2"].abs().max() <= 1e-6


def test_orth_near_orthogonal_within_margin_is_exactly_zero():
    W1, W2 = unit_rows(200, 48), unit_rows(130, 48)
    margin = (W1 @ W2.T).abs().max().item() + 1e-3
    out = run(orth_penalty, W1, W2, margin, None, torch.float32)
    assert out["loss"] == 0 and (out["grad_W1"] == 0).all() and (out["grad_W2"] == 0).all()


def test_orth_only_one_side_needs_gradients():
    W1, W2 = unit_rows(200, 48), unit_rows(130, 48).requires_grad_()
    orth_penalty(W1, W2, 0.1).backward()
    w2 = W2.detach().double().requires_grad_()
    reference.orth_penalty(W1.double(), w2, 0.1).backward()
    assert W1.grad is None
    assert (W2.grad.double() - w2.grad).abs().max() <= FP32_TOL * w2.grad.abs().max()


@pytest.mark.parametrize("tiles,error,match", [
    (torch.tensor([[0, 1]], dtype=torch.int64), TypeError, "int32"),
    (torch.tensor([0, 1], dtype=torch.int32), ValueError, "shape"),
    (torch.zeros(0, 2, dtype=torch.int32), ValueError, "shape"),
    (torch.tensor([[0, 3]], dtype=torch.int32), ValueError, "grid"),  # 130 columns: 3 tiles, 0..2
    (torch.tensor([[-1, 0]], dtype=torch.int32), ValueError, "grid"),
    (torch.tensor([[1, 2], [1, 2]], dtype=torch.int32), ValueError, "distinct"),
    (torch.tensor([[0, 0], [1, 2]], dtype=torch.int32).T, ValueError, "contiguous"),
])
def test_orth_bad_tiles_are_a_clear_error(tiles, error, match):
    with pytest.raises(error, match=match):
        orth_penalty(unit_rows(200, 48), unit_rows(130, 48), 0.1, tiles.to(DEVICE))


@pytest.mark.parametrize("args,error,match", [
    (lambda: (unit_rows(20, 48), unit_rows(30, 40), 0.1), ValueError, "shape"),
    (lambda: (unit_rows(20, 48).double(), unit_rows(30, 48).double(), 0.1), TypeError, "supported"),
    (lambda: (unit_rows(20, 48), unit_rows(30, 48).bfloat16(), 0.1), TypeError, "one dtype"),
    (lambda: (unit_rows(48, 20).T, unit_rows(30, 48), 0.1), ValueError, "contiguous"),
    (lambda: (unit_rows(20, 48), unit_rows(30, 48), float("nan")), ValueError, "finite"),
    (lambda: (unit_rows(20, 48), unit_rows(0, 48), 0.1), ValueError, "empty"),
    (lambda: (unit_rows(20, 48), unit_rows(31, 48).flatten()[1:30 * 48 + 1].view(30, 48), 0.1), ValueError,
     "W_dec2.clone()"),
])
def test_orth_misuse_is_a_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        orth_penalty(*args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orth_backward_is_bit_identical_whatever_the_tile_order(dtype):
    """The gradients are reduced per row (column) tile in ascending tile order, never in
    launch order: the same subset listed in another order, or run twice, gives the same bits."""
    W1, W2 = unit_rows(64, 48).to(dtype), unit_rows(320, 48).to(dtype)  # one row tile meets 5 column tiles
    tiles = torch.tensor([[0, j] for j in range(5)], dtype=torch.int32, device=DEVICE)
    shuffled = tiles[torch.randperm(tiles.shape[0], generator=torch.Generator().manual_seed(3))].contiguous()
    runs = [run(orth_penalty, W1, W2, 0.05, t, dtype) for t in (tiles, tiles, shuffled)]
    assert runs[0]["grad_W1"].abs().max() > 0 and runs[0]["grad_W2"].abs().max() > 0
    for other in runs[1:]:
        assert torch.equal(other["grad_W1"], runs[0]["grad_W1"]) and torch.equal(other["grad_W2"], runs[0]["grad_W2"])


@pytest.mark.parametrize("sampled", [False, True])
def test_orth_backward_extra_memory_is_what_it_allocates(monkeypatch, sampled):
    """``backward_extra_bytes`` counts what the backward allocates besides the gradients."""
    from esosae.kernels import orthogonality

    sizes = []
    real_alloc = orthogonality.alloc

    def counting_alloc(shape, dtype, device):
        t = real_alloc(shape, dtype, device)
        sizes.append(t.numel() * t.element_size())
        return t

    W1, W2 = unit_rows(200, 48).requires_grad_(), unit_rows(130, 48).requires_grad_()
    tiles = subset(200, 130) if sampled else None
    loss = orth_penalty(W1, W2, 0.05, tiles)
    monkeypatch.setattr(orthogonality, "alloc", counting_alloc)
    loss.backward()
    grads = W1.numel() * 4 + W2.numel() * 4
    n_sel = None if tiles is None else tiles.shape[0]
    extra = orthogonality.backward_extra_bytes(200, 130, n_sel, torch.float32)
    allocated = sum(sizes) - grads  # the tile orders and group offsets come from torch ops: in the formula only
    n = 4 * 3 if tiles is None else tiles.shape[0]
    assert allocated == n * (64 * 64 * 4 + 4)  # G tiles and live flags
    assert allocated <= extra <= allocated + 4 * (5 * n + 4 + 3 + 2)


@pytest.mark.parametrize("batch,dtype", [(1024, torch.float32), (1024, torch.bfloat16), (4096, torch.bfloat16)])
def test_orth_backward_extra_memory_at_scale_is_under_64_mib(batch, dtype):
    """m1 = m2 = 16,384, d = 2,304 with the trainer's default tile fraction min(1, B/(3·m2))."""
    from esosae.kernels import orthogonality

    m = 16_384
    n_sel = -(-(m // 64) ** 2 * batch // (3 * m))  # ⌈fraction · n_tiles⌉, as sample_tiles draws
    assert orthogonality.backward_extra_bytes(m, m, n_sel, dtype) < 64 * 2**20
