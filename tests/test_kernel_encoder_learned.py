"""The encoder kernel with learned thresholds (``encode_learned``) against the float64
reference: f, the row's L1 or L0, fire counts, the gradients of x, W_enc, b_enc, b_dec,
and of μ through θ = τ·μ (the straight-through estimate that ``_encode_bwd_theta_kernel``
computes from recomputed pre-activations).

The inputs keep every pre-activation away from θ (the mask) and from θ ± ε/2 (the edges
of the rectangle kernel), so both are unambiguous in fp32, and ε is chosen so that a
good share of them lies inside the window: the θ-gradient is not a sum of zeros.
"""

import pytest
import torch
from helpers import F64, assert_matches
from test_kernel_encoder import INPUTS, make_inputs, preact

from esosae.kernels import encode_learned
from esosae.sae import reference

TAU = 0.5
GAP = 2e-4  # |a − θ ∓ ε/2| ≥ this: ≫ fp32 error on a (~1e-6)

pytestmark = pytest.mark.usefixtures("poisoned")


def window_inputs(B, d, m):
    """make_inputs' 'jump' case, θ = τ·μ, and an ε whose window edges sit in a gap of the
    distances |a − θ| (≥ 2·GAP wide) near their 30th percentile."""
    inp = make_inputs(B, d, m, torch.float32, "jump")
    inp["mu"] = (inp["theta"] / TAU).clone()
    dist = (preact(inp) - inp["theta"].to(F64)).abs().flatten().sort().values
    lo, hi = int(0.2 * dist.numel()), int(0.4 * dist.numel())
    gaps = dist[lo + 1:hi] - dist[lo:hi - 1]
    i = int(gaps.argmax())
    assert gaps[i] >= 2 * GAP
    inp["eps"] = float(dist[lo + i] + dist[lo + i + 1])  # ε/2 = the gap's midpoint
    return inp


def run(op, inp, dtype, l0):
    leaves = {k: inp[k].to(dtype).detach().requires_grad_() for k in (*INPUTS, "mu")}
    theta = TAU * leaves["mu"]
    f, row, fire = op(*(leaves[k] for k in INPUTS), theta, inp["eps"], l0)
    torch.autograd.backward([f, row], [inp["g_f"].to(f.dtype), inp["g_l1"].to(row.dtype)])
    out = {"f": f.detach(), "row": row.detach(), "fire_count": fire}
    out.update({f"grad_{k}": leaves[k].grad for k in leaves})
    return out


@pytest.mark.parametrize("l0", [False, True])
@pytest.mark.parametrize("B,d,m", [(32, 64, 256), (37, 48, 200)])
def test_encode_learned_matches_reference(B, d, m, l0):
    inp = window_inputs(B, d, m)
    out, ref = run(encode_learned, inp, torch.float32, l0), run(reference.encode_learned, inp, F64, l0)
    assert_matches(out, ref)
    inside = ((preact(inp) - inp["theta"].to(F64)).abs() < inp["eps"] / 2).sum(0)  # (m,)
    assert (inside > 0).float().mean() > 0.5 and (ref["grad_mu"][inside == 0] == 0).all()
    if l0:  # the L0 term trains θ alone: a's gradient is the f term's only
        no_row = dict(inp, g_l1=torch.zeros_like(inp["g_l1"]))
        assert_matches({"grad_x": out["grad_x"]}, {"grad_x": run(reference.encode_learned, no_row, F64, l0)["grad_x"]})


def test_encode_learned_without_threshold_gradient_is_encode():
    """θ that needs no gradient: the same outputs and input gradients as the plain kernel."""
    from esosae.kernels import encode

    inp = window_inputs(37, 48, 200)
    leaves = [inp[k].detach().requires_grad_() for k in INPUTS]
    f, row, fire = encode_learned(*leaves, inp["theta"], inp["eps"], False)
    f2, row2, fire2 = encode(*(t.detach() for t in leaves), inp["theta"])
    assert torch.equal(f, f2) and torch.equal(row, row2) and torch.equal(fire, fire2)
