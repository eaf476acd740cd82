"""The reference itself: gradients, the Gram identity, the unbiased tile estimate."""

import pytest
import torch

from esosae.sae import reference as ref


def params(d=12, m1=20, m2=16, dtype=torch.float64):
    g = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    unit = lambda w: w / w.norm(dim=1, keepdim=True)  # noqa: E731
    return {"W_enc1": g(d, m1) * 0.3, "b_enc1": g(m1) * 0.1, "W_dec1": unit(g(m1, d)), "b_dec": g(d) * 0.1,
            "W_enc2": g(d, m2) * 0.3, "b_enc2": g(m2) * 0.1, "W_dec2": unit(g(m2, d))}


def test_encode_matches_formula():
    p = params()
    x = torch.randn(9, 12, dtype=torch.float64)
    theta = torch.rand(20, dtype=torch.float64) * 0.5
    f, row_l1, fire = ref.encode(x, p["W_enc1"], p["b_enc1"], p["b_dec"], theta)
    a = (x - p["b_dec"]) @ p["W_enc1"] + p["b_enc1"]
    assert torch.equal(f, torch.where(a > theta, a, torch.zeros_like(a)))
    assert torch.allclose(row_l1, f.sum(1)) and torch.equal(fire, (a > theta).sum(0).int())
    assert (f >= 0).all()


def test_gradcheck_loss_away_from_jumps():
    d, m1, m2 = 6, 10, 8
    p = {k: v.requires_grad_() for k, v in params(d, m1, m2).items()}
    x = torch.randn(5, d, dtype=torch.float64)
    theta1 = torch.full((m1,), 0.05, dtype=torch.float64)
    theta2 = torch.full((m2,), 0.05, dtype=torch.float64)
    with torch.no_grad():  # finite differences (eps 1e-7) must never cross a jump of either layer
        a1 = (x - p["b_dec"]) @ p["W_enc1"] + p["b_enc1"]
        out = ref.sae_forward(x, p, theta1, theta2)
        a2 = (x - out["x_hat"] + out["f2"] @ p["W_dec2"]) @ p["W_enc2"] + p["b_enc2"]
    assert ((a1 - 0.05).abs() > 1e-4).all() and ((a2 - 0.05).abs() > 1e-4).all()
    assert (out["f1"] > 0).any() and (out["f2"] > 0).any()

    def loss(*vals):
        q = dict(zip(p, vals))
        return ref.sae_loss(x, q, theta1, theta2, lambda1=0.3, lambda2=0.2, gamma=0.7, margin=0.05)

    assert torch.autograd.gradcheck(loss, tuple(p.values()), eps=1e-7, atol=1e-6)


def test_orth_gram_identity_and_margin():
    W1, W2 = torch.randn(70, 9, dtype=torch.float64), torch.randn(50, 9, dtype=torch.float64)
    assert ref.orth_penalty(W1, W2, 0.0).item() == pytest.approx(ref.orth_penalty_gram(W1, W2).item(), rel=1e-12)
    assert ref.orth_penalty(W1, W2, 0.3) < ref.orth_penalty(W1, W2, 0.0)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    assert ref.orth_penalty(q[:4], q[4:], 0.0).item() == pytest.approx(0.0, abs=1e-20)


def test_tile_subset_is_unbiased():
    W1, W2 = torch.randn(200, 8, dtype=torch.float64), torch.randn(150, 8, dtype=torch.float64)
    exact = ref.orth_penalty(W1, W2, 0.1).item()
    g = torch.Generator().manual_seed(1)
    assert ref.sample_tiles(200, 150, 1.0, g) is None
    draws = []
    for _ in range(400):
        tiles = ref.sample_tiles(200, 150, 0.25, g)
        assert tiles.shape == (3, 2)  # ceil(0.25 · 4·3)
        draws.append(ref.orth_penalty(W1, W2, 0.1, tiles).item())
    mean = sum(draws) / len(draws)
    spread = torch.tensor(draws).std().item() / len(draws) ** 0.5
    assert abs(mean - exact) < 4 * spread
    assert spread > 0  # the subset really varies
