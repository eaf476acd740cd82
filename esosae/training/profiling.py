"""Telemetry and profiling: a per-phase step timer, NVTX ranges for Nsight, torch.profiler traces.

- ``StepTimer`` splits a step's wall time into phases (data, forward, backward, optimizer).
  CUDA work is asynchronous, so on CUDA it synchronizes between phases only on the steps
  it is asked to measure (the logging steps); other steps pay nothing.
- ``--profile nvtx`` wraps the trainer's phases and the backend's encode/decode/
  orthogonality calls in NVTX ranges (domain ``esosae``) for ``nsys``/``ncu``; with any
  other setting the ranges are ``contextlib.nullcontext`` and cost nothing.
- ``--profile torch`` records a few steps with ``torch.profiler`` into a Chrome trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nvtx
import torch

from esosae.sae.backend import Backend

NVTX_DOMAIN = "esosae"
TRACE_FILE = "trace.json"
PROFILE_DIR = "profile"


class Ranges:
    """Named ranges for a profiler: NVTX when enabled, no-ops otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        if self.enabled:
            return nvtx.annotate(name, domain=NVTX_DOMAIN)
        return contextlib.nullcontext()

    def wrap_backend(self, ops: Backend) -> Backend:
        """The same backend with each op inside a range named after it (when enabled)."""
        if not self.enabled:
            return ops

        def ranged(name: str, fn: Callable) -> Callable:
            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                with self(name):
                    return fn(*args, **kwargs)
            return call

        return dataclasses.replace(ops, encode=ranged("encode", ops.encode), decode=ranged("decode", ops.decode),
                                   orth_penalty=ranged("orthogonality", ops.orth_penalty),
                                   encode_learned=ranged("encode", ops.encode_learned))


NO_RANGES = Ranges(False)


def dense_flops_per_token(cfg: Any, d: int) -> float:
    """Dense-equivalent FLOPs of one training token (the MFU numerator's unit):
    per layer 12·d·m (encoder and decoder forward 2·d·m each, backward twice that), plus
    the orthogonality penalty's 3·2·m1·m2·d·fraction per step, shared by B tokens."""
    m1, m2 = cfg.sae.m1, cfg.sae.m2
    orth = 6 * m1 * m2 * d * cfg.orth_block_fraction / (cfg.sae.orth_every * cfg.batch_size) if m2 else 0.0
    return 12 * d * (m1 + m2) + orth


class StepTimer:
    """Seconds per phase of the steps it measures; ``sync`` only on CUDA measuring steps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.measuring = False
        self.phases: dict[str, float] = {}
        self._t = 0.0

    def start(self, measuring: bool) -> None:
        self.measuring, self.phases = measuring, {}
        if measuring:
            self._sync()
            self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Close the phase that ran since the last mark."""
        if not self.measuring:
            return
        self._sync()  # sync point: measuring (logging) steps only
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._t
        self._t = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def gemm_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 4096) -> float:
    """A measured square-GEMM rate on ``device`` (TFLOP/s), the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


@contextlib.contextmanager
def torch_trace(run_dir: Path, enabled: bool, steps: int = 3) -> Iterator[Callable[[], None]]:
    """Yields a per-step callback; when enabled, records ``steps`` steps after one warmup step
    and writes ``profile/trace.json`` (open in chrome://tracing or Perfetto)."""
    if not enabled:
        yield lambda: None
        return
    out = run_dir / PROFILE_DIR
    out.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def save(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(out / TRACE_FILE))

    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=save,
                                record_shapes=True) as prof:
        yield prof.step
