"""The kernels compiled on a CUDA device at mid shapes, against the float64 reference.

The interpreter tests (test_kernel_encoder.py, …) stay within one or two tiles per launch.
Here B = 300 and 257 (no tile multiples), d = 576 and m = 1,152 make multi-tile grids,
the grouped launch order, reduction loops of many K steps and ragged edges run compiled,
and the orthogonality penalty runs over 18 × 18 tiles of 64, exact and sampled at the
trainer's default fraction, with margins that leave some tiles active and others skipped.

Each test compares the output and every gradient with the float64 reference
(esosae/sae/reference.py), by precision:
- fp32 (ieee products): tight, tests/helpers.py's FP32_TOL of the largest reference value;
- bf16, fp16, and tf32 (fp32 operands with torch.set_float32_matmul_precision("high"), set
  inside the test and restored): STYLE.md's 2× rule, the kernel's error against float64 at
  most twice the error of the reference run in that precision (bf16 or fp16 operands, or
  fp32 under the same matmul setting), plus a floor of one unit roundoff of the largest
  reference value, for the few quantities that torch's path happens to get (nearly) exact.

Inputs and runners are the interpreter tests' own (make_inputs, run), imported, not copied.
Skipped without CUDA and under TRITON_INTERPRET=1, so the CPU suite skips it;
bench/gpu_check.sh runs it with the other kernel tests, compiled.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest
import test_kernel_decoder as dec
import test_kernel_encoder as enc
import test_kernel_orthogonality as orth
import torch
from helpers import assert_matches

from esosae.sae import reference
from esosae.config import SAEConfig, TrainConfig
from esosae.kernels import decode, encode, orth_penalty


def _why_skipped() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("compiled kernels only: TRITON_INTERPRET=1 runs them in the CPU interpreter, which the other "
                "test_kernel_*.py files cover; bench/gpu_check.sh runs this file on a GPU")
    if not torch.cuda.is_available():
        return "needs a CUDA device (bench/gpu_check.sh runs this file on one)"
    return None


pytestmark = [pytest.mark.skipif(_why_skipped() is not None, reason=_why_skipped() or ""),
              pytest.mark.usefixtures("poisoned")]

F64 = torch.float64
D, M = 576, 1152  # the default run's d and m per layer
BATCHES = [300, 257]
PRECISIONS = {  # name: (operand dtype, torch's float32 matmul precision while the test runs)
    "fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest")}




@contextlib.contextmanager
def precision(name: str) -> Iterator[torch.dtype]:
    """The operand dtype of ``name``, with torch's fp32 matmul precision set for it (restored after)."""
    dtype, setting = PRECISIONS[name]
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield dtype
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("mode", ["jump", "relu"])
@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("B", BATCHES)
def test_encode_compiled_mid_shape(B, name, mode):
    with precision(name) as dtype:
        inp = enc.make_inputs(B, D, M, dtype, mode)
        out = enc.run(encode, inp, dtype)
        ref, low = enc.run(reference.encode, inp, F64), enc.run(reference.encode, inp, dtype)
    assert out["f"].dtype == dtype and all(out[f"grad_{k}"].dtype == dtype for k in enc.INPUTS)
    assert_matches(out, ref, low, name)
    assert 0 < (ref["f"] != 0).sum() < B * M


@pytest.mark.parametrize("density", [0.03, 1.0])
@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("B", BATCHES)
def test_decode_compiled_mid_shape(B, name, density):
    with precision(name) as dtype:
        inp = dec.make_inputs(B, D, M, dtype, density)
        out = dec.run(decode, inp, dtype)
        ref, low = dec.run(reference.decode, inp, F64), dec.run(reference.decode, inp, dtype)
    assert out["x_hat"].dtype == dtype and all(out[f"grad_{k}"].dtype == dtype for k in dec.INPUTS)
    assert_matches(out, ref, low, name)


def default_tiles() -> torch.Tensor:
    """The trainer's tile sample at m1 = m2 = M: esosae.sae.reference.sample_tiles at the default
    fraction min(1, B / (3·m2)) of the default batch (0.30 of the 18 × 18 tiles)."""
    cfg = TrainConfig(sae=SAEConfig(m1=M, m2=M))
    tiles = reference.sample_tiles(M, M, cfg.orth_block_fraction, torch.Generator().manual_seed(12))
    assert tiles is not None
    return tiles.to(orth.DEVICE)


def tile_max_cosines(W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """(n1, n2): the largest |cos| in each tile of W1 W2ᵀ, in float64."""
    n1, n2 = reference.tile_grid(M, M)
    t = reference.ORTH_TILE
    return (W1.double() @ W2.double().T).abs().reshape(n1, t, n2, t).amax(dim=(1, 3))


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("margin", ["zero", "half_the_tiles"])
@pytest.mark.parametrize("name", PRECISIONS)
def test_orth_penalty_compiled_mid_shape(name, margin, sampled):
    """ρ = 0 (every pair counts) and ρ = the median of the tiles' largest |cos|, which leaves
    about half of the tiles with pairs beyond the margin and lets the others skip their
    gradient products."""
    with precision(name) as dtype:
        W1, W2 = orth.unit_rows(M, D).to(dtype), orth.unit_rows(M, D).to(dtype)
        peaks = tile_max_cosines(W1, W2)
        rho = 0.0 if margin == "zero" else peaks.median().item()
        tiles = default_tiles() if sampled else None
        out = orth.run(orth_penalty, W1, W2, rho, tiles, dtype)
        ref = orth.run(reference.orth_penalty, W1, W2, rho, tiles, F64)
        low = orth.run(reference.orth_penalty, W1, W2, rho, tiles, dtype)
    if tiles is not None:
        peaks = peaks[tiles[:, 0].long(), tiles[:, 1].long()]
    active = (peaks > rho).sum().item()
    assert (0 < active < peaks.numel()) if margin == "half_the_tiles" else (active == peaks.numel())
    assert out["loss"].dtype == torch.float32 and out["grad_W1"].dtype == out["grad_W2"].dtype == dtype
    assert ref["loss"] > 0
    assert_matches(out, ref, low, name)


@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_training_step_never_syncs_host_and_device(dtype):
    """The trainer's step on the dense kernels (thresholds, forward, loss, backward, clip,
    Adam, constraints, firing statistics, the sampled orthogonality tiles) issues no
    host-device synchronization: CUDA's sync debug mode turns any into an error. Logging
    steps sync on purpose and are not run here; so does the pair path (the fire count that picks
    it and nonzero's count that sizes the pairs, per layer), which ``pairs_max_density = 0`` turns off."""
    from esosae.sae.backend import get_backend
    from esosae.config import DataConfig, ScheduleConfig
    from esosae.training.loop import build, make_source, train_step

    cfg = TrainConfig(data=DataConfig(source="synthetic", synthetic_d=64, synthetic_atoms=256, synthetic_l0=4,
                                      eval_tokens=256),
                      sae=SAEConfig(m1=256, m2=256, target_l0=4, orth_block_fraction=0.5),
                      schedule=ScheduleConfig(gamma_warmup="none"), steps=20, batch_size=512, dtype=dtype,
                      backend="triton", device="cuda", pairs_max_density=0.0)
    device = torch.device("cuda")
    source = make_source(cfg, device)
    model, opt = build(cfg, source, device)
    ops = get_backend("triton", device, cfg.pairs_max_density)
    batches = [source.batch(step, cfg.batch_size).to(device) * model.scale for step in range(3)]
    train_step(model, opt, ops, batches[0], cfg, 10)  # first call: compiles and initializes Adam's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, x in enumerate(batches[1:], start=11):
            res = train_step(model, opt, ops, x, cfg, step)
            assert res["gamma"] > 0  # the orthogonality term with its tile copy is in the step
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["fp32", "bf16"])
@pytest.mark.parametrize("B", BATCHES)
def test_pair_path_compiled_mid_shape(B, name):
    """The encoder → decoder chain on the pair path (tests/test_kernel_pairs.py's inputs and
    runner) at the default run's d and m, against the float64 reference, and bit-identical
    when run twice: the pair kernels reduce in a fixed order, without atomics."""
    import test_kernel_pairs as pairs

    with precision(name) as dtype:
        inp = pairs.chain_inputs(B, D, M, dtype, "jump")
        out, f = pairs.run(*pairs.pair_ops(), inp, dtype)
        again, _ = pairs.run(*pairs.pair_ops(), inp, dtype)
        ref, _ = pairs.run(reference.encode, reference.decode, inp, F64)
        low, _ = pairs.run(reference.encode, reference.decode, inp, dtype)
    assert pairs.attached(f) is not None
    assert_matches(out, ref, low, name)
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_orth_backward_compiled_is_bit_identical_across_runs():
    """Sampled tiles, bf16: two backward passes give the same bits (no atomics)."""
    with precision("bf16") as dtype:
        W1, W2 = orth.unit_rows(M, D).to(dtype), orth.unit_rows(M, D).to(dtype)
        first, second = (orth.run(orth_penalty, W1, W2, 0.0, default_tiles(), dtype) for _ in range(2))
    assert torch.equal(first["grad_W1"], second["grad_W1"]) and torch.equal(first["grad_W2"], second["grad_W2"])
