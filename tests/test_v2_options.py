"""The E-SOSAE v2 options in the reference and the CPU backend: the JumpReLU straight-through
gradient against finite differences of a kernel-smoothed loss, BatchTopK, AuxK, the
orthogonality normalizations, the controller's freeze, the new logged figures, and the
config rules and the v1 preset."""

import json
from pathlib import Path

import pytest
import torch

from esosae.config import RECOVERING_CONTROLLER, V1_METHOD, ConfigError, SAEConfig, TrainConfig
from esosae.sae import reference
from esosae.sae.backend import TORCH
from esosae.sae.margins import update_margins
from esosae.sae.model import DualLayerSAE
from esosae.training.loop import COS_HIGH, count_high_cosines, grad_ratio

F64 = torch.float64
EPS = 0.05
pytestmark = pytest.mark.usefixtures("one_thread")


def smoothed_step(u: torch.Tensor) -> torch.Tensor:
    """S_ε(u) = clamp(u/ε + ½, 0, 1): the step whose derivative is the rectangle kernel /ε."""
    return (u / EPS + 0.5).clamp(0, 1)


def ste_inputs(B=64, m=40):
    """Pre-activations a with many within ε/2 of θ, none within 1e-4 of the window's edges."""
    theta = (0.5 + torch.rand(m, dtype=F64)).requires_grad_()
    a = theta.detach() + EPS * (torch.rand(B, m, dtype=F64) * 2 - 1)  # |a − θ| < ε
    edge = ((a - theta.detach()).abs() - EPS / 2).abs() < 1e-4
    a = torch.where(edge, a + 3e-4, a)
    return a, theta


def central_difference(loss, theta: torch.Tensor, h: float = 1e-7) -> torch.Tensor:
    g = torch.empty_like(theta)
    for j in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[j] = h
        g[j] = (loss(theta + e) - loss(theta - e)) / (2 * h)
    return g


def test_l0_ste_is_the_gradient_of_the_smoothed_step():
    """∂/∂θ Σ w·1[a > θ] := −(1/ε) Σ w K is exactly d/dθ Σ w·S_ε(a − θ)."""
    a, theta = ste_inputs()
    w = torch.randn(a.shape[0], 1, dtype=F64)
    (reference.Step.apply(a, theta, EPS) * w).sum().backward()
    fd = central_difference(lambda t: (smoothed_step(a - t) * w).sum(), theta.detach())
    assert fd.abs().max() > 10  # the window holds pre-activations: not a sum of zeros
    torch.testing.assert_close(theta.grad, fd, rtol=1e-6, atol=1e-6)


def test_jumprelu_ste_against_the_smoothed_jumprelu():
    """The f term's estimate −(θ/ε) Σ g K against d/dθ Σ g·a·S_ε(a − θ) = −(1/ε) Σ g·a·K: in the
    window |a − θ| < ε/2, so they differ by at most ½ Σ |g|·K per feature (and the estimate
    itself is θ/ε ≈ 20× larger than that bound)."""
    a, theta = ste_inputs()
    g = torch.randn_like(a)
    (reference.JumpReLU.apply(a, theta, EPS) * g).sum().backward()
    fd = central_difference(lambda t: (g * a * smoothed_step(a - t)).sum(), theta.detach())
    inside = ((a - theta.detach()).abs() < EPS / 2).to(F64)
    bound = 0.5 * (g.abs() * inside).sum(0)
    assert ((theta.grad - fd).abs() <= bound + 1e-6).all()
    assert (theta.grad.abs() > 4 * bound).float().mean() > 0.5


def test_encode_learned_forward_and_a_gradient_are_encode():
    """Same f, L1 and fire counts as ``encode``; a's gradient is the mask's; the torch backend is the reference."""
    x, W, b, bd = torch.randn(16, 8, dtype=F64), torch.randn(8, 24, dtype=F64), torch.randn(24, dtype=F64), \
        torch.randn(8, dtype=F64)
    theta = torch.rand(24, dtype=F64)
    W1, W2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    f, row, fire = TORCH.encode_learned(x, W1, b, bd, theta.requires_grad_(), EPS, False)
    f2, row2, fire2 = reference.encode(x, W2, b, bd, theta)
    assert torch.equal(f, f2) and torch.equal(row, row2) and torch.equal(fire, fire2)
    (f.sum() + row.sum()).backward()
    (f2.sum() + row2.sum()).backward()
    assert torch.equal(W1.grad, W2.grad)
    _, row0, _ = TORCH.encode_learned(x, W, b, bd, theta, EPS, True)
    assert torch.equal(row0, (f2 > 0).sum(1).to(F64))


def test_batchtopk_keeps_batch_times_k():
    x, W = torch.randn(32, 16), torch.randn(16, 64)
    f, row, fire = reference.batchtopk_encode(x, W, torch.zeros(64), torch.zeros(16), 3)
    a = torch.relu(x @ W)
    assert (f > 0).sum() == 96 and fire.sum() == 96
    kept = f[f > 0]
    assert kept.min() >= a[(f == 0)].max() and torch.equal(f[f > 0], a[f > 0])
    assert (f > 0).sum(1).float().std() > 0  # rows differ: it is not a per-row TopK
    torch.testing.assert_close(row, f.sum(1))


def test_auxk_loss():
    e = torch.randn(8, 6, dtype=F64)
    assert reference.auxk_loss(e, torch.zeros(8, 0, dtype=F64), torch.zeros(0, 6, dtype=F64), 4) == 0
    a = torch.randn(8, 5, dtype=F64)
    W = torch.randn(5, 6, dtype=F64)
    vals, idx = torch.relu(a).topk(2, dim=1)
    e_hat = torch.zeros_like(a).scatter(1, idx, vals) @ W
    expect = (e - e_hat).square().sum(1).mean() / e.square().sum(1).mean()
    torch.testing.assert_close(reference.auxk_loss(e, a, W, 2), expect)


def sae(**kw):
    cfg = TrainConfig.from_dict({"data": {"source": "synthetic", "synthetic": "easy"}, "sae": {"m1": 32, **kw}}).sae
    model = DualLayerSAE(cfg, 8)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_auxk_trains_only_dead_features():
    model = sae(aux_k=4, aux_dead_tokens=10)
    model.since_fire1[:5] = 10  # dead
    model.since_fire2[3] = 50
    out = model(torch.randn(16, 8))
    out["aux"].backward()
    assert out["aux"] > 0
    assert (model.W_dec1.grad[5:] == 0).all() and (model.W_dec1.grad[:5] != 0).any()
    assert (model.W_enc2.grad[:, 3] != 0).any() and (model.W_enc2.grad[:, :3] == 0).all()
    model.eval()
    assert "aux" not in model(torch.randn(4, 8))


def test_learned_margins_are_parameters_with_gradients():
    model = sae(margins="learned", sparsity="l0")
    model.taus = (0.1, 0.1)
    out = model(torch.randn(64, 8))
    (out["sq_err"].mean() + out["l1_1"].mean()).backward()
    assert isinstance(model.mu1, torch.nn.Parameter) and model.mu1.grad.abs().sum() > 0
    assert "mu1" in model.state_dict()


def test_orth_rows_normalization():
    W1, W2 = torch.randn(5, 7, dtype=F64), torch.randn(3, 7, dtype=F64)
    rows = reference.orth_scale("rows", 5, 3) * reference.orth_penalty(W1, W2, 0.1)
    c = W1 @ W2.T
    torch.testing.assert_close(rows, torch.relu(c.abs() - 0.1).square().sum() / 5)
    assert reference.orth_scale("pairs", 5, 3) == 1.0


def test_logged_figures():
    model = sae()
    with torch.no_grad():
        model.W_dec2[:3] = model.W_dec1[:3]  # three exact duplicates
    dense = ((model.W_dec1 @ model.W_dec2.T).abs() > COS_HIGH).sum().item()
    assert dense >= 3 and count_high_cosines(model, chunk=5) == dense
    out = model(torch.randn(32, 8))
    pen = 2.0 * reference.orth_penalty(model.W_dec1, model.W_dec2, 0.1)
    mse = out["sq_err"].mean()
    gp = torch.autograd.grad(pen, (model.W_dec1, model.W_dec2), retain_graph=True)
    gm = torch.autograd.grad(mse, (model.W_dec1, model.W_dec2), retain_graph=True)

    def norm(gs):
        return sum(g.square().sum() for g in gs).sqrt().item()

    assert grad_ratio(pen, mse, (model.W_dec1, model.W_dec2)) == pytest.approx(norm(gp) / norm(gm), rel=1e-5)


def test_controller_waits_for_margin_freeze():
    cfg = SAEConfig(m1=100, m2=0, target_l0=10, l1_coeff=0.1, margin_freeze=0.3, margin_band=3.0)
    freq = torch.full((100,), 0.9)
    mu = torch.ones(100)
    assert torch.equal(update_margins(mu, freq, cfg, 0.29), mu)
    assert (update_margins(mu, freq, cfg, 0.3) > 1).all()


def test_config_rules():
    with pytest.raises(ConfigError, match="sparsity=l0"):
        SAEConfig(sparsity="l0")
    assert SAEConfig(arch="jumprelu", sparsity="l0", m2=0).learned_thresholds
    cfg = TrainConfig.from_dict({"sae": {"arch": "jumprelu"}})
    assert cfg.sae.sparsity == "l0" and cfg.sae.m2 == 0
    assert TrainConfig().sae.sparsity == "l1"
    with pytest.raises(ConfigError, match="k=9999"):
        TrainConfig.from_dict({"sae": {"arch": "batchtopk", "k": 9999}})


@pytest.mark.parametrize("name, fields", [("esosae-v1", V1_METHOD), ("esosae-v2-controller", RECOVERING_CONTROLLER)])
def test_presets(name, fields):
    """Each preset pins its controller; the v2 one is today's default (METHOD.md §9)."""
    path = Path(__file__).parents[1] / "presets" / f"{name}.json"
    preset = TrainConfig.from_json(path)
    assert {k: getattr(preset.sae, k) for k in fields} == fields
    assert json.loads(path.read_text())["sae"]["arch"] == "esosae"
    today = SAEConfig()
    assert all(getattr(today, k) == v for k, v in RECOVERING_CONTROLLER.items())
    assert all(getattr(today, k) != v for k, v in V1_METHOD.items())


def test_batchtopk_inference_threshold():
    """The loop keeps θ at the moving average of each batch's smallest kept activation; at
    inference the model is a JumpReLU with that one θ."""
    from esosae.training.loop import BATCHTOPK_EMA, update_feature_stats

    cfg = TrainConfig.from_dict({"data": {"source": "synthetic", "synthetic": "easy"},
                                 "sae": {"arch": "batchtopk", "m1": 32, "k": 3}, "batch_size": 16})
    model = DualLayerSAE(cfg.sae, 8)
    model.init_weights(torch.Generator().manual_seed(0))
    mins = []
    for step in range(2):
        out = model(torch.randn(16, 8))
        assert (out["f1"] > 0).sum() == 48
        mins.append(out["f1"][out["f1"] > 0].min().item())
        update_feature_stats(model, out, cfg, step, 16)
    expect = BATCHTOPK_EMA * mins[0] + (1 - BATCHTOPK_EMA) * mins[1]
    assert torch.allclose(model.theta1, torch.full((32,), expect))
    model.eval()
    x = torch.randn(16, 8)
    f = model(x)["f1"]
    ref, _, _ = reference.encode(x, model.W_enc1, model.b_enc1, model.b_dec, model.theta1)
    assert torch.equal(f, ref) and (f > 0).sum() != 48
