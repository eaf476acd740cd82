"""Times, checks and inspects the Triton kernels on one CUDA device (step 2 of bench/gpu_check.sh).

Cases, at two shapes, large (d = 2,304, m = 16,384 per layer, B = 4,096) and the default
run's (d = 576, m = 1,152, B = 1,024), each in two precisions through esosae.sae.precision:
bf16 (bf16 operands) and tf32 (fp32 operands under torch.set_float32_matmul_precision("high")):

    encoder fwd, fwd+bwd    (B, d) @ (d, m) + JumpReLU epilogue; grads of x, W_enc, b_enc, b_dec
    decoder fwd, fwd+bwd    (B, m) @ (m, d) + squared error; grads of f, W_dec, bias, target
    orth fwd, fwd+bwd       every 64² tile of W_dec1 W_dec2ᵀ (m × m over d) at ρ = 0: nothing skipped
    orth sampled fwd+bwd    the trainer's tiles (its default fraction min(1, B/(3m))) at ρ = 0.1
    train step              esosae.training.loop.train_step, dual layer m + m, TrainConfig.dtype = the precision
    pairs vs dense          large shape only: the encoder → decoder chain fwd+bwd at L0 8, 32, 128 per
                            row and at the crossover density, on the pair path (``ours``) and on the
                            dense kernels (``ours-dense``)

Providers: ``ours`` (esosae.kernels, the triton backend), ``eager`` (esosae.sae.reference, the
float64 oracle's code run in the case's precision), ``compile`` and ``max-autotune``
(torch.compile of the reference, default mode and mode="max-autotune"), and for the step
``saelens`` (SAELens's StandardTrainingSAE step at d_sae = 2m, under autocast for bf16) when
sae_lens imports. Inputs and runners are the kernel tests' own (tests/test_kernel_*.py).

Each row: median ms with 20/80 quantiles (triton.testing.do_bench), the first call's seconds
(compilation included), TFLOP/s of the dense-equivalent work, that rate as a % of a cuBLAS
GEMM (torch.matmul) of the case's main product in its precision, measured in the same run,
and the peak memory one call allocates beyond what was allocated before it. Also:

- checks: ours against the float64 reference at the benchmark shapes, outputs and every
  gradient: max abs and relative error, passing within 2× the error of the reference run in
  that precision plus one unit roundoff of the largest value (tests/helpers.py's rule);
- determinism: ours run twice on the same inputs, outputs and gradients compared bit for bit
  (the step: loss, weights and gradients after one step from the same state);
- registers, spills and shared memory of every compiled kernel variant (the CompiledKernel
  objects in each @triton.jit function's device_caches);
- the issue's targets evaluated on the bf16 rows of the large shape.

Order, so that the time budget (--budget-s) drops the least important: first ours, eager,
cuBLAS, checks, determinism, kernels and SAELens for every case; then torch.compile default
and max-autotune, bf16 large shape first. A case whose estimated time (its provider's
longest so far, or a prior) would pass the budget is skipped with a note. The JSON and the
markdown (bench/results/gpu_check_<device>_<date>.json/.md) are rewritten after every case,
so a run that is killed keeps what it measured. Exit status 1 if one of our cases raised or a
check failed (another provider's error is reported, not failed).

--dry-run: tiny shapes on the CPU under TRITON_INTERPRET=1, wall-clock timing, and both
compile providers as torch.compile(backend="eager") (graph capture, no code generation):
it checks the script, never the speed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

STARTED = time.perf_counter()  # the budget counts from here, torch's import included

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"  # the kernel tests' inputs and runners, imported lazily (after TRITON_INTERPRET is set)

PRECISIONS = ("bf16", "tf32")
F64 = torch.float64


@dataclass(frozen=True)
class Shape:
    B: int
    d: int
    m: int  # per layer

    @property
    def name(self) -> str:
        return f"d={self.d} m={self.m} B={self.B}"


GPU_SHAPES = (Shape(4096, 2304, 16384), Shape(1024, 576, 1152))
DRY_SHAPES = (Shape(32, 32, 128), Shape(21, 16, 128))  # 2 × 2 orthogonality tiles, one of them sampled
ORTH_MARGIN = 0.1  # ρ of the sampled case (the trainer's default)
PRIOR_S = {"ours": 15.0, "ours-dense": 15.0, "eager": 15.0, "checks": 20.0, "saelens": 20.0, "compile": 45.0, "max-autotune": 120.0}
"""Seconds a case of each kind is assumed to take until one has been measured (GPU runs)."""
DENSE_OPS = ("encoder fwd", "encoder fwd+bwd", "decoder fwd", "decoder fwd+bwd", "orth fwd", "orth fwd+bwd")


@dataclass
class Case:
    """One timed operation at one shape and precision."""

    op: str
    shape: Shape
    precision: str
    flops: float  # dense-equivalent FLOPs of one call
    gemm: tuple[int, int, int]  # (M, N, K) of its main product: the cuBLAS yardstick
    thunk: Callable[[Any], Callable[[], Any]]  # provider -> the timed call
    outputs: Callable[[Any, torch.dtype], dict[str, Any]] | None = None  # (provider, dtype) -> tensors

    @property
    def name(self) -> str:
        return f"{self.op} {self.shape.name} {self.precision}"


# -- time, memory, budget --------------------------------------------------------------------


class Bench:
    """Timing, memory, the cuBLAS yardstick and the budget on one device; results collect here."""

    def __init__(self, device: torch.device, budget_s: float, priors: dict[str, float]):
        self.device, self.budget_s, self.priors = device, budget_s, priors
        self.t0 = STARTED
        self.spent: dict[str, float] = {}  # longest case so far, per kind
        self.rows: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.determinism: list[dict[str, Any]] = []
        self.kernels: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.cublas: dict[str, float] = {}  # key -> TFLOP/s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any]) -> tuple[float, float, float]:
        """(median, q20, q80) in ms: CUDA events via do_bench, or the wall clock on the CPU."""
        if self.device.type == "cuda":
            import triton.testing

            q20, med, q80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
            return med, q20, q80
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        q = statistics.quantiles(times, n=10, method="inclusive")
        return statistics.median(times), q[1], q[7]

    def peak_mib(self, fn: Callable[[], Any]) -> float | None:
        """Peak memory allocated by one call beyond what was allocated before it (CUDA only)."""
        if self.device.type != "cuda":
            return None
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def cublas_rate(self, M: int, N: int, K: int, precision: str) -> tuple[str, float]:
        """TFLOP/s of torch.matmul (cuBLAS on a GPU) for (M, K) @ (K, N) in ``precision``."""
        from esosae.sae.precision import matmul_precision, operand_dtype

        key = f"{M}x{K}@{K}x{N} {precision}"
        if key not in self.cublas:
            with matmul_precision(precision):
                dtype = operand_dtype(precision)
                a = torch.randn(M, K, device=self.device).to(dtype)
                b = torch.randn(K, N, device=self.device).to(dtype)
                a @ b  # warm-up (cuBLAS picks its algorithm)
                ms, _, _ = self.time_ms(lambda: a @ b)
            self.cublas[key] = 2 * M * N * K / ms / 1e9
        return key, self.cublas[key]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def skip_reason(self, kind: str) -> str | None:
        """Why a case of ``kind`` must be skipped now (None: it fits the budget)."""
        left = self.budget_s - self.elapsed()
        estimate = self.spent.get(kind, self.priors.get(kind, 0.0))
        if left - estimate > 0:
            return None
        return f"time budget: {max(left, 0):.0f} s of {self.budget_s:.0f} s left, a {kind} case takes ~{estimate:.0f} s"

    def took(self, kind: str, seconds: float) -> None:
        self.spent[kind] = max(seconds, self.spent.get(kind, 0.0))


def record(bench: Bench, case: Case, provider: str, ops: Any) -> dict[str, Any]:
    """Time ``case`` for one provider and append its row (a skip or an error is a row too)."""
    row: dict[str, Any] = {"case": case.name, "op": case.op, "shape": case.shape.name, "precision": case.precision,
                           "provider": provider}
    reason = bench.skip_reason(provider)
    if reason:
        bench.rows.append({**row, "skipped": reason})
        return bench.rows[-1]
    from esosae.sae.precision import matmul_precision

    start = time.perf_counter()
    try:
        with matmul_precision(case.precision):
            fn = case.thunk(ops)
            first = time.perf_counter()
            result = fn()  # warm-up: compiles whatever this provider compiles
            bench.sync()
            row["first_call_s"] = time.perf_counter() - first
            if isinstance(result, dict) and torch.is_tensor(result.get("loss")):
                row["loss"] = result["loss"].item()
            del result
            ms, q20, q80 = bench.time_ms(fn)
            row["peak_mib"] = bench.peak_mib(fn)
            del fn
        rate = case.flops / ms / 1e9
        key, cublas = bench.cublas_rate(*case.gemm, case.precision)
        row.update(ms=ms, ms_q20=q20, ms_q80=q80, tflops=rate, cublas=key, pct_of_cublas=100 * rate / cublas)
    except Exception as err:  # a failed case is reported; the others still run
        row["error"] = f"{type(err).__name__}: {err}"[:600]
        traceback.print_exc()
    bench.took(provider, time.perf_counter() - start)
    bench.rows.append(row)
    return row


# -- cases -------------------------------------------------------------------------------------


def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return fn()

    return call


def default_fraction(shape: Shape) -> float:
    """The trainer's tile fraction at this shape (TrainConfig owns the formula)."""
    from esosae.config import SAEConfig, TrainConfig

    return TrainConfig(sae=SAEConfig(m1=shape.m, m2=shape.m), batch_size=shape.B).orth_block_fraction


def op_cases(shape: Shape, precision: str) -> list[Case]:
    """Encoder, decoder and orthogonality cases on the kernel tests' inputs (on their DEVICE)."""
    import test_kernel_decoder as dec
    import test_kernel_encoder as enc
    import test_kernel_orthogonality as orth

    from esosae.sae import reference
    from esosae.sae.precision import operand_dtype

    B, d, m = shape.B, shape.d, shape.m
    dtype = operand_dtype(precision)
    e = enc.make_inputs(B, d, m, dtype, "jump")  # θ in every column's gap: masks agree at any precision
    e_args = [e[k] for k in enc.INPUTS] + [e["theta"]]
    r = dec.make_inputs(B, d, m, dtype, min(1.0, 32 / m))  # L0 ≈ 32
    r_args = [r[k] for k in dec.INPUTS]
    W1, W2 = orth.unit_rows(m, d).to(dtype), orth.unit_rows(m, d).to(dtype)
    tiles = reference.sample_tiles(m, m, default_fraction(shape), torch.Generator().manual_seed(12))
    n1, n2 = reference.tile_grid(m, m)
    frac = 1.0 if tiles is None else tiles.shape[0] / (n1 * n2)
    tiles = None if tiles is None else tiles.to(W1.device)
    enc_gemm, dec_gemm, orth_gemm = (B, m, d), (B, d, m), (m, m, d)

    def case(op: str, flops: float, gemm: tuple, run: Callable, fwd: Callable | None = None) -> Case:
        if fwd is not None:
            return Case(op, shape, precision, flops, gemm, lambda ops: no_grad(lambda: fwd(ops)))
        return Case(op, shape, precision, flops, gemm, lambda ops: lambda: run(ops, dtype), run)

    return [
        case("encoder fwd", 2 * B * d * m, enc_gemm, None, lambda ops: ops.encode(*e_args)),
        case("encoder fwd+bwd", 6 * B * d * m, enc_gemm, lambda ops, dt: enc.run(ops.encode, e, dt)),
        case("decoder fwd", 2 * B * d * m, dec_gemm, None, lambda ops: ops.decode(*r_args)),
        case("decoder fwd+bwd", 6 * B * d * m, dec_gemm, lambda ops, dt: dec.run(ops.decode, r, dt)),
        case("orth fwd", 2 * m * m * d, orth_gemm, None, lambda ops: ops.orth_penalty(W1, W2, 0.0, None)),
        case("orth fwd+bwd", 6 * m * m * d, orth_gemm,
             lambda ops, dt: orth.run(ops.orth_penalty, W1, W2, 0.0, None, dt)),
        case(f"orth sampled fwd+bwd (ρ={ORTH_MARGIN}, {frac:.3f} of tiles)", 6 * m * m * d * frac, orth_gemm,
             lambda ops, dt: orth.run(ops.orth_penalty, W1, W2, ORTH_MARGIN, tiles, dt)),
    ]


PAIR_L0 = (8, 32, 128)
"""Active features per row at which the pair path is timed against the dense kernels (and
at the crossover density, ``kernels.pairs.PAIRS_MAX_DENSITY``)."""


def pair_cases(shape: Shape, precision: str) -> list[Case]:
    """The encoder → decoder chain forward and backward (tests/test_kernel_pairs.py's ``run``:
    every gradient, the decoder's target the encoder's input) with b_enc set per feature from
    the batch's quantiles so that each row fires L0 features on average (θ = 0). Provider
    ``ours`` is held on the pair path, ``ours-dense`` on the dense kernels."""
    import test_kernel_pairs as tp

    from esosae.kernels.pairs import PAIRS_MAX_DENSITY
    from esosae.sae.precision import operand_dtype

    B, d, m = shape.B, shape.d, shape.m
    dtype = operand_dtype(precision)
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, device=tp.DEVICE), dim=1)
    base = {"x": torch.randn(B, d, device=tp.DEVICE), "W_dec": W_dec, "W_enc": W_dec.T.contiguous(),
            "b_dec": torch.zeros(d, device=tp.DEVICE), "bias": torch.zeros(d, device=tp.DEVICE),
            "theta": torch.zeros(m, device=tp.DEVICE), "g_xh": torch.randn(B, d, device=tp.DEVICE),
            "g_sq": torch.randn(B, device=tp.DEVICE), "g_l1": torch.randn(B, device=tp.DEVICE)}
    pre = base["x"] @ base["W_enc"]  # (B, m) pre-activations before b_enc
    cases = []
    for l0 in [*(n for n in PAIR_L0 if n < m // 2), PAIRS_MAX_DENSITY * m]:
        inp = dict(base, b_enc=-pre.kthvalue(max(1, round((1 - l0 / m) * B)), dim=0).values)
        inp = {k: v.to(dtype) if k in tp.PARAMS else v for k, v in inp.items()}
        label = f"L0={l0:g}" + (" (crossover)" if l0 not in PAIR_L0 else "")
        cases.append(Case(f"pairs vs dense: encoder→decoder fwd+bwd {label}", shape, precision, 12 * B * d * m,
                          (B, m, d), lambda ops, inp=inp: lambda: tp.run(ops.encode, ops.decode, inp, dtype)[0]))
    del pre
    return cases


def step_config(shape: Shape, precision: str, device: torch.device) -> Any:
    from esosae.config import DataConfig, SAEConfig, ScheduleConfig, TrainConfig

    return TrainConfig(
        data=DataConfig(source="synthetic", synthetic_d=shape.d, synthetic_atoms=1024, synthetic_l0=32,
                        eval_tokens=256),
        sae=SAEConfig(arch="esosae", m1=shape.m, m2=shape.m, target_l0=32, l1_coeff=0.05, gamma_max=1.0),
        schedule=ScheduleConfig(schedule="const", tau_final=0.5, gamma_warmup="none", l1_warmup_fraction=0.0),
        steps=100, batch_size=shape.B, lr_warmup_fraction=0.0, lr_decay_fraction=0.0, device=device.type,
        dtype=precision)


def step_case(shape: Shape, precision: str, device: torch.device, notes: list[str]) -> tuple[Case, torch.Tensor]:
    """The full training step, mid-run (λ, γ and the learning rate on); every provider starts
    from a copy of the same freshly built model and optimizer. Returns the case and its batch.

    A provider that esosae.sae.precision does not run in ``precision`` on this device (on the CPU:
    anything but the interpreted triton backend outside fp32, so only in a dry run) steps in
    fp32 instead, with a note."""
    from esosae.sae import precision as precisions
    from esosae.training.loop import build, make_source, train_step

    cfg = step_config(shape, precision, device)
    source = make_source(cfg, device)
    pristine = build(cfg, source, device)
    x = source.batch(0, shape.B).to(device) * pristine[0].scale
    B, d, m = shape.B, shape.d, shape.m
    flops = 2 * B * d * m * 11 + 6 * m * m * d * cfg.orth_block_fraction  # 5 GEMMs in layer 1, 6 in layer 2

    def config_for(ops: Any) -> Any:
        try:
            precisions.resolve(cfg.dtype, device, ops.name)
            return cfg
        except precisions.PrecisionError as err:
            notes.append(f"train step {shape.name} {precision} {ops.name}: stepped in fp32 ({err})")
            fp32 = copy.copy(cfg)
            fp32.dtype = "fp32"
            return fp32

    def thunk(ops: Any) -> Callable[[], Any]:
        model, opt = copy.deepcopy(pristine)
        run_cfg = config_for(ops)
        return lambda: train_step(model, opt, ops, x, run_cfg, 10)

    def outputs(ops: Any, _dtype: torch.dtype) -> dict[str, Any]:
        model, opt = copy.deepcopy(pristine)
        res = train_step(model, opt, ops, x, config_for(ops), 10)
        out = {"loss": res["loss"].detach()}
        for name, p in model.named_parameters():
            out[name], out[f"grad_{name}"] = p.detach(), p.grad
        return out

    return Case("train step", shape, precision, flops, (B, m, d), thunk, outputs), x


def saelens_thunk(shape: Shape, precision: str, x: torch.Tensor) -> Callable[[Any], Callable[[], Any]]:
    """SAELens's StandardTrainingSAE step at d_sae = 2m (our two layers' width, as in
    bench/roofline.py's comparison), as bench/peers_worker.py defines the step
    (training_forward_pass, firing statistics, backward, clip at 1, Adam, zero_grad); bf16
    through autocast, SAELens's own mixed-precision option. Raises ImportError without sae_lens."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    device = x.device

    def thunk(_ops: Any) -> Callable[[], Any]:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=shape.d, d_sae=2 * shape.m, device=device.type))
        sae.to(device).train()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.999))
        since_fired = torch.zeros(2 * shape.m, device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step() -> dict[str, Any]:
            with autocast:
                out = sae.training_forward_pass(step_input=TrainStepInput(
                    sae_in=x, coefficients={"l1": 5.0}, dead_neuron_mask=since_fired > 1000,
                    n_training_steps=10, is_logging_step=False))
            with torch.no_grad():
                did_fire = out.feature_acts.bool().any(0)
                since_fired.add_(1)
                since_fired[did_fire] = 0
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            return {"loss": out.loss.detach()}

        return step

    return thunk


def compiled_backend(name: str, mode: str | None, dry: bool, share: Any = None) -> Any:
    """torch.compile of the reference's three ops (static shapes: one graph per shape and dtype)."""
    from esosae.sae import reference
    from esosae.sae.backend import Backend

    if dry and share is not None:  # capture only: one set of graphs serves both modes
        return Backend(name, share.encode, share.decode, share.orth_penalty)
    kw: dict[str, Any] = {"backend": "eager"} if dry else {"mode": mode, "dynamic": False}
    return Backend(name, *(torch.compile(fn, **kw) for fn in (reference.encode, reference.decode,
                                                              reference.orth_penalty)))


# -- checks ------------------------------------------------------------------------------------


def error_check(out: dict[str, Any], ref: dict[str, Any], low: dict[str, Any], precision: str) -> dict[str, Any]:
    """Each tensor of ``out`` against the float64 ``ref``: max abs and relative error, and the
    2× rule against ``low`` (the reference run in ``precision``) plus a one-roundoff floor."""
    from helpers import UNIT_ROUNDOFF  # the tests' tolerance policy (tests/helpers.py)

    tensors = {}
    for key, r in ref.items():
        o = out[key]
        if r is None or o is None:
            tensors[key] = {"ok": r is None and o is None, "note": "gradient missing on one side"}
            continue
        if not r.is_floating_point():  # fire counts: exact
            mismatches = int((o.to(torch.int64) != r.to(torch.int64)).sum())
            tensors[key] = {"mismatches": mismatches, "ok": mismatches == 0}
            continue
        r64 = r.double()
        err = (o.double() - r64).abs().max().item()
        base = (low[key].double() - r64).abs().max().item()
        scale = r64.abs().max().item()
        bound = 2 * base + UNIT_ROUNDOFF[precision] * scale
        tensors[key] = {"max_abs": err, "max_rel": err / scale if scale > 0 else None, "torch_abs": base,
                        "bound": bound, "ok": bool(err <= bound)}  # a NaN error fails
    return {"ok": all(t["ok"] for t in tensors.values()), "tensors": tensors}


def bit_identical(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (NaNs and signed zeros included); two Nones are identical."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                       b.detach().reshape(-1).contiguous().view(torch.uint8))


def differing(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Names of the tensors that differ in any bit between two runs."""
    return [k for k in first if not bit_identical(first[k], second.get(k))]


def check_case(bench: Bench, case: Case, ours: Any, eager: Any) -> None:
    """Output check (fwd+bwd op cases) and determinism (those and the step) of ours."""
    from esosae.sae.precision import matmul_precision, operand_dtype

    reason = bench.skip_reason("checks")
    if reason:
        bench.notes.append(f"{case.name}: checks skipped ({reason})")
        return
    start = time.perf_counter()
    dtype = operand_dtype(case.precision)
    try:
        with matmul_precision(case.precision):
            first, second = case.outputs(ours, dtype), case.outputs(ours, dtype)
            bench.sync()
            bench.determinism.append({"case": case.name, "provider": "ours", "differing": differing(first, second)})
            if case.op != "train step":
                ref, low = case.outputs(eager, F64), case.outputs(eager, dtype)
                bench.checks.append({"case": case.name, **error_check(first, ref, low, case.precision)})
                del ref, low
            del first, second
    except Exception as err:
        bench.checks.append({"case": case.name, "ok": False, "error": f"{type(err).__name__}: {err}"[:600]})
        traceback.print_exc()
    bench.took("checks", time.perf_counter() - start)


# -- compiled kernels --------------------------------------------------------------------------


def jit_functions() -> list[Any]:
    """Every @triton.jit function of esosae.kernels (unwrapping autotune/heuristics wrappers)."""
    import esosae.kernels as package

    found: dict[int, Any] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            while not hasattr(obj, "device_caches") and hasattr(obj, "fn"):
                obj = obj.fn
            if hasattr(obj, "device_caches"):
                found[id(obj)] = obj
    return list(found.values())


def kernel_variants(fn: Any) -> list[dict[str, Any]]:
    """One row per compiled variant of ``fn``: its operand dtype, constexpr config, launch
    options, registers, spills and shared memory (from its CompiledKernel)."""
    rows = []
    for caches in list(fn.device_caches.values()):
        cache = next((c for c in caches if isinstance(c, dict) and any(hasattr(v, "metadata") or hasattr(v, "result")
                                                                       for v in c.values())), {})
        for kernel in list(cache.values()):
            if not hasattr(kernel, "metadata") and hasattr(kernel, "result"):
                kernel = kernel.result()  # an asynchronous compile
            kernel._init_handles()  # loads the binary: n_regs and n_spills come from the driver
            signature = getattr(kernel.src, "signature", {})
            pointers = [t for t in signature.values() if isinstance(t, str) and t.startswith("*")]
            names = fn.arg_names
            consts = {names[k[0]] if isinstance(k, tuple) else k: v
                      for k, v in getattr(kernel.src, "constants", {}).items()}
            config = " ".join(f"{k}={v}" for k, v in sorted(consts.items()) if k.isupper() and k != "INTERP_BF16")
            meta = kernel.metadata
            rows.append({"kernel": fn.__name__, "dtype": pointers[0][1:] if pointers else "?", "config": config,
                         "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None),
                         "n_regs": kernel.n_regs, "n_spills": kernel.n_spills, "shared_bytes": meta.shared})
    return rows


def collect_kernels(bench: Bench) -> None:
    rows = []
    for fn in jit_functions():
        try:
            rows += kernel_variants(fn)
        except Exception as err:
            rows.append({"kernel": getattr(fn, "__name__", "?"), "error": f"{type(err).__name__}: {err}"[:300]})
    bench.kernels = sorted(rows, key=lambda r: (r["kernel"], r.get("dtype", ""), r.get("config", "")))


# -- targets, tables, files ----------------------------------------------------------------------


def targets(rows: list[dict[str, Any]], large: Shape) -> list[dict[str, Any]]:
    """The issues' targets on the bf16 rows of the large shape (benchmarks, not tests)."""
    at = {(r["op"], r["provider"]): r for r in rows if "ms" in r and r["shape"] == large.name
          and r["precision"] == "bf16"}
    out: list[dict[str, Any]] = []

    def add(issue: int, what: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"issue": issue, "target": what, "value": value, "goal": goal, "met": met})

    def ours(op: str) -> dict[str, Any] | None:
        return at.get((op, "ours"))

    if ours("encoder fwd"):
        pct = ours("encoder fwd")["pct_of_cublas"]
        add(12, "encoder fwd: % of cuBLAS", pct, ">= 70", pct >= 70)
    for op in DENSE_OPS:
        if ours(op):
            pct = ours(op)["pct_of_cublas"]
            add(12, f"{op}: % of cuBLAS (dense kernel)", pct, ">= 50", pct >= 50)
    for provider, goal in (("eager", 1.5), ("compile", 1.2)):
        other = at.get(("encoder fwd+bwd", provider))
        if ours("encoder fwd+bwd") and other:
            speedup = other["ms"] / ours("encoder fwd+bwd")["ms"]
            add(3, f"encoder fwd+bwd: speed-up over {provider}", speedup, f">= {goal}", speedup >= goal)
    fb = ours("orth fwd+bwd")
    if fb:
        ratio = 100 / fb["pct_of_cublas"]  # its 6·m²·d FLOPs are the three GEMMs it implies
        add(3, "orth fwd+bwd (ρ = 0): time / three cuBLAS GEMMs", ratio, "<= 1.3", ratio <= 1.3)
        if fb["peak_mib"] is not None:
            extra = fb["peak_mib"] - 2 * large.m * large.d * 2 / 2**20  # beyond its two bf16 gradients
            add(3, "orth fwd+bwd (ρ = 0): extra memory MiB beyond its gradients", extra, "< 64", extra < 64)
    for op in [op for op, provider in at if op.startswith("orth sampled") and provider == "ours"]:
        if at.get((op, "eager")):
            speedup = at[(op, "eager")]["ms"] / ours(op)["ms"]
            add(3, f"{op}: speed-up over eager", speedup, ">= 2", speedup >= 2)
        if ours("train step"):
            share = 100 * ours(op)["ms"] / ours("train step")["ms"]
            add(15, f"{op}: % of the train step", share, "<= 15", share <= 15)
    for provider, goal in (("saelens", 3.0), ("max-autotune", 1.5)):
        if ours("train step") and at.get(("train step", provider)):
            speedup = at[("train step", provider)]["ms"] / ours("train step")["ms"]
            add(15, f"train step: speed-up over {provider}", speedup, f">= {goal}", speedup >= goal)
    for op in [op for op, provider in at if op.startswith("pairs vs dense") and provider == "ours"]:
        if at.get((op, "ours-dense")):
            speedup = at[(op, "ours-dense")]["ms"] / ours(op)["ms"]
            at_crossover = "crossover" in op
            add(15, f"{op}: dense time / pairs time", speedup, "≈ 1 (crossover)" if at_crossover else "> 1",
                None if at_crossover else speedup > 1)
    return out


PROVIDERS = ("ours", "ours-dense", "eager", "compile", "max-autotune", "saelens")


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "error"
    return f"{row['ms']:.3f} ({row['pct_of_cublas']:.0f}%)"


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    """The run as markdown: environment, timings, targets, checks, determinism, kernels, notes."""
    env = result["env"]
    lines = [f"# GPU check: {env['device']}, {env['date']}", ""]
    if result["dry_run"]:
        lines += ["**Dry run**: CPU, Triton's interpreter, tiny shapes, torch.compile(backend=\"eager\"). "
                  "No number here says anything about speed.", ""]
    lines += [f"{env['device']} (compute capability {env['capability']}), driver {env['driver']}, CUDA {env['cuda']}, "
              f"torch {env['torch']}, triton {env['triton']}, Python {env['python']}; started {env['started']}, "
              f"{result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget.", "",
              "## Timings", "",
              "Median ms of one call and, in parentheses, its dense-equivalent TFLOP/s as a % of a cuBLAS GEMM "
              "(torch.matmul) of the case's main product in the same precision, measured in this run. "
              "Peak: MiB one call allocates beyond its inputs. The JSON has the 20/80% quantiles and the first "
              "call's seconds (compilation included).", "",
              "| case | cuBLAS TFLOP/s | " + " | ".join(PROVIDERS) + " | peak MiB ours / eager |",
              "|---|---:|" + "---:|" * len(PROVIDERS) + "---:|"]
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in result["rows"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for case, rows in by_case.items():
        key = next((r["cublas"] for r in rows.values() if "cublas" in r), None)
        peaks = " / ".join(_num(rows.get(p, {}).get("peak_mib"), ".0f") for p in ("ours", "eager"))
        lines.append(f"| {case} | {_num(result['cublas_tflops'].get(key))} | "
                     + " | ".join(_cell(rows.get(p)) for p in PROVIDERS) + f" | {peaks} |")
    lines += ["", "## Targets (bf16, large shape)", "", "| issue | target | value | goal | met |",
              "|---|---|---:|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['issue']} | {t['target']} | {_num(t['value'])} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    lines += ["", "## Output checks: ours against the float64 reference", "",
              "Pass: max abs error ≤ 2 × the reference's own error in that precision + one unit roundoff of the "
              "largest reference value (fire counts: exact).", "",
              "| case | tensor | max abs | max rel | torch's max abs | bound | pass |",
              "|---|---|---:|---:|---:|---:|---|"]
    for c in result["checks"]:
        if "error" in c:
            lines.append(f"| {c['case']} | – | error: {c['error']} | | | | NO |")
            continue
        for name, t in c["tensors"].items():
            ok = "yes" if t["ok"] else "NO"
            if "mismatches" in t:
                lines.append(f"| {c['case']} | {name} | {t['mismatches']} mismatches | | | | {ok} |")
            else:
                lines.append(f"| {c['case']} | {name} | {_num(t.get('max_abs'))} | {_num(t.get('max_rel'))} | "
                             f"{_num(t.get('torch_abs'))} | {_num(t.get('bound'))} | {ok} |")
    lines += ["", "## Determinism: ours run twice, compared bit for bit", "", "| case | identical | differing |",
              "|---|---|---|"]
    for dt in result["determinism"]:
        lines.append(f"| {dt['case']} | {'yes' if not dt['differing'] else 'NO'} | {', '.join(dt['differing'])} |")
    lines += ["", "## Compiled kernels", ""]
    if result["kernels"]:
        lines += ["| kernel | dtype | config | warps | stages | registers | spills | shared KiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for k in result["kernels"]:
            if "error" in k:
                lines.append(f"| {k['kernel']} | error: {k['error']} | | | | | | |")
                continue
            lines.append(f"| {k['kernel']} | {k['dtype']} | {k['config']} | {k['num_warps']} | {k['num_stages']} | "
                         f"{k['n_regs']} | {k['n_spills']} | {k['shared_bytes'] / 1024:.1f} |")
    else:
        lines.append("None: nothing was compiled (the interpreter runs the kernels in a dry run).")
    notes = result["notes"] + [f"{r['case']} {r['provider']}: {r.get('skipped') or 'error: ' + r['error']}"
                               for r in result["rows"] if "skipped" in r or "error" in r]
    if notes:
        lines += ["", "## Skipped and failed", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def environment(device: torch.device, dry: bool) -> dict[str, Any]:
    import triton

    env = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "capability": None, "driver": None,
           "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["driver"] = driver_version()
    return env


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        return None


def write(result: dict[str, Any], out: Path) -> None:
    """The JSON and its markdown beside it, each replaced whole (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=2) + "\n"), (out.with_suffix(".md"), markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu_check_<device>_<date>.json); "
                                            "the markdown goes beside it (.md)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip the remaining cases after this many seconds")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import torch._dynamo as dynamo

    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(dynamo.config, name):  # one graph per shape, precision and grad mode
            setattr(dynamo.config, name, value)
    try:
        import esosae.sae.precision  # noqa: F401  (the dtype API: fail here, not mid-run)
        from esosae.sae import reference
        from esosae.sae.backend import Backend, get_backend
    except ImportError as err:
        print(f"gpu_check: esosae does not import ({err}); pip install --no-deps -e . first", file=sys.stderr)
        return 2

    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    bench = Bench(device, args.budget_s, {} if args.dry_run else PRIOR_S)
    env = environment(device, args.dry_run)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"gpu_check_{slug}_{env['date']}.json"

    def save() -> dict[str, Any]:
        result = {"env": env, "dry_run": args.dry_run, "budget_s": args.budget_s, "wall_s": bench.elapsed(),
                  "shapes": [s.name for s in shapes], "precisions": list(PRECISIONS), "rows": bench.rows,
                  "cublas_tflops": bench.cublas, "checks": bench.checks, "determinism": bench.determinism,
                  "kernels": bench.kernels, "targets": targets(bench.rows, shapes[0]), "notes": bench.notes}
        write(result, out)
        return result

    ours = get_backend("triton", device)
    eager = Backend("eager", reference.encode, reference.decode, reference.orth_penalty)
    pairs_path, dense_path = (dataclasses.replace(ours, name=name, encode=functools.partial(ours.encode, max_density=r))
                              for name, r in (("triton", 1.0), ("triton", 0.0)))
    combos = [(p, s) for p in PRECISIONS for s in shapes]  # bf16 first, large shape first
    cases: dict[tuple[str, Shape], list[Case]] = {}
    for precision, shape in combos:  # 1: ours, eager, cuBLAS, checks, determinism, SAELens
        print(f"[{bench.elapsed():5.0f} s] {precision} {shape.name}: ours and eager", flush=True)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                cases[(precision, shape)] = op_cases(shape, precision)
                step, x = step_case(shape, precision, device, bench.notes)
            cases[(precision, shape)].append(step)
        except Exception as err:
            bench.notes.append(f"{precision} {shape.name}: inputs failed: {type(err).__name__}: {err}"[:600])
            traceback.print_exc()
            continue
        for case in cases[(precision, shape)]:
            for name, ops in (("ours", ours), ("eager", eager)):
                record(bench, case, name, ops)
            if case.outputs is not None:
                check_case(bench, case, ours, eager)
            save()
        try:
            saelens = saelens_thunk(shape, precision, x)
        except ImportError as err:
            bench.rows.append({"case": step.name, "op": step.op, "shape": shape.name, "precision": precision,
                               "provider": "saelens", "skipped": f"sae_lens not importable ({err})"})
        else:
            width = 2 * shape.m  # one layer as wide as our two: 5 GEMMs of (B, d) × (d, 2m)
            record(bench, Case(step.op, shape, precision, 2 * shape.B * shape.d * width * 5,
                               (shape.B, width, shape.d), saelens), "saelens", None)
        del x
        if shape == shapes[0]:  # the pair path against the dense kernels, at the large shape
            print(f"[{bench.elapsed():5.0f} s] {precision} {shape.name}: pairs vs dense", flush=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for case in pair_cases(shape, precision):
                    for name, ops in (("ours", pairs_path), ("ours-dense", dense_path)):
                        record(bench, case, name, ops)
                    save()
        collect_kernels(bench)
        save()
        gc.collect()
    compiled = compiled_backend("compile", None, args.dry_run)
    autotuned = compiled_backend("max-autotune", "max-autotune", args.dry_run, share=compiled)
    for precision, shape in sorted(combos, key=lambda c: (c[1] != shapes[0], c[0] != "bf16")):  # 2: torch.compile
        print(f"[{bench.elapsed():5.0f} s] {precision} {shape.name}: torch.compile", flush=True)
        for case in cases.get((precision, shape), []):
            for name, ops in (("compile", compiled), ("max-autotune", autotuned)):
                record(bench, case, name, ops)
            save()
        gc.collect()
    collect_kernels(bench)
    result = save()
    print(markdown(result))
    print(f"written to {out} and {out.with_suffix('.md')}")
    failed = [r for r in bench.rows if "error" in r and r["provider"] == "ours"] + [c for c in bench.checks
                                                                                  if not c["ok"]]
    if failed:  # the other providers' errors are reported in the tables, not failures of ours
        print(f"gpu_check: {len(failed)} of our cases raised or failed a check; see above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
