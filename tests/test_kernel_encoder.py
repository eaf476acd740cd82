"""The fused encoder kernel against the float64 reference: f, row_l1, fire_count and the
gradients of x, W_enc, b_enc and b_dec.

fp32 must match tightly; bf16 and fp16 follow flash-attention's rule: the kernel's error
against float64 is at most twice the error of ``reference.encode`` run in that dtype. Every
output buffer is poisoned with NaN before the kernel writes it.
"""

import pytest
import torch
from helpers import DEVICE, F64, PRECISION_OF, assert_matches

from esosae.sae import reference
from esosae.kernels import encode

SHAPES = [(32, 64, 256), (37, 48, 200)]  # (B, d, m): tile multiples, and not
LOW = [torch.bfloat16, torch.float16]
SEPARATION = 0.04  # |a − θ| ≥ this in every test that compares masks: ≫ bf16's error on a
INPUTS = ("x", "W_enc", "b_enc", "b_dec")


pytestmark = pytest.mark.usefixtures("poisoned")


def preact(inp):
    """a = (x − b_dec) W_enc + b_enc in float64, from the (rounded) inputs."""
    return (inp["x"].to(F64) - inp["b_dec"].to(F64)) @ inp["W_enc"].to(F64) + inp["b_enc"].to(F64)


def separate(inp, dtype):
    """Shift each b_enc_j so that θ_j sits in a gap of column j's pre-activations at least
    2·SEPARATION wide: the mask is then unambiguous at any precision we test."""
    a = preact(inp) - inp["theta"].to(F64)  # (B, m), distances to θ
    v = a.sort(0).values
    inf = torch.full((1, v.shape[1]), float("inf"), dtype=F64, device=v.device)
    lo, hi = torch.cat([-inf, v]), torch.cat([v, inf])  # (B + 1, m): the gaps
    mid = torch.where(lo.isinf(), hi - 2 * SEPARATION, torch.where(hi.isinf(), lo + 2 * SEPARATION, (lo + hi) / 2))
    cost = torch.where(hi - lo >= 4 * SEPARATION, mid.abs(), float("inf"))
    shift = -mid.gather(0, cost.argmin(0, keepdim=True))[0]  # (m,)
    inp["b_enc"] = (inp["b_enc"].to(F64) + shift).to(dtype)
    assert (preact(inp) - inp["theta"].to(F64)).abs().min() >= SEPARATION


def make_inputs(B, d, m, dtype, mode):
    """Random inputs in ``dtype`` (θ in fp32, as the model keeps it) and upstream grads.
    mode: relu (θ = 0), jump (random θ > 0), dead (nothing fires), all (everything fires)."""
    inp = {"x": torch.randn(B, d), "W_enc": torch.randn(d, m) / d**0.5,
           "b_enc": 0.1 * torch.randn(m) + (10.0 if mode == "all" else 0.0), "b_dec": 0.5 * torch.randn(d)}
    inp = {k: v.to(DEVICE, dtype) for k, v in inp.items()}
    theta = {"relu": torch.zeros(m), "jump": 0.1 + 0.9 * torch.rand(m), "dead": torch.full((m,), 1e3),
             "all": torch.zeros(m)}[mode]
    inp["theta"] = theta.to(DEVICE)
    if mode in ("relu", "jump"):
        separate(inp, dtype)
    inp["g_f"] = torch.randn(B, m, device=DEVICE).to(dtype)
    inp["g_l1"] = torch.randn(B, device=DEVICE)
    return inp


def run(op, inp, dtype, need=INPUTS):
    """Outputs and input gradients of ``op`` with the inputs cast to ``dtype``."""
    leaves = {k: inp[k].to(dtype).detach().requires_grad_(k in need) for k in INPUTS}
    theta = inp["theta"].to(F64) if dtype == F64 else inp["theta"]
    f, row_l1, fire = op(*(leaves[k] for k in INPUTS), theta)
    torch.autograd.backward([f, row_l1], [inp["g_f"].to(f.dtype), inp["g_l1"].to(row_l1.dtype)])
    out = {"f": f.detach(), "row_l1": row_l1.detach(), "fire_count": fire}
    out.update({f"grad_{k}": leaves[k].grad for k in need})
    return out




@pytest.mark.parametrize("mode", ["relu", "jump", "dead", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("B,d,m", SHAPES)
def test_encode_matches_reference(B, d, m, dtype, mode):
    inp = make_inputs(B, d, m, dtype, mode)
    out = run(encode, inp, dtype)
    ref = run(reference.encode, inp, F64)
    assert out["f"].dtype == dtype and out["row_l1"].dtype == torch.float32
    assert all(out[f"grad_{k}"].dtype == dtype for k in INPUTS)
    low = None if dtype == torch.float32 else run(reference.encode, inp, dtype)
    assert_matches(out, ref, low, PRECISION_OF[dtype])
    fired = (ref["f"] != 0).sum().item()
    if mode == "dead":
        assert fired == 0
    elif mode == "all":
        assert fired == B * m
    else:
        assert 0 < fired < B * m


@pytest.mark.parametrize("B,d,m", SHAPES)
def test_encode_at_the_threshold(B, d, m):
    """Pre-activations 1e-3 above and below θ, exactly at θ > 0, and exactly 0 with θ = 0
    (JumpReLU and ReLU are strict: a = θ does not fire and passes no gradient)."""
    inp = make_inputs(B, d, m, torch.float32, "relu")
    a = preact(inp)
    rows = torch.randint(0, B, (m,), device=DEVICE)
    picked = a[rows, torch.arange(m, device=DEVICE)].abs() + 0.1  # (m,) > 0
    inp["b_enc"] += (picked - a[rows, torch.arange(m, device=DEVICE)]).float()  # that row now sits at `picked`
    a = preact(inp)
    picked = a[rows, torch.arange(m, device=DEVICE)]
    side = torch.where(torch.arange(m, device=DEVICE) % 2 == 0, -1e-3, 1e-3)  # even: a just above θ
    theta = (picked + side).float()
    inp["W_enc"][:, :2] = 0  # columns 0, 1: a = b_enc exactly
    inp["b_enc"][:2] = torch.tensor([0.0, 0.375])
    theta[:2] = torch.tensor([0.0, 0.375])
    inp["theta"] = theta
    a = preact(inp)
    others = (a - theta.double()).abs()
    others[rows[2:], torch.arange(2, m, device=DEVICE)] = 1.0
    assert others[:, 2:].min() > 1e-5  # only the placed values are near θ (fp32's error on a: ~1e-6)
    out, ref = run(encode, inp, torch.float32), run(reference.encode, inp, F64)
    assert_matches(out, ref)
    cols = torch.arange(2, m, device=DEVICE)
    fired = out["f"][rows[2:], cols] != 0
    assert torch.equal(fired, cols % 2 == 0)
    assert (out["f"][:, :2] == 0).all() and (out["fire_count"][:2] == 0).all()
    assert (out["grad_b_enc"][:2] == 0).all() and (out["grad_W_enc"][:, :2] == 0).all()


@pytest.mark.parametrize("need", [("W_enc", "b_enc", "b_dec"), ("b_dec",), ("x",)])
def test_encode_gradients_of_a_subset(need):
    """Layer 1 of the SAE encodes data (x needs no gradient): grad_b_dec must still be right,
    and inputs that need no gradient get none."""
    inp = make_inputs(37, 48, 200, torch.float32, "jump")
    out, ref = run(encode, inp, torch.float32, need), run(reference.encode, inp, F64, need)
    assert_matches(out, ref)


def test_encode_upstream_grads_missing_or_expanded():
    """A loss of f.sum() sends an expanded (stride-0) grad_f and no grad for row_l1; a loss of
    row_l1 alone sends no grad_f."""
    inp = make_inputs(37, 48, 200, torch.float32, "jump")
    for loss in (lambda f, l1: f.sum(), lambda f, l1: (l1 * 3).sum()):
        grads = []
        for op, dtype in ((encode, torch.float32), (reference.encode, F64)):
            leaves = [inp[k].to(dtype).detach().requires_grad_() for k in INPUTS]
            f, l1, _ = op(*leaves, inp["theta"].to(dtype))
            loss(f, l1).backward()
            grads.append([t.grad for t in leaves])
        for i, (g, r) in enumerate(zip(*grads)):
            assert_matches({i: g}, {i: r})


def test_encode_propagates_nan_like_the_reference():
    """A NaN input poisons its row's f and row_l1 (as a·1[a > θ] does), and fires nothing."""
    inp = make_inputs(37, 48, 200, torch.float32, "jump")
    inp["x"][3, 5] = float("nan")
    out = encode(*(inp[k] for k in INPUTS), inp["theta"])
    ref = reference.encode(*(inp[k] for k in INPUTS), inp["theta"])
    for o, r in zip(out, ref):
        assert torch.equal(o.isnan(), r.isnan())
    assert out[0][3].isnan().all() and out[1][3].isnan() and not out[0][2].isnan().any()
    assert torch.equal(out[2], ref[2])


def test_fire_count_is_not_differentiable():
    inp = make_inputs(32, 64, 256, torch.float32, "jump")
    f, row_l1, fire = encode(inp["x"], inp["W_enc"].requires_grad_(), inp["b_enc"], inp["b_dec"], inp["theta"])
    assert f.requires_grad and row_l1.requires_grad and not fire.requires_grad


def _args(dtype=torch.float32, B=8, d=16, m=32):
    return [torch.randn(B, d, dtype=dtype, device=DEVICE), torch.randn(d, m, dtype=dtype, device=DEVICE),
            torch.zeros(m, dtype=dtype, device=DEVICE), torch.zeros(d, dtype=dtype, device=DEVICE),
            torch.zeros(m, device=DEVICE)]


@pytest.mark.parametrize("break_it,error,match", [
    (lambda a: a.__setitem__(0, a[0].double()), TypeError, "supported"),
    (lambda a: a.__setitem__(1, a[1].bfloat16()), TypeError, "one dtype"),
    (lambda a: a.__setitem__(4, a[4].int()), TypeError, "floating-point"),
    (lambda a: a.__setitem__(1, torch.randn(32, 16, device=DEVICE).T), ValueError, "contiguous"),
    (lambda a: a.__setitem__(1, torch.randn(17, 32, device=DEVICE)), ValueError, "shape"),
    (lambda a: a.__setitem__(4, torch.zeros(31, device=DEVICE)), ValueError, "shape"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "2-D"),
    (lambda a: a.__setitem__(0, a[0][:0]), ValueError, "empty"),
    (lambda a: a.__setitem__(2, torch.zeros(32, device="meta")), ValueError, "one device"),
    (lambda a: a.__setitem__(3, [0.0] * 16), TypeError, "torch.Tensor"),
    (lambda a: a.__setitem__(1, torch.randn(16 * 32 + 1, device=DEVICE)[1:].view(16, 32)), ValueError, "W_enc.clone()"),
])
def test_encode_misuse_is_a_clear_error(break_it, error, match):
    args = _args()
    break_it(args)
    with pytest.raises(error, match=match):
        encode(*args)
