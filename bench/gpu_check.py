"""Times the Triton kernels against torch eager and torch.compile on one GPU.

Providers, side by side: ``ours`` (esosae.kernels), ``eager`` (esosae.reference, the
oracle, not re-written here) and ``compile`` (torch.compile of the same reference). Cases:

- encoder forward, and forward + backward (grads for x, W_enc, b_enc, b_dec), bf16, at
  d=2304/m=16384/B=4096 and d=576/m=4608/B=1024;
- orthogonality forward + backward at m1=m2=16384, d=2304, bf16: ρ=0.1 (random unit rows
  lie inside the margin, so the backward skips its products) and ρ=0 (nothing skipped);
- one full dual-layer training step (esosae.train.train_step: forward, backward, clip,
  Adam, constraints) with the trainer's fp32 parameters, at both shapes.

Each row: median ms with 20/80 quantiles (``triton.testing.do_bench``), TFLOP/s of the
useful work, that rate as a % of a cuBLAS GEMM of the case's main shape and dtype measured
in the same run, and the peak memory the call allocates beyond its inputs. The table is
printed and written as JSON (``--out``), with the device, date and versions, and the
issue's targets evaluated on it.

``--dry-run``: tiny shapes on the CPU under TRITON_INTERPRET=1, wall-clock timing, and
torch.compile with backend="eager" (graph capture without code generation); it checks the
script, not the speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    B: int
    d: int
    m: int

    @property
    def name(self) -> str:
        return f"d={self.d} m={self.m} B={self.B}"


GPU_SHAPES = (Shape(4096, 2304, 16384), Shape(1024, 576, 4608))
GPU_ORTH = (16384, 16384, 2304)  # m1, m2, d
DRY_SHAPES = (Shape(64, 32, 128),)
DRY_ORTH = (128, 128, 32)


class Bench:
    """Timing, memory and the GEMM yardstick on one device; rows collect as they run."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.budget_s, self.t0 = device, budget_s, time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.gemm_rates: dict[str, float] = {}

    def time_ms(self, fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> tuple[float, float, float]:
        """(median, q20, q80) in ms: CUDA events via do_bench, or wall clock on the CPU."""
        if self.device.type == "cuda":
            import triton.testing

            q20, med, q80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], grad_to_none=grad_to_none)
            return med, q20, q80
        fn()  # warm-up (and any compilation)
        times = []
        for _ in range(3):
            for t in grad_to_none or []:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        q20, med, q80 = statistics.quantiles(times, n=10, method="inclusive")[1], statistics.median(times), \
            statistics.quantiles(times, n=10, method="inclusive")[7]
        return med, q20, q80

    def peak_mib(self, fn: Callable[[], Any]) -> float | None:
        """Peak memory allocated by one call beyond what was allocated before it (CUDA only)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def gemm_rate(self, M: int, N: int, K: int, dtype: torch.dtype) -> float:
        """TFLOP/s of torch.matmul (cuBLAS on a GPU) for (M, K) @ (K, N) in ``dtype``."""
        key = f"{M}x{K}@{K}x{N} {str(dtype).removeprefix('torch.')}"
        if key not in self.gemm_rates:
            a = torch.randn(M, K, device=self.device).to(dtype)
            b = torch.randn(K, N, device=self.device).to(dtype)
            ms, _, _ = self.time_ms(lambda: a @ b)
            self.gemm_rates[key] = 2 * M * N * K / ms / 1e9
        return self.gemm_rates[key]

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def record(self, case: str, provider: str, fn: Callable[[], Any], flops: float, gemm: tuple,
               grad_to_none: list[torch.Tensor] | None = None) -> None:
        if self.over_budget():
            self.rows.append({"case": case, "provider": provider, "skipped": "time budget"})
            return
        ms, q20, q80 = self.time_ms(fn, grad_to_none)
        for t in grad_to_none or []:
            t.grad = None  # the memory measurement starts from no gradients, like each timed call
        rate = flops / ms / 1e9
        self.rows.append({"case": case, "provider": provider, "ms": ms, "ms_q20": q20, "ms_q80": q80,
                          "tflops": rate, "pct_of_gemm": 100 * rate / self.gemm_rate(*gemm),
                          "gemm": f"{gemm[0]}x{gemm[2]}@{gemm[2]}x{gemm[1]} {str(gemm[3]).removeprefix('torch.')}",
                          "peak_mib": self.peak_mib(fn)})


def encoder_cases(bench: Bench, shape: Shape, providers: dict[str, Callable]) -> None:
    B, d, m = shape.B, shape.d, shape.m
    dev, dtype = bench.device, torch.bfloat16
    x = torch.randn(B, d, device=dev).to(dtype)
    W = (torch.randn(d, m, device=dev) / d**0.5).to(dtype)
    b_enc, b_dec = (0.1 * torch.randn(m, device=dev)).to(dtype), (0.1 * torch.randn(d, device=dev)).to(dtype)
    theta = torch.full((m,), 2.0, device=dev)  # ~2% of a ~ N(0, 1) fire
    g_f, g_l1 = torch.randn(B, m, device=dev).to(dtype), torch.randn(B, device=dev)
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
    gemm = (B, m, d, dtype)
    for name, op in providers.items():
        def fwd(op=op):
            with torch.no_grad():
                return op(x, W, b_enc, b_dec, theta)

        def fwd_bwd(op=op):
            f, row_l1, _ = op(*leaves, theta)
            torch.autograd.backward([f, row_l1], [g_f, g_l1])

        bench.record(f"encoder fwd {shape.name}", name, fwd, 2 * B * d * m, gemm)
        bench.record(f"encoder fwd+bwd {shape.name}", name, fwd_bwd, 6 * B * d * m, gemm, grad_to_none=leaves)


def orth_cases(bench: Bench, m1: int, m2: int, d: int, providers: dict[str, Callable]) -> None:
    dev, dtype = bench.device, torch.bfloat16
    W1 = torch.nn.functional.normalize(torch.randn(m1, d, device=dev), dim=1).to(dtype).requires_grad_()
    W2 = torch.nn.functional.normalize(torch.randn(m2, d, device=dev), dim=1).to(dtype).requires_grad_()
    for margin in (0.1, 0.0):
        for name, op in providers.items():
            def fwd_bwd(op=op, margin=margin):
                op(W1, W2, margin, None).backward()

            bench.record(f"orth fwd+bwd m1={m1} m2={m2} d={d} rho={margin}", name, fwd_bwd, 6 * m1 * m2 * d,
                         (m1, m2, d, dtype), grad_to_none=[W1, W2])


def train_step_cases(bench: Bench, shape: Shape, backends: dict[str, Any]) -> None:
    from esosae.config import DataConfig, SAEConfig, ScheduleConfig, TrainConfig
    from esosae.train import build, make_source, train_step

    B, d, m = shape.B, shape.d, shape.m
    cfg = TrainConfig(
        data=DataConfig(source="synthetic", synthetic_d=d, synthetic_atoms=1024, synthetic_l0=32, eval_tokens=256),
        sae=SAEConfig(arch="esosae", m1=m, m2=m, target_l0=32, l1_coeff=0.05, gamma_max=1.0),
        schedule=ScheduleConfig(schedule="const", tau_final=0.5, gamma_warmup="none", l1_warmup_fraction=0.0),
        steps=100, batch_size=B, lr_warmup_fraction=0.0, lr_decay_fraction=0.0, device=bench.device.type)
    source = make_source(cfg, bench.device)
    x = source.batch(0, B).to(bench.device)
    frac = cfg.orth_block_fraction
    flops = 2 * B * d * m * 11 + 6 * m * m * d * frac  # 5 GEMMs in layer 1, 6 in layer 2, sampled tiles
    for name, ops in backends.items():
        model, opt = build(cfg, source, bench.device)
        xs = x * model.scale
        bench.record(f"train step {shape.name} fp32", name, lambda: train_step(model, opt, ops, xs, cfg, 10),
                     flops, (B, m, d, torch.float32))
        del model, opt


def targets(rows: list[dict[str, Any]], shapes: tuple[Shape, ...], orth: tuple[int, int, int],
            gemm_rates: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's rows (benchmarks, not tests)."""
    ms = {(r["case"], r["provider"]): r for r in rows if "ms" in r}
    out = []

    def add(what: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": what, "value": value, "goal": goal, "met": met})

    for s in shapes:
        fb = {p: ms.get((f"encoder fwd+bwd {s.name}", p)) for p in ("ours", "eager", "compile")}
        if all(fb.values()):
            for p, goal in (("eager", 1.5), ("compile", 1.2)):
                speedup = fb[p]["ms"] / fb["ours"]["ms"]
                add(f"encoder fwd+bwd {s.name}: speed-up over {p}", speedup, f">= {goal}", speedup >= goal)
        f = ms.get((f"encoder fwd {s.name}", "ours"))
        if f:
            add(f"encoder fwd {s.name}: % of GEMM rate", f["pct_of_gemm"], ">= 70", f["pct_of_gemm"] >= 70)
    m1, m2, d = orth
    for rho in (0.1, 0.0):
        case = f"orth fwd+bwd m1={m1} m2={m2} d={d} rho={rho}"
        ours, eager = ms.get((case, "ours")), ms.get((case, "eager"))
        if ours is None:
            continue
        gemm_ms = 2 * m1 * m2 * d / gemm_rates[f"{m1}x{d}@{d}x{m2} bfloat16"] / 1e9
        ratio = ours["ms"] / (3 * gemm_ms)
        add(f"{case}: time / three GEMMs", ratio, "<= 1.3", ratio <= 1.3)
        if ours["peak_mib"] is not None:
            extra = ours["peak_mib"] - 2 * m1 * d * 2 / 2**20  # beyond the two bf16 gradients it returns
            add(f"{case}: extra memory MiB beyond its gradients", extra, "< 64", extra < 64)
        if eager:
            speedup = eager["ms"] / ours["ms"]
            add(f"{case}: speed-up over eager", speedup, ">= 2", speedup >= 2)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':48s} {'provider':8s} {'ms':>9s} {'q20-q80':>17s} {'TFLOP/s':>8s} {'%GEMM':>6s} {'peak MiB':>9s}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['case']:48s} {r['provider']:8s} skipped ({r['skipped']})")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['case']:48s} {r['provider']:8s} {r['ms']:9.3f} {r['ms_q20']:8.3f}-{r['ms_q80']:<8.3f} "
                     f"{r['tflops']:8.2f} {r['pct_of_gemm']:6.1f} {peak:>9s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu_check_<device>_<date>.json)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip the remaining cases after this many seconds")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    import triton

    from esosae import kernels, reference
    from esosae.backend import TORCH, Backend, get_backend

    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes, orth = (DRY_SHAPES, DRY_ORTH) if args.dry_run else (GPU_SHAPES, GPU_ORTH)
    compile_kw = {"backend": "eager"} if args.dry_run else {}
    name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    bench = Bench(device, args.budget_s)

    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, **compile_kw)

    for shape in shapes:
        encoder_cases(bench, shape, {"ours": kernels.encode, "eager": reference.encode,
                                     "compile": compiled(reference.encode)})
    orth_cases(bench, *orth, {"ours": kernels.orth_penalty, "eager": reference.orth_penalty,
                              "compile": compiled(reference.orth_penalty)})
    compiled_backend = Backend("compile", compiled(reference.encode), compiled(reference.decode),
                               compiled(reference.orth_penalty))
    for shape in shapes:
        train_step_cases(bench, shape, {"ours": get_backend("triton", device), "eager": TORCH,
                                        "compile": compiled_backend})

    result = {"device": name, "date": date, "dry_run": args.dry_run, "torch": torch.__version__,
              "triton": triton.__version__, "wall_s": time.perf_counter() - bench.t0, "rows": bench.rows,
              "gemm_tflops": bench.gemm_rates, "targets": targets(bench.rows, shapes, orth, bench.gemm_rates)}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"gpu_check_{slug}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}, {date}, torch {torch.__version__}, triton {triton.__version__}\n")
    print(table(bench.rows))
    print("\ntargets:")
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        print(f"  {'met ' if t['met'] else 'MISS'} {t['target']}: {value} (goal {t['goal']})")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
