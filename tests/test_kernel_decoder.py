"""The fused decoder kernel against the float64 reference: x̂, the per-row squared error,
and the gradients of f, W_dec, bias and target.

fp32 must match tightly; bf16 and fp16 follow the 2× rule against ``reference.decode`` run
in that dtype. Every output buffer is poisoned with NaN before the kernel writes it.
"""

import pytest
import torch
from helpers import DEVICE, F64, PRECISION_OF, assert_matches

from esosae.sae import reference
from esosae.kernels import decode

SHAPES = [(32, 64, 256), (37, 48, 200)]  # (B, d, m): tile multiples, and not
INPUTS = ("f", "W_dec", "bias", "target")


pytestmark = pytest.mark.usefixtures("poisoned")


def make_inputs(B, d, m, dtype, density):
    """Sparse non-negative features (a fraction ``density`` non-zero), unit decoder rows,
    a bias, a target near the reconstruction, and upstream grads for x̂ and sq_err."""
    f = torch.relu(torch.randn(B, m)) * (torch.rand(B, m) < density)
    W = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    bias = 0.5 * torch.randn(d)
    target = f @ W + bias + 0.3 * torch.randn(B, d)
    inp = {"f": f, "W_dec": W, "bias": bias, "target": target}
    inp = {k: v.to(DEVICE, dtype) for k, v in inp.items()}
    inp["g_xh"] = torch.randn(B, d, device=DEVICE).to(dtype)
    inp["g_sq"] = torch.randn(B, device=DEVICE)
    return inp


def run(op, inp, dtype, need=INPUTS):
    leaves = {k: inp[k].to(dtype).detach().requires_grad_(k in need) for k in INPUTS}
    x_hat, sq_err = op(*(leaves[k] for k in INPUTS))
    pairs = [(o, g.to(o.dtype)) for o, g in ((x_hat, inp["g_xh"]), (sq_err, inp["g_sq"])) if o.requires_grad]
    torch.autograd.backward(*zip(*pairs))  # x̂ has no gradient path when only the target needs one
    out = {"x_hat": x_hat.detach(), "sq_err": sq_err.detach()}
    out.update({f"grad_{k}": leaves[k].grad for k in need})
    return out




@pytest.mark.parametrize("density", [0.05, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,d,m", SHAPES)
def test_decode_matches_reference(B, d, m, dtype, density):
    inp = make_inputs(B, d, m, dtype, density)
    out = run(decode, inp, dtype)
    assert out["x_hat"].dtype == dtype and out["sq_err"].dtype == torch.float32
    assert all(out[f"grad_{k}"].dtype == dtype for k in INPUTS)
    low = None if dtype == torch.float32 else run(reference.decode, inp, dtype)
    assert_matches(out, run(reference.decode, inp, F64), low, PRECISION_OF[dtype])


@pytest.mark.parametrize("need", [("f", "W_dec", "bias"), ("target",), ("f",), ("W_dec",)])
def test_decode_gradients_of_a_subset(need):
    """Layer 1 decodes toward the data (target needs no gradient); layer 2 toward the
    residual, which does. Inputs that need no gradient get none."""
    inp = make_inputs(37, 48, 200, torch.float32, 0.05)
    assert_matches(run(decode, inp, torch.float32, need), run(reference.decode, inp, F64, need))


def test_decode_of_a_dead_layer_is_the_bias():
    inp = make_inputs(37, 48, 200, torch.float32, 0.0)
    out = run(decode, inp, torch.float32)
    assert torch.equal(out["x_hat"], inp["bias"].expand(37, 48))
    assert_matches(out, run(reference.decode, inp, F64))


def test_decode_upstream_grads_missing_or_expanded():
    """sq_err.sum() sends an expanded grad and none for x̂; x̂.sum() sends none for sq_err
    (then the target's gradient is zero: the reference leaves it unset, autograd's None)."""
    inp = make_inputs(37, 48, 200, torch.float32, 0.05)
    for loss in (lambda xh, sq: sq.sum(), lambda xh, sq: (2 * xh).sum()):
        grads = []
        for op, dtype in ((decode, torch.float32), (reference.decode, F64)):
            leaves = [inp[k].to(dtype).detach().requires_grad_() for k in INPUTS]
            loss(*op(*leaves)).backward()
            grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
        for i, (g, r) in enumerate(zip(*grads)):
            assert_matches({i: g}, {i: r})


def _args(B=8, d=16, m=32):
    return [torch.rand(B, m, device=DEVICE), torch.randn(m, d, device=DEVICE), torch.zeros(d, device=DEVICE),
            torch.randn(B, d, device=DEVICE)]


@pytest.mark.parametrize("break_it,error,match", [
    (lambda a: a.__setitem__(0, a[0].double()), TypeError, "supported"),
    (lambda a: a.__setitem__(3, a[3].half()), TypeError, "one dtype"),
    (lambda a: a.__setitem__(1, torch.randn(16, 32, device=DEVICE).T), ValueError, "contiguous"),
    (lambda a: a.__setitem__(1, torch.randn(32, 17, device=DEVICE)), ValueError, "shape"),
    (lambda a: a.__setitem__(3, torch.randn(9, 16, device=DEVICE)), ValueError, "shape"),
    (lambda a: a.__setitem__(2, torch.zeros(1, 16, device=DEVICE)), ValueError, "1-D"),
    (lambda a: a.__setitem__(3, torch.zeros(8, 16, device="meta")), ValueError, "one device"),
    (lambda a: a.__setitem__(0, torch.rand(8 * 32 + 2, device=DEVICE)[2:].view(8, 32)), ValueError, "f.clone()"),
])
def test_decode_misuse_is_a_clear_error(break_it, error, match):
    args = _args()
    break_it(args)
    with pytest.raises(error, match=match):
        decode(*args)
