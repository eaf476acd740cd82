"""The triton backend trains the same model as the torch (reference) backend.

Under TRITON_INTERPRET=1 the kernels run on the CPU: the dual-layer forward and its
gradients, and five optimizer steps of the real training step (JumpReLU thresholds, L1,
a sampled subset of orthogonality tiles, decoder-norm constraints, Adam), must agree with
the reference backend to fp32 accuracy.
"""

import dataclasses
import functools

import pytest
import torch
from helpers import DEVICE, assert_close

from esosae import kernels
from esosae.kernels import sparse
from esosae.sae import backend
from esosae.sae.backend import TORCH, BackendError, get_backend
from esosae.config import DataConfig, SAEConfig, ScheduleConfig, TrainConfig
from esosae.sae.reference import sample_tiles
from esosae.training.loop import build, make_source, train_step

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
    assert (ops.encode, ops.decode, ops.orth_penalty) == (sparse.encode, sparse.decode, kernels.orth_penalty)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        get_backend("triton", torch.device("cpu"))


@pytest.fixture(params=["dense", "pairs"])
def path(request, monkeypatch):
    """Both paths of the Triton backend: dense kernels throughout, or active pairs after
    every encoder (the crossover density moved to 0 or 1)."""
    monkeypatch.setattr(kernels.pairs, "PAIRS_MAX_DENSITY", 0.0 if request.param == "dense" else 1.0)
    return request.param


def test_dual_layer_forward_and_gradients_match(path):
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
        if ops.name == "triton":
            assert backend.path(out["f1"]) == backend.path(out["f2"]) == path
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


@pytest.mark.parametrize("path", ["dense", pytest.param("pairs", marks=pytest.mark.slow)], indirect=True)
def test_five_training_steps_match_the_torch_backend(path):
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


MIXED_STEPS = 20
MIXED_TOL = 0.01
"""bf16 rounds each operand to 8 significant bits (relative error ≤ 2⁻⁹ ≈ 0.2%), fp16 to 11;
with fp32 accumulation the loss of one step moves by about that, and 20 steps of Adam on the
same batches keep the two curves within 1% of each other (measured: bf16 0.23%, fp16 0.05%
at most, while the loss itself falls more than fourfold)."""


@functools.cache
def loss_curve(dtype: str) -> tuple[list[float], dict[str, torch.dtype]]:
    """Losses of MIXED_STEPS training steps at ``dtype``, and the dtypes of every parameter,
    gradient and Adam state at the end."""
    cfg = dataclasses.replace(small_config(), steps=MIXED_STEPS, dtype=dtype)
    source = make_source(cfg, DEVICE)
    ops = get_backend("triton", DEVICE)
    torch.manual_seed(cfg.seed)
    model, opt = build(cfg, source, DEVICE)
    losses = []
    for step in range(MIXED_STEPS):
        x = source.batch(step, cfg.batch_size).to(DEVICE) * model.scale
        losses.append(train_step(model, opt, ops, x, cfg, step)["loss"].item())
    dtypes = {f"param {k}": p.dtype for k, p in model.named_parameters()}
    dtypes.update({f"grad {k}": p.grad.dtype for k, p in model.named_parameters() if p.grad is not None})
    dtypes.update({f"adam {k}": v.dtype for i, st in enumerate(opt.state.values()) for k, v in st.items()
                   if torch.is_tensor(v) and v.is_floating_point()})
    dtypes.update({f"buffer {k}": b.dtype for k, b in model.named_buffers() if b.is_floating_point()})
    return losses, dtypes


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_tracks_fp32(dtype):
    """16-bit operands for every kernel product, fp32 master weights: the loss curve stays
    within MIXED_TOL of the fp32 run's at every step, and every parameter, gradient, Adam
    state and buffer (θ, μ, firing statistics) stays fp32."""
    low, dtypes = loss_curve(dtype)
    ref, _ = loss_curve("fp32")
    assert ref[-1] < ref[0] / 4  # the curve being tracked really moves
    worst = max(abs(a - b) / b for a, b in zip(low, ref))
    assert worst <= MIXED_TOL, f"{dtype} loss departs from fp32 by {worst:.2%}"
    assert low != ref  # the 16-bit path really ran
    assert all(t == torch.float32 for t in dtypes.values()), {k: t for k, t in dtypes.items() if t != torch.float32}
