"""The pair path (kernels/sparse.py) against the float64 reference: encoder and decoder
chained as in the model (the decoder's target is the encoder's input, so grad_x collects
both), every output and every input gradient.

f's pairs ride from the pair encoder to the pair decoder; ``max_density = 1`` forces the
pair path whenever anything fires, so the tests cover it at any density, and the crossover
test checks the boundary itself. Outputs are NaN-poisoned before the kernels write them.
"""

import pytest
import torch
from helpers import DEVICE, F64, PRECISION_OF, assert_matches
from test_kernel_encoder import LOW, make_inputs

from esosae.kernels import sparse
from esosae.kernels.pairs import attached
from esosae.sae import reference

PARAMS = ("x", "W_enc", "b_enc", "b_dec", "W_dec", "bias")
SHAPES = [(32, 64, 128), (21, 40, 96)]  # (B, d, m): tile multiples, and not
B, D, M = SHAPES[1]  # the special cases' shape

pytestmark = pytest.mark.usefixtures("poisoned")


def chain_inputs(B, d, m, dtype, mode):
    """The encoder's inputs of ``test_kernel_encoder`` plus a decoder and upstream grads."""
    inp = make_inputs(B, d, m, dtype, mode)
    inp["W_dec"] = torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE), dim=1).to(dtype)
    inp["bias"] = (0.5 * torch.randn(d, device=DEVICE)).to(dtype)
    inp["g_xh"] = torch.randn(B, d, device=DEVICE).to(dtype)
    inp["g_sq"] = torch.randn(B, device=DEVICE)
    return inp


def run(encode, decode, inp, dtype, also_f=False):
    """x → encode → decode(f, W_dec, bias, target = x); backward from x̂, sq_err and row_l1
    (and f itself with ``also_f``, a second consumer of f)."""
    p = {k: inp[k].to(dtype).detach().requires_grad_() for k in PARAMS}
    theta = inp["theta"].to(F64) if dtype == F64 else inp["theta"]
    f, row_l1, fire = encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], theta)
    x_hat, sq_err = decode(f, p["W_dec"], p["bias"], p["x"])
    outs = [x_hat, sq_err, row_l1] + ([f] if also_f else [])
    grads = [inp["g_xh"].to(dtype), inp["g_sq"].to(sq_err.dtype), inp["g_l1"].to(row_l1.dtype)]
    torch.autograd.backward(outs, grads + ([inp["g_f"].to(dtype)] if also_f else []))
    out = {"f": f.detach(), "row_l1": row_l1.detach(), "fire_count": fire, "x_hat": x_hat.detach(),
           "sq_err": sq_err.detach()}
    out.update({f"grad_{k}": p[k].grad for k in PARAMS})
    return out, f


def pair_ops(max_density=1.0):
    return (lambda *a: sparse.encode(*a, max_density=max_density)), sparse.decode


def check(inp, dtype, max_density=1.0, also_f=False, expect_pairs=True):
    out, f = run(*pair_ops(max_density), inp, dtype, also_f)
    assert (attached(f) is not None) == expect_pairs
    ref, _ = run(reference.encode, reference.decode, inp, F64, also_f)
    low = None if dtype == torch.float32 else run(reference.encode, reference.decode, inp, dtype, also_f)[0]
    assert_matches(out, ref, low, PRECISION_OF[dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("B,d,m", SHAPES)
def test_pairs_match_reference(B, d, m, dtype):
    inp = chain_inputs(B, d, m, dtype, "jump")
    out = check(inp, dtype)
    assert 0 < (out["f"] != 0).float().mean() < 0.9


def test_pairs_rows_with_none_and_rows_with_many():
    """Zero rows of x fire nothing (a = b_enc = 0 < θ); rows scaled up fire most features."""
    inp = chain_inputs(B, D, M, torch.float32, "jump")
    scale = torch.tensor([0.0, 0.2, 1.0, 4.0], device=DEVICE).repeat(6)[:B, None]
    inp["x"] = inp["x"] * scale
    inp["b_enc"], inp["b_dec"] = torch.zeros_like(inp["b_enc"]), torch.zeros_like(inp["b_dec"])
    out = check(inp, torch.float32)
    per_row = (out["f"] != 0).sum(1)
    assert (per_row[::4] == 0).all() and per_row[3::4].min() > M // 4


def test_pairs_feature_active_in_every_row():
    inp = chain_inputs(B, D, M, torch.float32, "jump")
    inp["b_enc"][7] = 20.0
    out = check(inp, torch.float32)
    assert out["fire_count"][7] == B


def test_pairs_all_features_dead_take_the_dense_path():
    inp = chain_inputs(B, D, M, torch.float32, "dead")
    out = check(inp, torch.float32, expect_pairs=False)
    assert (out["f"] == 0).all()


def test_pairs_crossover_boundary():
    """At density exactly ``max_density`` the pairs are taken, one pair above it the dense
    kernels run; both match the reference."""
    inp = chain_inputs(B, D, M, torch.float32, "jump")
    nnz = int((reference.encode(*(inp[k] for k in ("x", "W_enc", "b_enc", "b_dec")), inp["theta"])[0] != 0).sum())
    check(inp, torch.float32, max_density=nnz / (B * M))
    check(inp, torch.float32, max_density=(nnz - 1) / (B * M), expect_pairs=False)


def test_pairs_f_with_a_second_consumer_gets_its_whole_gradient():
    """When f's gradient also comes from elsewhere, the encoder still reads it on the pairs:
    exact, since grad_a = grad_f·1[a > θ]."""
    check(chain_inputs(B, D, M, torch.float32, "jump"), torch.float32, also_f=True)


def test_pairs_modified_f_decodes_densely():
    """An f changed in place after the encoder no longer matches its pairs: the decoder
    takes the dense kernels (and the result is still the reference's)."""
    inp = chain_inputs(B, D, M, torch.float32, "jump")
    p = {k: inp[k].detach().requires_grad_() for k in PARAMS}
    f, _, _ = sparse.encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], inp["theta"], max_density=1.0)
    f = f * 1.0  # a new tensor: no pairs
    assert attached(f) is None
    x_hat, _ = sparse.decode(f, p["W_dec"], p["bias"], p["x"])
    ref_f = reference.encode(*(inp[k].double() for k in ("x", "W_enc", "b_enc", "b_dec")), inp["theta"].double())[0]
    ref, _ = reference.decode(ref_f, inp["W_dec"].double(), inp["bias"].double(), inp["x"].double())
    assert_matches({"x_hat": x_hat.detach()}, {"x_hat": ref})
