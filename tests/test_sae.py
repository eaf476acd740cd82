"""DualLayerSAE: matches the reference oracle, keeps decoder rows unit norm, saves raw-space weights."""

import pytest
import torch

from esosae.sae import reference as ref
from esosae.config import SAEConfig, TrainConfig
from esosae.sae.model import DualLayerSAE, SAELoadError


def make(arch="esosae", m1=24, m2=16, d=10, scale=1.0, **kw):
    cfg = TrainConfig(sae=SAEConfig(arch=arch, m1=m1, m2=m2, target_l0=3, **kw)).sae
    model = DualLayerSAE(cfg, d, scale=scale)
    model.init_weights(torch.Generator().manual_seed(1), torch.randn(32, d))
    with torch.no_grad():
        model.b_enc1.normal_(0, 0.1)
        model.b_enc2.normal_(0, 0.1)
        model.theta1.uniform_(0, 0.3)
        model.theta2.uniform_(0, 0.3)
    return model


@pytest.mark.parametrize("m2", [16, 0])
def test_forward_matches_reference(m2):
    model = make(m2=m2).double()
    x = torch.randn(13, 10, dtype=torch.float64)
    out = model(x)
    params = {k: v for k, v in model.named_parameters()}
    want = ref.sae_forward(x, params, model.theta1, model.theta2)
    assert torch.allclose(out["x_hat"], want["x_hat"], atol=1e-12)
    assert torch.allclose(out["sq_err"], (x - want["x_hat"]).square().sum(1), atol=1e-10)
    assert torch.equal(out["f1"], want["f1"])
    if m2:
        assert torch.equal(out["f2"], want["f2"])


@pytest.mark.parametrize("arch,m2", [("esosae", 16), ("esosae", 0), ("relu", 0), ("topk", 0), ("batchtopk", 0),
                                     ("jumprelu", 0)])
def test_features_are_the_forward_codes_without_the_last_decode(arch, m2):
    model = make(arch=arch, m2=m2, k=4).double().eval()  # BatchTopK's inference threshold in eval mode
    x = torch.randn(13, 10, dtype=torch.float64)
    out = model(x)
    want = torch.cat([out["f1"]] + ([out["f2"]] if m2 else []), dim=1)  # (13, m1 + m2)
    got = model.features(x)
    assert got.shape == (13, 24 + m2) and torch.equal(got, want) and (got > 0).any()


def test_topk_keeps_k_per_row():
    model = make(arch="topk", m2=0, k=5)
    out = model(torch.randn(20, 10))
    assert ((out["f1"] > 0).sum(1) <= 5).all() and ((out["f1"] > 0).sum(1) >= 1).any()


def test_decoder_constraint():
    model = make()
    loss = model(torch.randn(8, 10))["sq_err"].mean()
    loss.backward()
    model.remove_parallel_grads()
    for W in (model.W_dec1, model.W_dec2):
        assert (W.grad * W).sum(1).abs().max() < 1e-6
        with torch.no_grad():
            W.add_(torch.randn_like(W))
    model.normalize_decoder()
    for W in (model.W_dec1, model.W_dec2):
        assert torch.allclose(W.norm(dim=1), torch.ones(W.shape[0]), atol=1e-6)


def test_save_folds_scale_so_raw_inputs_work(tmp_path):
    s = 3.7
    model = make(scale=s)
    x_raw = torch.randn(9, 10) * 5
    out = model(x_raw * s)
    model.save(tmp_path / "sae", {"note": "x"})
    loaded = DualLayerSAE.load(tmp_path / "sae")
    assert loaded.scale == 1.0 and loaded.trained_scale == pytest.approx(s)
    got = loaded(x_raw)
    assert torch.allclose(got["f1"], out["f1"], atol=1e-4) and torch.allclose(got["f2"], out["f2"], atol=1e-4)
    assert torch.allclose(got["x_hat"], out["x_hat"] / s, atol=1e-4)
    assert torch.equal(loaded.theta1, model.theta1) and torch.equal(loaded.mu2, model.mu2)


def test_load_errors(tmp_path):
    with pytest.raises(SAELoadError, match="no saved SAE"):
        DualLayerSAE.load(tmp_path / "nothing")
    make().save(tmp_path / "sae")
    (tmp_path / "sae" / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAELoadError, match="corrupt"):
        DualLayerSAE.load(tmp_path / "sae")
