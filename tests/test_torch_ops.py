"""The fast torch ops (esosae.sae.torch_ops) compute the reference's math (esosae.sae.reference).

Every output and gradient is compared with the reference run in float64 on fresh random
inputs, on both of each op's paths (active pairs and dense, forced by the density knobs),
for a round and an odd shape, θ = 0 (ReLU), per-feature θ, all features dead and all firing:
- float64 inputs: agreement to 1e-10 of the largest value (the formulas are the same);
- float32 inputs: error against float64 at most 2× the reference's own float32 error
  (flash-attention's rule) plus 1e-6 of the largest value. Pre-activations are kept at
  least 1e-3 away from θ, so float32 and float64 take the same threshold decisions.
Then the compositions the model uses (the decoder's gradient of f on active pairs only,
the dual-layer residual path with gradients into the layer-2 target) and a few full
training steps against a backend made of the reference functions.
"""

import pytest
import torch

from esosae.sae import reference

from esosae.sae import torch_ops
from esosae.sae.backend import TORCH, Backend
from esosae.config import DataConfig, SAEConfig, ScheduleConfig, TrainConfig
from esosae.sae.reference import sample_tiles
from esosae.training.loop import build, make_source, train_step

REF = Backend("reference", reference.encode, reference.decode, reference.orth_penalty)
SHAPES = [(64, 48, 96), (5, 123, 123), (33, 17, 257)]  # (B, d, m)
PATHS = ["sparse", "dense"]
GAP = 1e-3


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Force the active-pair path (density limit 1) or the dense one (limit below any density)."""
    monkeypatch.setattr(torch_ops, "SPARSE_MAX_DENSITY", 1.0 if request.param == "sparse" else -1.0)
    return request.param


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def leaves(tensors: dict, dtype: torch.dtype, grad=True) -> dict:
    return {k: v.detach().to(dtype).requires_grad_(grad and v.is_floating_point()) for k, v in tensors.items()}


def check(ours: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor | None, name: str) -> None:
    """float64: ≤ 1e-10·max|ref|; float32: ≤ 2·err(reference in float32) + 1e-6·max|ref|."""
    assert ours.shape == ref64.shape, name
    if ours.layout != torch.strided:
        ours = ours.to_dense()
    err = (ours.double() - ref64.double()).abs().max().item() if ours.numel() else 0.0
    top = ref64.abs().max().item() if ref64.numel() else 0.0
    if ref32 is None:
        assert err <= 1e-10 * max(top, 1.0), f"{name}: float64 error {err:.3g} (max {top:.3g})"
    else:
        base = (ref32.double() - ref64.double()).abs().max().item() if ref32.numel() else 0.0
        assert err <= 2 * base + 1e-6 * max(top, 1.0), f"{name}: float32 error {err:.3g}, reference's {base:.3g}"


def keep_off_theta(pre: torch.Tensor, b_enc: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """b_enc shifted per feature (by the first of 0, ±0.013, ±0.026, …) so that no
    pre-activation pre + b_enc lies within GAP of θ: float32 then decides as float64."""
    shifts = torch.tensor([0.0] + [s * k * 0.013 for k in range(1, 40) for s in (1, -1)], dtype=pre.dtype)
    dist = ((pre[None] + (b_enc + shifts[:, None])[:, None, :]) - theta).abs().amin(1)  # (n_shifts, m)
    first = (dist > GAP).to(torch.int8).argmax(0)  # (m,)
    assert bool((dist > GAP).any(0).all())
    return b_enc + shifts[first]


def encoder_inputs(B, d, m, theta_kind):
    x, W, b_dec = rand(B, d), rand(d, m, scale=d ** -0.5), rand(d, scale=0.1)
    b_enc = rand(m, scale=0.5)
    theta = {"relu": torch.zeros(m), "per_feature": rand(m).abs() * 0.5,
             "all_dead": torch.full((m,), 1e3), "all_firing": torch.zeros(m)}[theta_kind].double()
    if theta_kind == "all_firing":
        b_enc = b_enc.abs() + 50.0
    b_enc = keep_off_theta((x - b_dec) @ W, b_enc, theta)
    return {"x": x, "W_enc": W, "b_enc": b_enc, "b_dec": b_dec, "theta": theta}


def run_encode(fn, inp, g_f, g_l1):
    f, l1, fire = fn(inp["x"], inp["W_enc"], inp["b_enc"], inp["b_dec"], inp["theta"])
    ((f * g_f.to(f.dtype)).sum() + (l1 * g_l1.to(l1.dtype)).sum()).backward()
    grads = {k: inp[k].grad for k in ("x", "W_enc", "b_enc", "b_dec")}
    return (f, l1, fire), grads


@pytest.mark.parametrize("theta_kind", ["relu", "per_feature", "all_dead", "all_firing"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encode_matches_reference(shape, theta_kind, dtype, path):
    B, d, m = shape
    inp = encoder_inputs(B, d, m, theta_kind)
    g_f, g_l1 = rand(B, m), rand(B)
    (f64, l1_64, fire64), grads64 = run_encode(reference.encode, leaves(inp, torch.float64), g_f, g_l1)
    ref32 = run_encode(reference.encode, leaves(inp, dtype), g_f, g_l1) if dtype == torch.float32 else None
    (f, l1, fire), grads = run_encode(torch_ops.encode, leaves(inp, dtype), g_f, g_l1)
    assert f.dtype == dtype and l1.dtype == dtype and fire.dtype == torch.int32
    assert torch.equal(fire, fire64)
    density = (f64 != 0).double().mean().item()
    assert {"all_dead": density == 0, "all_firing": density == 1}.get(theta_kind, 0 < density < 1)
    r32 = ref32[0] if ref32 else (None, None)
    check(f, f64, r32[0], "f")
    check(l1, l1_64, r32[1], "row_l1")
    for k in grads64:
        check(grads[k], grads64[k], ref32[1][k] if ref32 else None, f"grad {k}")


@pytest.mark.parametrize("needs", ["all", "no_x", "only_W"])
def test_encode_computes_only_the_gradients_asked_for(needs, path):
    """grad_b_dec without grad_x takes the matrix-vector route (−W_enc Σ grad_a)."""
    inp = leaves(encoder_inputs(40, 24, 80, "per_feature"), torch.float64)
    want = {"all": ("x", "W_enc", "b_enc", "b_dec"), "no_x": ("W_enc", "b_enc", "b_dec"), "only_W": ("W_enc",)}[needs]
    ref = {k: v.detach().clone().requires_grad_(k in want) for k, v in inp.items()}
    ours = {k: v.detach().clone().requires_grad_(k in want) for k, v in inp.items()}
    g_f, g_l1 = rand(40, 80), rand(40)
    _, grads_ref = run_encode(reference.encode, ref, g_f, g_l1)
    _, grads = run_encode(torch_ops.encode, ours, g_f, g_l1)
    for k in grads_ref:
        assert (grads[k] is None) == (k not in want), k
        if k in want:
            check(grads[k], grads_ref[k], None, f"grad {k}")


def decoder_inputs(B, d, m, density):
    f = torch.relu(rand(B, m)) * (torch.rand(B, m, dtype=torch.float64) < density)
    return {"f": f, "W_dec": rand(m, d, scale=0.3), "bias": rand(d), "target": rand(B, d)}


def run_decode(fn, inp, g_xh, g_sq):
    x_hat, sq = fn(inp["f"], inp["W_dec"], inp["bias"], inp["target"])
    loss = 0.0
    if g_xh is not None:
        loss = loss + (x_hat * g_xh.to(x_hat.dtype)).sum()
    if g_sq is not None:
        loss = loss + (sq * g_sq.to(sq.dtype)).sum()
    loss.backward()
    return (x_hat, sq), {k: v.grad for k, v in inp.items()}


@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_matches_reference(shape, density, dtype, path):
    """A leaf f (not an encoder output): x̂, squared error, and the full gradients of f,
    W_dec, bias and target."""
    B, d, m = shape
    inp = decoder_inputs(B, d, m, density)
    g_xh, g_sq = rand(B, d), rand(B)
    outs64, grads64 = run_decode(reference.decode, leaves(inp, torch.float64), g_xh, g_sq)
    ref32 = run_decode(reference.decode, leaves(inp, dtype), g_xh, g_sq) if dtype == torch.float32 else None
    outs, grads = run_decode(torch_ops.decode, leaves(inp, dtype), g_xh, g_sq)
    for i, name in enumerate(("x_hat", "sq_err")):
        assert outs[i].dtype == dtype
        check(outs[i], outs64[i], ref32[0][i] if ref32 else None, name)
    for k in grads64:
        assert grads[k].layout == torch.strided, k  # a leaf's gradient is the full dense one
        check(grads[k], grads64[k], ref32[1][k] if ref32 else None, f"grad {k}")


@pytest.mark.parametrize("used", ["x_hat", "sq_err"])
def test_decode_with_one_output_in_the_loss(used, path):
    """Autograd hands the backward None for the unused output's gradient."""
    inp = decoder_inputs(20, 12, 60, 0.1)
    g_xh, g_sq = (rand(20, 12), None) if used == "x_hat" else (None, rand(20))
    _, grads_ref = run_decode(reference.decode, leaves(inp, torch.float64), g_xh, g_sq)
    _, grads = run_decode(torch_ops.decode, leaves(inp, torch.float64), g_xh, g_sq)
    for k in grads_ref:
        if grads_ref[k] is None:
            assert grads[k] is None or not grads[k].any(), k
        else:
            check(grads[k], grads_ref[k], None, f"grad {k}")


def single_layer(ops, p, x, theta, w):
    """encode → decode as the model does, and a loss that weighs every output."""
    f, l1, _ = ops.encode(x, p["W_enc"], p["b_enc"], p["b_dec"], theta)
    x_hat, sq = ops.decode(f, p["W_dec"], p["b_dec"], x)
    return (sq * w["sq"]).sum() + (l1 * w["l1"]).sum() + (x_hat * w["xh"]).sum(), f


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("theta_kind", ["relu", "per_feature", "all_dead"])
def test_encode_then_decode_gradients_match(theta_kind, dtype, path):
    """The decoder hands the encoder grad_f on the active pairs only; the parameter
    gradients are still the reference's."""
    B, d, m = 48, 40, 200
    e = encoder_inputs(B, d, m, theta_kind)
    base = {"W_enc": e["W_enc"], "b_enc": e["b_enc"], "b_dec": e["b_dec"], "W_dec": rand(m, d, scale=0.3)}
    w = {"sq": rand(B), "l1": rand(B), "xh": rand(B, d)}
    results = {}
    for name, ops, dt in (("ref64", REF, torch.float64), ("ref32", REF, dtype), ("ours", TORCH, dtype)):
        if name == "ref32" and dtype == torch.float64:
            continue
        p = leaves(base, dt)
        loss, f = single_layer(ops, p, e["x"].to(dt), e["theta"].to(dt), {k: v.to(dt) for k, v in w.items()})
        loss.backward()
        results[name] = (loss, {k: v.grad for k, v in p.items()}, f)
    loss64, g64, f64 = results["ref64"]
    loss, g, f = results["ours"]
    r32 = results.get("ref32")
    if path == "sparse":
        assert torch_ops.attached(f) is not None  # the active-pair route was taken
    check(loss, loss64, r32[0] if r32 else None, "loss")
    for k in g64:
        check(g[k], g64[k], r32[1][k] if r32 else None, f"grad {k}")


@pytest.mark.parametrize("side", ["below", "above"])
def test_density_crossover_at_the_default_limit(side):
    """Without forcing a path: a batch just below SPARSE_MAX_DENSITY takes the active pairs,
    one just above takes the dense GEMMs; both give the reference's outputs and gradients."""
    B, d, m = 64, 40, 400
    density = torch_ops.SPARSE_MAX_DENSITY * (0.8 if side == "below" else 1.25)
    e = encoder_inputs(B, d, m, "relu")
    pre = (e["x"] - e["b_dec"]) @ e["W_enc"]  # (B, m)
    q = pre.kthvalue(round((1 - density) * B), dim=0).values  # per feature: fires on `density` of the rows
    e["b_enc"] = keep_off_theta(pre, -q + 1e-4, e["theta"])
    base = {"W_enc": e["W_enc"], "b_enc": e["b_enc"], "b_dec": e["b_dec"], "W_dec": rand(m, d, scale=0.3)}
    w = {"sq": rand(B), "l1": rand(B), "xh": rand(B, d)}
    results = {}
    for name, ops in (("ref", REF), ("ours", TORCH)):
        p = leaves(base, torch.float64)
        loss, f = single_layer(ops, p, e["x"], e["theta"], w)
        loss.backward()
        results[name] = (loss, {k: v.grad for k, v in p.items()}, f)
    (loss_r, g_r, f_r), (loss, g, f) = results["ref"], results["ours"]
    measured = (f_r != 0).double().mean().item()
    assert (measured <= torch_ops.SPARSE_MAX_DENSITY) == (side == "below"), measured
    assert (torch_ops.attached(f) is not None) == (side == "below")
    check(f, f_r, None, "f")
    check(loss, loss_r, None, "loss")
    for k in g_r:
        check(g[k], g_r[k], None, f"grad {k}")


@pytest.mark.parametrize("shape", [(8, 64), (5, 123), (1, 8), (3, 16)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_flat_nonzero_finds_the_set_flags_in_order(shape, density):
    """The word-at-a-time scan (sizes divisible by 8) and the plain one agree with nonzero,
    also on a view that starts off a word boundary."""
    mask = torch.rand(shape) < density
    assert torch.equal(torch_ops._flat_nonzero(mask), mask.view(-1).nonzero().view(-1))
    big = torch.rand(3 + mask.numel()) < density
    view = big[3:].view(shape)  # storage offset 3: not word-aligned
    assert torch.equal(torch_ops._flat_nonzero(view), view.reshape(-1).nonzero().view(-1))


@pytest.mark.parametrize("change", ["in_place", "second_use", "retain_grad"])
def test_decoder_falls_back_when_f_is_not_the_encoders_untouched_output(change, monkeypatch):
    """An f changed in place after the encoder, an f with a second consumer, or an f
    whose gradient is retained: parameter gradients still match the reference."""
    monkeypatch.setattr(torch_ops, "SPARSE_MAX_DENSITY", 1.0)
    B, d, m = 30, 20, 90
    e = encoder_inputs(B, d, m, "relu")
    base = {"W_enc": e["W_enc"], "b_enc": e["b_enc"], "b_dec": e["b_dec"], "W_dec": rand(m, d, scale=0.3)}
    extra = rand(B, m)
    grads = []
    for ops in (REF, TORCH):
        p = leaves(base, torch.float64)
        f, l1, _ = ops.encode(e["x"], p["W_enc"], p["b_enc"], p["b_dec"], e["theta"])
        if change == "in_place":
            f.mul_(1.5)
        if change == "retain_grad":
            f.retain_grad()
        x_hat, sq = ops.decode(f, p["W_dec"], p["b_dec"], e["x"])
        loss = sq.sum() + l1.sum()
        if change == "second_use":
            loss = loss + (f * extra).sum()
        loss.backward()
        grads.append({k: v.grad for k, v in p.items()})
    for k in grads[0]:
        check(grads[1][k], grads[0][k], None, f"grad {k}")


def dual_model(dtype, tau=0.05):
    cfg = TrainConfig(data=DataConfig(source="synthetic", synthetic_d=24, synthetic_atoms=48, synthetic_l0=3),
                      sae=SAEConfig(arch="esosae", m1=96, m2=80), device="cpu", backend="torch")
    source = make_source(cfg, torch.device("cpu"))
    model, _ = build(cfg, source, torch.device("cpu"))
    model.theta1.fill_(tau)
    model.theta2.copy_(torch.rand(80, generator=torch.Generator().manual_seed(1)) * tau)
    x = source.batch(0, 37) * model.scale
    return model.to(dtype), x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dual_layer_forward_and_gradients_match(dtype, path):
    """DualLayerSAE.forward: layer 2 encodes the residual r = x − x̂1 (x requires no grad,
    r does) and decodes against target r; gradients reach layer 1 through both."""
    outs, grads = {}, {}
    for name, ops, dt in (("ref64", REF, torch.float64), ("ref32", REF, dtype), ("ours", TORCH, dtype)):
        if name == "ref32" and dtype == torch.float64:
            continue
        model, x = dual_model(dt)
        tiles = sample_tiles(96, 80, 0.5, torch.Generator().manual_seed(3))
        out = model(x, ops)
        loss = (out["sq_err"].mean() + 0.05 * (out["l1_1"].mean() + 0.7 * out["l1_2"].mean())
                + 0.3 * ops.orth_penalty(model.W_dec1, model.W_dec2, 0.1, tiles))
        loss.backward()
        outs[name] = out
        grads[name] = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert 0 < (outs["ref64"]["f2"] > 0).double().mean() < 1
    for key in ("x_hat", "sq_err", "f1", "f2", "l1_1", "l1_2"):
        check(outs["ours"][key], outs["ref64"][key], outs["ref32"][key] if "ref32" in outs else None, key)
    for key in ("fire1", "fire2"):
        assert torch.equal(outs["ours"][key], outs["ref64"][key]), key
    assert grads["ours"].keys() == grads["ref64"].keys() and len(grads["ref64"]) == 7
    for k in grads["ref64"]:
        check(grads["ours"][k], grads["ref64"][k], grads["ref32"][k] if "ref32" in grads else None, f"grad {k}")


# -- orthogonality ---------------------------------------------------------------------


def unit_rows(m, d):
    W = rand(m, d)
    return W / W.norm(dim=1, keepdim=True)


@pytest.fixture(params=["sparse", "dense", "sparse-batches", "dense-batches"])
def orth_path(request, monkeypatch):
    """Both gradient paths; every block in one batch, or batches of a few blocks (or one)."""
    monkeypatch.setattr(torch_ops, "ORTH_SPARSE_MAX_DENSITY", 1.0 if request.param.startswith("sparse") else -1.0)
    monkeypatch.setattr(torch_ops, "ORTH_ROWS", 48)  # several blocks, one of them partial
    if request.param.endswith("batches"):
        monkeypatch.setattr(torch_ops, "ORTH_BATCH", 5000)  # a 48-row band alone, 1–2 tiles' rows together
    return request.param


def run_orth(fn, W1, W2, margin, tiles, g):
    W1, W2 = W1.clone().requires_grad_(), W2.clone().requires_grad_()
    pen = fn(W1, W2, margin, tiles)
    (pen * g).backward()
    return pen, W1.grad, W2.grad


@pytest.mark.parametrize("tiles_kind", ["all", "sampled", "unsorted_duplicates"])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("shape", [(128, 128, 32), (130, 70, 19)])  # (m1, m2, d)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orth_penalty_matches_reference(shape, margin, tiles_kind, dtype, orth_path):
    m1, m2, d = shape
    W1, W2 = unit_rows(m1, d), unit_rows(m2, d)
    tiles = None
    if tiles_kind != "all":
        tiles = sample_tiles(m1, m2, 0.4, torch.Generator().manual_seed(int(torch.randint(1000, ()))))
        if tiles_kind == "unsorted_duplicates":
            tiles = torch.cat([tiles, tiles[:2]])[torch.randperm(tiles.shape[0] + 2)]
    g = 2.5
    ref64 = run_orth(reference.orth_penalty, W1, W2, margin, tiles, g)
    ref32 = None
    if dtype == torch.float32:
        ref32 = run_orth(reference.orth_penalty, W1.to(dtype), W2.to(dtype), margin, tiles, g)
    ours = run_orth(torch_ops.orth_penalty, W1.to(dtype), W2.to(dtype), margin, tiles, g)
    frac = ((W1 @ W2.T).abs() > margin).double().mean().item()
    assert 0 < frac < 1 or margin == 0  # some pairs inside the margin, some past it
    for i, name in enumerate(("penalty", "grad W1", "grad W2")):
        assert ours[i].dtype == dtype
        check(ours[i], ref64[i], ref32[i] if ref32 else None, name)
    if margin == 0 and tiles is None:
        check(ours[0], reference.orth_penalty_gram(W1, W2), ref32[0] if ref32 else None, "Gram identity")


def test_orth_penalty_without_grad_and_with_one_side_frozen():
    W1, W2 = unit_rows(70, 12), unit_rows(90, 12)
    with torch.no_grad():
        check(torch_ops.orth_penalty(W1, W2, 0.1), reference.orth_penalty(W1, W2, 0.1), None, "no_grad")
    W1g = W1.clone().requires_grad_()
    torch_ops.orth_penalty(W1g, W2, 0.1).backward()
    W1r = W1.clone().requires_grad_()
    reference.orth_penalty(W1r, W2, 0.1).backward()
    check(W1g.grad, W1r.grad, None, "grad W1, W2 frozen")


# -- the backend and the trainer ---------------------------------------------------------


def test_torch_backend_serves_the_fast_ops():
    assert (TORCH.encode, TORCH.decode, TORCH.orth_penalty) == (torch_ops.encode, torch_ops.decode,
                                                                 torch_ops.orth_penalty)


def test_other_dtypes_fall_back_to_the_reference():
    x, W, b, bd = rand(6, 5).bfloat16(), rand(5, 7).bfloat16(), rand(7).bfloat16(), rand(5).bfloat16()
    th = torch.zeros(7)
    ours, ref = torch_ops.encode(x, W, b, bd, th), reference.encode(x, W, b, bd, th)
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


def step_config(arch: str) -> TrainConfig:
    """Small runs with every loss term on from step 0 (no warmups, sampled orthogonality tiles)."""
    data = DataConfig(source="synthetic", synthetic_d=32, synthetic_atoms=64, synthetic_l0=4, eval_tokens=256)
    if arch == "esosae":
        sae = SAEConfig(arch="esosae", m1=160, m2=128, target_l0=4, l1_coeff=0.05, gamma_max=1.0,
                        orth_margin=0.1, orth_block_fraction=0.5, margin_every=2)
    else:
        sae = SAEConfig(arch=arch, m1=200, target_l0=4, l1_coeff=0.05)
    return TrainConfig(data=data, sae=sae,
                       schedule=ScheduleConfig(schedule="const", tau_final=0.05, gamma_warmup="none",
                                               l1_warmup_fraction=0.0),
                       steps=5, batch_size=64, lr=1e-3, lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
                       device="cpu", backend="torch")


@pytest.mark.parametrize("arch", ["esosae", "relu", "topk"])
def test_training_steps_match_the_reference_backend(arch):
    """Five steps of the real training step (schedules, loss, backward, parallel-gradient
    removal, clipping, Adam, decoder renormalization, firing statistics and margins)."""
    cfg = step_config(arch)
    source = make_source(cfg, torch.device("cpu"))
    runs = {}
    for name, ops in (("ours", TORCH), ("reference", REF)):
        torch.manual_seed(cfg.seed)
        model, opt = build(cfg, source, torch.device("cpu"))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        losses = []
        for step in range(cfg.steps):
            x = source.batch(step, cfg.batch_size) * model.scale
            res = train_step(model, opt, ops, x, cfg, step)
            if arch == "esosae":
                assert res["orth"] > 0 and res["gamma"] > 0
            losses.append(res["loss"].item())
        runs[name] = (losses, {k: v.clone() for k, v in model.state_dict().items()})
    (loss_o, state_o), (loss_r, state_r) = runs["ours"], runs["reference"]
    assert loss_o == pytest.approx(loss_r, rel=1e-5)
    assert not torch.equal(state_r["W_dec1"], start["W_dec1"])  # the steps did move the weights
    for key, ref in state_r.items():
        if ref.numel() == 0:
            continue
        if ref.is_floating_point():
            err = (state_o[key].double() - ref.double()).abs().max().item()
            assert err <= 1e-5 * max(ref.abs().max().item(), 1e-30), f"{key}: error {err}"
        else:
            assert torch.equal(state_o[key], ref), key


class FixedCores:
    """torch_ops.CORES with a fixed answer."""

    def __init__(self, free: bool):
        self.free = free

    def look(self) -> bool:
        return self.free


def test_wide_work_gives_the_same_numbers_on_one_thread_and_on_two(path, monkeypatch):
    """torch_ops.wide runs its passes on every thread or on one depending on timing, so a
    training step (with esosae.training.optim.Adam) must come out bit for bit the same either way,
    at sizes where ATen does split those passes over two threads."""
    from esosae.training import optim

    data = DataConfig(source="synthetic", synthetic_d=64, synthetic_atoms=256, synthetic_l0=8, eval_tokens=256)
    sae = SAEConfig(arch="esosae", m1=512, m2=384, target_l0=8, l1_coeff=0.05, gamma_max=1.0,
                    orth_margin=0.05, orth_block_fraction=0.5)
    cfg = TrainConfig(data=data, sae=sae, schedule=ScheduleConfig(schedule="const", tau_final=0.02,
                                                                  gamma_warmup="none", l1_warmup_fraction=0.0),
                      steps=3, batch_size=256, lr=1e-3, lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
                      device="cpu", backend="torch")
    source = make_source(cfg, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    states = {}
    try:
        for free in (False, True):
            monkeypatch.setattr(torch_ops, "CORES", FixedCores(free))
            torch.manual_seed(cfg.seed)
            model, _ = build(cfg, source, torch.device("cpu"))
            opt = optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
            for step in range(cfg.steps):
                res = train_step(model, opt, TORCH, source.batch(step, cfg.batch_size) * model.scale, cfg, step)
                assert res["orth"] > 0
            states[free] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    for k, v in states[False].items():
        assert torch.equal(v, states[True][k]), k


@pytest.mark.parametrize("running,threads,free", [(2, 2, True), (1, 2, True), (3, 2, False), (2, 1, False),
                                                   (None, 2, False)])
def test_cores_are_free_when_no_other_thread_waits(running, threads, free, monkeypatch):
    monkeypatch.setattr(torch_ops, "_running", lambda: running)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch_ops._Cores().look() is free
    finally:
        torch.set_num_threads(before)


def test_running_reads_the_machine():
    n = torch_ops._running()
    assert n is None or n >= 1  # this test's own thread is running


def _orth_in_child(queue) -> None:
    W1, W2 = unit_rows(256, 32), unit_rows(256, 32)
    tiles = sample_tiles(256, 256, 0.5, torch.Generator().manual_seed(0))
    queue.put(float(torch_ops.orth_penalty(W1, W2, 0.05, tiles)))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_orth_helper_thread_works_after_fork(monkeypatch):
    """A child forked after the penalty used its helper thread starts a helper of its own
    (the parent's thread does not exist in the child: waiting on it would hang)."""
    import multiprocessing

    monkeypatch.setattr(torch_ops, "CORES", FixedCores(True))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W1, W2 = unit_rows(256, 32), unit_rows(256, 32)
        torch_ops.orth_penalty(W1, W2, 0.05, sample_tiles(256, 256, 0.5, torch.Generator().manual_seed(0)))
        assert torch_ops._helper is not None
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_orth_in_child, args=(queue,))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive and child.exitcode == 0
        assert queue.get(timeout=5) >= 0
    finally:
        torch.set_num_threads(threads)


def test_orth_penalty_with_every_pair_inside_the_margin():
    W1, W2 = unit_rows(70, 48), unit_rows(90, 48)
    ours = run_orth(torch_ops.orth_penalty, W1, W2, 0.95, None, 1.0)
    ref = run_orth(reference.orth_penalty, W1, W2, 0.95, None, 1.0)
    assert ref[0].item() == 0.0
    for a, r, name in zip(ours, ref, ("penalty", "grad W1", "grad W2")):
        check(a, r, None, name)
