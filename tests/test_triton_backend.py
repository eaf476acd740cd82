"""The triton backend trains the same model as the torch (reference) backend.

Under TRITON_INTERPRET=1 the kernels run on the CPU: the dual-layer forward and its
gradients, and five optimizer steps of the real training step (JumpReLU thresholds, L1,
a sampled subset of orthogonality tiles, decoder-norm constraints, Adam), must agree with
the reference backend to fp32 accuracy.
"""

import os

import pytest
import torch

from esosae import kernels
from esosae.backend import TORCH, BackendError, get_backend
from esosae.config import DataConfig, SAEConfig, ScheduleConfig, TrainConfig
from esosae.reference import sample_tiles
from esosae.train import build, make_source, train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
STEPS = 5


def small_config() -> TrainConfig:
    """Two layers of 128 features on a 32-wide synthetic source; every term of the loss is
    on from step 0 (no warmups), and half of the 2×2 orthogonality tiles are sampled."""
    return TrainConfig(
        data=DataConfig(source="synthetic", synthetic_d=32, synthetic_atoms=64, synthetic_l0=4, eval_tokens=256),
        sae=SAEConfig(arch="esosae", m1=128, m2=128, target_l0=4, l1_coeff=0.05, gamma_max=1.0,
                      orth_margin=0.1, orth_block_fraction=0.5),
        schedule=ScheduleConfig(schedule="const", tau_final=0.05, gamma_warmup="none", l1_warmup_fraction=0.0),
        steps=STEPS, batch_size=64, lr=1e-3, lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
        backend="triton", device=DEVICE.type)


def test_triton_backend_serves_the_kernels():
    ops = get_backend("triton", DEVICE)
    assert ops.name == "triton"
    assert (ops.encode, ops.decode, ops.orth_penalty) == (kernels.encode, kernels.decode, kernels.orth_penalty)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        get_backend("triton", torch.device("cpu"))


def test_dual_layer_forward_and_gradients_match():
    """The whole forward of DualLayerSAE (both layers, gradients through the residual r and
    the layer-2 target) plus the orthogonality term, on one set of weights."""
    cfg = small_config()
    source = make_source(cfg, DEVICE)
    model, _ = build(cfg, source, DEVICE)
    model.theta1.fill_(0.05)
    model.theta2.fill_(0.05)
    x = source.batch(0, cfg.batch_size).to(DEVICE) * model.scale
    tiles = sample_tiles(128, 128, 0.5, torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for ops in (get_backend("triton", DEVICE), TORCH):
        model.zero_grad(set_to_none=True)
        out = model(x, ops)
        loss = out["sq_err"].mean() + 0.05 * (out["l1_1"].mean() + out["l1_2"].mean())
        loss = loss + ops.orth_penalty(model.W_dec1, model.W_dec2, 0.1, tiles)
        loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out_t, grads_t), (out_r, grads_r) = results
    for key in ("x_hat", "sq_err", "f1", "f2", "l1_1", "l1_2"):
        assert_close(out_t[key], out_r[key], key)
    for key in ("fire1", "fire2"):
        assert torch.equal(out_t[key], out_r[key]), key
    assert 0 < (out_r["f1"] > 0).float().mean() < 1 and 0 < (out_r["f2"] > 0).float().mean() < 1
    assert grads_t.keys() == grads_r.keys()
    for key in grads_r:
        assert_close(grads_t[key], grads_r[key], f"grad {key}")


def test_five_training_steps_match_the_torch_backend():
    cfg = small_config()
    source = make_source(cfg, DEVICE)
    runs = {}
    for name, ops in (("triton", get_backend("triton", DEVICE)), ("torch", TORCH)):
        torch.manual_seed(cfg.seed)
        model, opt = build(cfg, source, DEVICE)
        losses = []
        for step in range(STEPS):
            x = source.batch(step, cfg.batch_size).to(DEVICE) * model.scale
            res = train_step(model, opt, ops, x, cfg, step)
            assert res["orth"] > 0 and res["gamma"] > 0  # the orthogonality term is in play
            losses.append(res["loss"].item())
        runs[name] = (losses, {k: v.clone() for k, v in model.state_dict().items()})
    (loss_t, state_t), (loss_r, state_r) = runs["triton"], runs["torch"]
    assert loss_t == pytest.approx(loss_r, rel=1e-5)
    assert loss_r[-1] < loss_r[0]
    for key in state_r:
        if state_r[key].is_floating_point():
            assert_close(state_t[key], state_r[key], key)
        else:
            assert torch.equal(state_t[key], state_r[key]), key


def assert_close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """fp32 agreement: |a − b| ≤ 1e-5 · max|b|, the accumulated rounding of fp32 sums
    taken in a different order, far below any real discrepancy."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 1e-5 * max(b.abs().max().item(), 1e-30), f"{name}: error {err}"
