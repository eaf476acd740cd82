"""Compile every Triton kernel for sm_80, sm_89 and sm_90 on a machine without a GPU, and
check what the compiler made of it.

For each architecture × operand precision (bf16, fp16, tf32, fp32-ieee) × shape (the default
run's d 576, m 1,152 + 1,152, B 1,024 and a large d 2,304, m 16,384 + 16,384, B 4,096), the
ops run forward and backward inside ``esosae.kernels.utils.compile_only``: the launchers pick
their real tiles, grids and groups, Triton specializes the arguments as a launch would
(alignment, divisibility by 16), and each kernel is compiled to a cubin instead of run.
Then, per compiled kernel, from the cubin (``cuobjdump``, shipped with Triton):

- registers per thread and spilled bytes (``ptxas -v``, as Triton runs it; must be 0), and
  the stack frame;
- shared memory: Triton's dynamic allocation plus the static part (must fit the
  architecture's per-block limit, ``SHARED_LIMIT``);
- tensor-core instructions in the SASS: HGMMA (wgmma) on sm_90, HMMA (mma) on sm_80/sm_89
  (must be > 0 for bf16, fp16 and tf32; fp32-ieee runs on the FMA units by design).

``python bench/compile_check.py [--out bench/results/compile.md] [--jobs N]`` writes the
table and exits 1 if any check fails. tests/test_kernel_compile.py runs it in the CPU suite.
Must run without TRITON_INTERPRET (the compile targets are real GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 89, 90)
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
SHAPES = {"default": (1024, 576, 1152), "large": (4096, 2304, 16384)}  # B, d, m per layer
TENSOR_CORE_OP = {80: "HMMA", 89: "HMMA", 90: "HGMMA"}
GATHERS = {"_row_gather_kernel", "_pair_dot_kernel", "_segment_sum_kernel"}
"""The pair kernels: memory-bound gathers on the FMA units, no tensor cores expected."""


@dataclass
class Row:
    arch: int
    precision: str
    shape: str
    kernel: str
    tiles: str  # BLOCK_M×BLOCK_N×BLOCK_K, warps, stages
    regs: int
    spill_bytes: int  # ptxas -v: spill stores + spill loads per thread
    stack: int  # ptxas -v: stack frame bytes per thread
    shared: int  # bytes per program
    shared_limit: int
    tc_ops: int  # tensor-core instructions in the SASS

    def failures(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.shared > self.shared_limit:
            out.append(f"shared {self.shared} B > {self.shared_limit} B")
        if self.precision != "fp32" and self.tc_ops == 0 and self.kernel.split(" ")[0] not in GATHERS:
            out.append("no tensor-core instructions")
        return out


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill bytes stored + loaded, stack frame bytes) from ``ptxas -v`` run as
    Triton runs it (its ptxas for the target, --regAllocOptLevel=2)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    frame, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                              r"(\d+) bytes spill loads", log).groups())
    return int(re.search(r"Used (\d+) registers", log).group(1)), stores + loads, frame


def _cubin_report(cubin: bytes) -> tuple[int, str]:
    """(static shared bytes, SASS text) of a one-kernel cubin, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", fh.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", fh.name], capture_output=True, text=True,
                              check=True).stdout
    return int(re.search(r"\bSHARED:(\d+)", usage).group(1)), sass


def active_pairs(B: int, m: int, dtype: object, l0: int = 32) -> object:
    """``l0`` random active features per row of a (B, m) f, as the pair kernels take them."""
    import torch

    from esosae.kernels.pairs import Pairs

    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(B).repeat_interleave(l0)
    cols = torch.stack([torch.randperm(m, generator=gen)[:l0].sort().values for _ in range(B)]).view(-1)
    return Pairs(torch.stack([rows, cols]), torch.empty(B * l0, dtype=dtype), (B, m))


def compile_case(arch: int, precision: str, shapes: tuple[str, ...]) -> list[Row]:
    """Run every op forward and backward at each shape under compile_only(arch); one Row
    per distinct compilation, naming the shapes that produced it."""
    import torch

    from esosae.kernels import decoder, encoder, orthogonality, sparse
    from esosae.kernels.utils import ARCHS as FAMILIES, SHARED_LIMIT, compile_only
    from esosae.sae.reference import sample_tiles

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")

    def empty(*size, dt=dtype):
        return torch.empty(size, dtype=dt)  # never read: compile_only does not run kernels

    launched = []
    for shape in shapes:
        B, d, m = SHAPES[shape]
        x, W_enc, b_enc, b_dec, theta = empty(B, d), empty(d, m), empty(m), empty(d), empty(m, dt=torch.float32)
        f, W_dec, grad_l1, grad_sq = empty(B, m), empty(m, d), empty(B, dt=torch.float32), empty(B, dt=torch.float32)
        tiles = sample_tiles(m, m, 0.25, torch.Generator().manual_seed(0))
        with compile_only(arch) as compiled:
            encoder.encode_forward(x, W_enc, b_enc, b_dec, theta)
            encoder.encode_backward(f, grad_l1, x, W_enc, b_dec, f, (True,) * 4)
            for l0 in (False, True):  # learned thresholds: the recomputing θ-gradient kernel
                encoder.encode_backward_theta(f, grad_l1, x, W_enc, b_enc, b_dec, theta, 0.05, l0)
            decoder.decode_forward(f, W_dec, b_dec, x)
            decoder.decode_backward(x, grad_sq, f, W_dec, x, x, (True,) * 4)
            for subset in (tiles, None):  # sampled and exact
                orthogonality.orth_forward(W_dec, W_dec, 0.1, subset)
                orthogonality.orth_backward(torch.ones(()), W_dec, W_dec, 0.1, subset, (True, True))
            pairs = active_pairs(B, m, dtype)
            ga = empty(pairs.nnz, dt=torch.float32)
            sparse.row_gather(pairs, pairs.vals, W_dec, b_dec, x)  # decoder forward
            sparse.row_gather(pairs, ga, W_dec)  # grad_x (from W_encᵀ, laid out as W_dec)
            sparse.pair_dot(pairs, x, W_dec)  # grad_f on the pairs
            sparse.segment_sum(pairs, pairs.vals, x)  # grad_W_dec
            sparse.segment_sum(pairs, ga, x, col_sum=True)  # grad_W_encᵀ and grad_b_enc
        launched += [(shape, *launch) for launch in compiled]
    rows: dict[str, Row] = {}
    for shape, kernel, cfg, consts in launched:
        if kernel.hash in rows:
            if shape not in rows[kernel.hash].shape:
                rows[kernel.hash].shape += f", {shape}"
            continue
        regs, spill, frame = _ptxas_report(kernel.asm["ptx"], arch)
        static_shared, sass = _cubin_report(kernel.asm["cubin"])
        modes = ", ".join(k for k, v in consts.items() if v is True)
        rows[kernel.hash] = Row(arch, precision, shape, kernel.metadata.name + (f" ({modes})" if modes else ""),
                                f"{cfg.BLOCK_M}×{cfg.BLOCK_N}×{cfg.BLOCK_K}, {cfg.num_warps}w, {cfg.num_stages}s",
                                regs, spill, frame, kernel.metadata.shared + static_shared,
                                SHARED_LIMIT[FAMILIES[arch]], sass.count(TENSOR_CORE_OP[arch]))
    return list(rows.values())


def markdown(rows: list[Row]) -> str:
    bad = [r for r in rows if r.failures()]
    lines = [
        "# Compile check: every kernel for sm_80, sm_89, sm_90",
        "",
        f"Generated by `python bench/compile_check.py` on {datetime.date.today().isoformat()} (no GPU: each kernel is "
        "compiled to a cubin with Triton's ptxas through the launchers' own configs, then read with cuobjdump). "
        "Shapes: default d 576, m 1,152 + 1,152, B 1,024; large d 2,304, m 16,384 + 16,384, B 4,096; the "
        "orthogonality kernels with sampled tiles and exact. A compilation that serves several shapes is listed "
        "once, with its shapes. "
        "Registers, spills (stores + loads) and stack frame from `ptxas -v` run as Triton runs it. Tensor-core ops: HGMMA (wgmma) on sm_90, HMMA (mma.sync) on sm_80/sm_89; fp32 is IEEE fp32 on the FMA "
        "units by design, as are the pair kernels (gathers, memory-bound) at every precision. Shared: bytes per program, "
        "limit in brackets. Pair kernels at L0 32 per row.",
        "",
        f"**{len(rows)} compilations, {len(bad)} failing checks.**",
        "",
        "| arch | precision | shapes | kernel | tiles | regs | spills (B) | stack (B) | shared (limit) | tensor-core ops |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " ❌ " + "; ".join(r.failures()) if r.failures() else ""
        lines.append(f"| sm_{r.arch} | {r.precision} | {r.shape} | `{r.kernel}` | {r.tiles} | {r.regs} | "
                     f"{r.spill_bytes} | {r.stack} | {r.shared:,} ({r.shared_limit:,}) | {r.tc_ops}{mark} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compile.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    shapes = tuple(args.shapes.split(","))
    cases = [(int(a), p, shapes) for a in args.archs.split(",") for p in args.precisions.split(",")]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [row for case in pool.map(compile_case, *zip(*cases)) for row in case]
    rows.sort(key=lambda r: (r.arch, PRECISIONS.index(r.precision), r.shape, r.kernel))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows))
    bad = [r for r in rows if r.failures()]
    for r in bad:
        print(f"FAIL sm_{r.arch} {r.precision} {r.shape} {r.kernel}: {'; '.join(r.failures())}")
    print(f"{len(rows)} compilations, {len(bad)} failing; table in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
