"""What the kernel files share: tile sizes, dtype rules, the interpreter switch, input checks,
output allocation and NVTX ranges.

Interpreter trap (triton 3.9, torch 2.13 CPU): under ``TRITON_INTERPRET=1`` bf16 tiles are held
as their raw uint16 bit patterns. So ``tl.dot`` on bf16 tiles multiplies bit patterns (relative
error ~1e9), comparisons on bf16 tiles compare bits (−0 ≠ 0), and fp32 → bf16 casts truncate
instead of rounding to nearest even; bf16 loads, stores and bf16 → fp32 casts are right, and
fp16/fp32 are right throughout. Hence three rules in every kernel:

- products go through ``mma``, whose ``INTERP_BF16`` constexpr widens bf16 tiles to fp32
  before ``tl.dot`` (exact: a bf16 × bf16 product fits in fp32, and the sum accumulates in
  fp32 as tensor cores do);
- casts down to the operand dtype go through ``round_to``, which under ``INTERP_BF16`` rounds
  to nearest even by hand first (fp32 subnormals excepted), so the interpreter reproduces
  the GPU's results;
- loaded values are compared only after a cast to fp32 (free on the GPU).

``INTERP_BF16`` is set by ``interp_bf16`` only for interpreted kernels with bf16 operands, so
compiled kernels never take these branches. ``tests/test_kernel_utils.py`` checks that the
trap still exists, so the workaround can be dropped the day it does not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import nvtx
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.interpreter import InterpretedFunction

ORTH_TILE = 64
"""Side of the square tiles of W_dec1 W_dec2ᵀ; equals ``esosae.sae.reference.ORTH_TILE`` (the sampled-tile
tests against the reference fail otherwise)."""

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Operand dtypes the kernels accept; all accumulate in fp32."""

_POISON = False


# -- device code shared by the kernel files ---------------------------------------------


@triton.jit
def mma(acc, a, b, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (bf16 tiles widened first under the interpreter)."""
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 x cast to DTYPE, rounding to nearest even (by hand under the interpreter)."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # exact in bf16 after this
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(DTYPE)


@triton.jit
def tile_ids(pid, n_rows, n_cols, group):
    """Grouped launch order (Triton's matmul tutorial): ``group`` consecutive row tiles walk
    the column tiles together, so each column tile is read from memory once per group while
    the group's row strips stay in L2 (``group_size`` picks it)."""
    width = group * n_cols
    first = (pid // width) * group
    size = tl.minimum(n_rows - first, group)
    return first + (pid % width) % size, (pid % width) // size


# -- launch configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one product, output (M × N) reducing over K, and its launch options. Every
    GEMM kernel names its meta-parameters BLOCK_M / BLOCK_N / BLOCK_K after its own M, N, K
    (its docstring says which dimensions those are), so ``launch`` passes them unrenamed."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


SHARED_LIMIT = {"sm_80": 166_912, "sm_89": 101_376, "sm_90": 232_448}
"""Shared memory one program may use (bytes, the opt-in maximum per block): A100 163 KiB;
A10, RTX 3090/4090, L40S 99 KiB; H100/H200 227 KiB."""

ARCHS = {80: "sm_80", 87: "sm_80", 86: "sm_89", 89: "sm_89", 90: "sm_90"}
"""Compute capability (major·10 + minor) → the config family it runs. The compile check
(``bench/compile_check.py``) proves every family's configs for sm_80, sm_89 and sm_90."""

_T = TileConfig
CONFIGS: dict[tuple[str, str, str], TileConfig] = {
    # (family, operands, kind) → tiles. Operands: "16" bf16/fp16 (tensor cores), "tf32"
    # (fp32 on tensor cores), "fp32" (IEEE fp32 on the FMA units). Kinds: "gemm", operands
    # loaded as they are (encoder and decoder forward); "fused", an operand formed in
    # registers from two or three loads (the four backward products), which needs more
    # registers and more shared memory per stage. Checked by bench/compile_check.py: no
    # spills, shared memory within SHARED_LIMIT, tensor-core instructions where they apply.
    ("sm_90", "16", "gemm"): _T(128, 128, 64, 8, 4),
    ("sm_90", "16", "fused"): _T(128, 128, 64, 8, 3),
    ("sm_90", "tf32", "gemm"): _T(128, 128, 32, 8, 4),
    ("sm_90", "tf32", "fused"): _T(128, 128, 32, 8, 3),
    ("sm_90", "fp32", "gemm"): _T(64, 64, 32, 8, 3),
    ("sm_90", "fp32", "fused"): _T(64, 32, 16, 4, 2),
    ("sm_80", "16", "gemm"): _T(128, 128, 32, 8, 4),
    ("sm_80", "16", "fused"): _T(128, 128, 32, 8, 3),
    ("sm_80", "tf32", "gemm"): _T(128, 128, 32, 8, 3),
    ("sm_80", "tf32", "fused"): _T(128, 64, 32, 8, 3),
    ("sm_80", "fp32", "gemm"): _T(64, 64, 32, 8, 3),
    ("sm_80", "fp32", "fused"): _T(64, 32, 16, 4, 2),
    ("sm_89", "16", "gemm"): _T(128, 128, 32, 8, 3),
    ("sm_89", "16", "fused"): _T(128, 64, 32, 4, 2),
    ("sm_89", "tf32", "gemm"): _T(128, 64, 32, 4, 3),
    ("sm_89", "tf32", "fused"): _T(64, 64, 32, 4, 2),
    ("sm_89", "fp32", "gemm"): _T(64, 64, 32, 8, 3),
    ("sm_89", "fp32", "fused"): _T(64, 32, 16, 4, 2),
    # "orth_fwd" / "orth_bwd": one ORTH_TILE² tile of W1 W2ᵀ per program (the backward's
    # also forms and stores its G tile); BLOCK_K and the options vary.
    **{(fam, "16", kind): _T(ORTH_TILE, ORTH_TILE, 64, 4 if fam == "sm_90" else 8, 3)
       for fam in ("sm_80", "sm_89", "sm_90") for kind in ("orth_fwd", "orth_bwd")},
    **{(fam, "tf32", kind): _T(ORTH_TILE, ORTH_TILE, 32, 4, 3)
       for fam in ("sm_80", "sm_89", "sm_90") for kind in ("orth_fwd", "orth_bwd")},
    **{(fam, "fp32", kind): _T(ORTH_TILE, ORTH_TILE, 16, 4, 3)
       for fam in ("sm_80", "sm_89", "sm_90") for kind in ("orth_fwd", "orth_bwd")},
    # "orth_reduce": a (ORTH_TILE, BLOCK_N) block of an orthogonality gradient, reducing
    # over its group's G tiles one ORTH_TILE-deep product at a time.
    **{(fam, ops, "orth_reduce"): _T(ORTH_TILE, 128 if ops == "16" else 64, ORTH_TILE, 4 if ops == "16" else 8, 2)
       for fam in ("sm_80", "sm_89", "sm_90") for ops in ("16", "tf32", "fp32")},
    # The pair kernels (sparse.py), gathers on the FMA units: "gather", a (1, BLOCK_N) block
    # of d reducing over BLOCK_K pairs per step; "pair_dot", BLOCK_M pairs reducing over d
    # in BLOCK_K chunks. BLOCK_M of "gather" is unused.
    **{(fam, ops, "gather"): _T(16, 256 if ops == "16" else 128, 16, 4, 2)
       for fam in ("sm_80", "sm_89", "sm_90") for ops in ("16", "tf32", "fp32")},
    **{(fam, ops, "pair_dot"): _T(32, 16, 128 if ops == "16" else 64, 4, 2)
       for fam in ("sm_80", "sm_89", "sm_90") for ops in ("16", "tf32", "fp32")},
}

_INTERPRETED = TileConfig(32, 32, 32, 4, 1)
"""Interpreter tiles: small, so the CPU tests' shapes span several tiles, groups and K steps."""

L2_BUDGET = 24 * 2**20
"""Bytes of row operand a launch group keeps in L2 (H100 50 MB, A100 40 MB, L40S 96 MB)."""


def operand_kind(dtype: torch.dtype) -> str:
    """The CONFIGS operand key of ``dtype`` under torch's current fp32 matmul precision."""
    if dtype != torch.float32:
        return "16"
    return "tf32" if dot_precision(dtype) == "tf32" else "fp32"


def arch_family(device: torch.device) -> str:
    """The config family of ``device``'s GPU (the compile target inside ``compile_only``)."""
    if _COMPILE_ONLY is not None:
        return ARCHS[_COMPILE_ONLY[0]]
    major, minor = torch.cuda.get_device_capability(device)
    cap = 10 * major + minor
    if cap not in ARCHS:
        name = torch.cuda.get_device_name(device)
        raise UnsupportedArchError(
            f"{name} is sm_{cap}; the Triton kernels are configured and checked for sm_80 (A100), "
            "sm_86/sm_89 (A10, RTX 30xx/40xx, L40S) and sm_90 (H100/H200); use --backend torch")
    return ARCHS[cap]


class UnsupportedArchError(RuntimeError):
    """A GPU whose architecture has no checked kernel configs."""


def _fit(block: int, size: int) -> int:
    """Tile side for a dimension of ``size``: its next power of two capped at ``block``, and
    at least 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def tile_config(kind: str, dtype: torch.dtype, kernel: object, device: torch.device,
                M: int, N: int, K: int) -> TileConfig:
    """The tiles of a ``kind`` ("gemm" or "fused") product, output M × N reducing over K,
    with ``dtype`` operands on ``device`` (the interpreter's when ``kernel`` is interpreted),
    each side cut down to the problem's next power of two."""
    cfg = _INTERPRETED if interpreted(kernel) else CONFIGS[arch_family(device), operand_kind(dtype), kind]
    return TileConfig(_fit(cfg.BLOCK_M, M), _fit(cfg.BLOCK_N, N), _fit(cfg.BLOCK_K, K), cfg.num_warps, cfg.num_stages)


def group_size(kernel: object, n_rows: int, row_strip_bytes: int) -> int:
    """``group`` for ``tile_ids``: as many row tiles as keep their row-operand strips (K long,
    ``row_strip_bytes`` each) within L2_BUDGET, at most all of them, at least 1. The column
    operand then streams from memory once per group: once in all when every row tile fits,
    as at B = 4,096, d = 2,304 in bf16 (32 strips of 576 KiB). Interpreted: 2, so that the
    tests' few tiles still form several groups."""
    if interpreted(kernel):
        return 2
    return max(1, min(n_rows, L2_BUDGET // max(1, row_strip_bytes)))


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a @triton.jit function) runs in Triton's CPU interpreter."""
    return isinstance(kernel, InterpretedFunction)


def interp_bf16(kernel: object, dtype: torch.dtype) -> bool:
    """The INTERP_BF16 constexpr: bf16 operands under the interpreter (see the module doc)."""
    return interpreted(kernel) and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands follow torch's matmul setting (TF32 only when
    ``torch.set_float32_matmul_precision`` allows it); 16-bit operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def launch(kernel: object, n_programs: int, cfg: TileConfig, dtype: torch.dtype, *args: object,
           **consts: object) -> None:
    """Run ``kernel`` on a 1-D grid of ``n_programs`` with ``cfg``'s tiles and launch options,
    the operand ``dtype``'s INTERP_BF16 and PRECISION, and ``consts``. The one place kernels
    are launched; inside ``compile_only`` it compiles for the target instead of running."""
    meta = dict(INTERP_BF16=interp_bf16(kernel, dtype), PRECISION=dot_precision(dtype), **consts)
    names = kernel.arg_names
    meta.update({k: getattr(cfg, k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in names})
    if _COMPILE_ONLY is not None:
        compiled = kernel.warmup(*args, grid=(n_programs,), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
        _COMPILE_ONLY[1].append((compiled, cfg, consts))
        return
    kernel[(n_programs,)](*args, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)


class _TargetDriver:
    """What Triton's JIT asks of the driver to compile (never to run) for a GPU target."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch  # one JIT cache per target

    def get_current_stream(self, device: int) -> int:
        return 0


_COMPILE_ONLY: tuple[int, list] | None = None


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list]:
    """Within this block the ops accept CPU tensors (whose contents are never read) and
    compile each kernel they would launch for compute capability ``arch`` (80, 89, 90),
    with the launchers' own tiles, grids and argument specialization, without a GPU. Yields
    the list that collects (``triton.compiler.CompiledKernel``, TileConfig, mode constexprs)
    per launch."""
    global _COMPILE_ONLY
    from triton.runtime.driver import driver

    if interpreted(mma):
        raise RuntimeError("compile_only needs compiled kernels: unset TRITON_INTERPRET before importing triton")
    old, _COMPILE_ONLY = _COMPILE_ONLY, (arch, [])
    old_driver = driver._active  # None on a machine without a GPU: there is no default to reset to
    driver.set_active(_TargetDriver(arch))
    try:
        yield _COMPILE_ONLY[1]
    finally:
        driver.set_active(old_driver)
        _COMPILE_ONLY = old


# -- host-side checks ------------------------------------------------------------------


def check_inputs(op: str, kernel: object, tensors: dict[str, torch.Tensor],
                 shapes: dict[str, tuple[str, ...]], same_dtype: tuple[str, ...]) -> tuple[torch.dtype, dict[str, int]]:
    """Raise a clear error unless every tensor has its expected shape, is contiguous,
    16-byte aligned and non-empty, sits on one device the kernels can run on, and the ``same_dtype`` group shares
    one of ``DTYPES`` (the others must be floating point).

    ``shapes`` names each dimension, e.g. ``{"x": ("B", "d"), "W": ("d", "m")}``; a name is
    bound by its first appearance and must match everywhere else. Returns the common dtype
    and the bound sizes.
    """
    sizes: dict[str, int] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor (got {type(t).__name__})")
        dims = shapes[name]
        if t.dim() != len(dims):
            raise ValueError(f"{op}: {name} must be {len(dims)}-D {dims} (got shape {tuple(t.shape)})")
        for dim, size in zip(dims, t.shape):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {dim} = {sizes[dim]} "
                                 f"elsewhere; expected {name} of shape {dims}")
        if t.numel() == 0:
            raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first)")
        if t.device.type != "meta" and t.data_ptr() % 16:
            raise ValueError(f"{op}: {name} starts {t.data_ptr() % 16} bytes past a 16-byte boundary (a view at an "
                             f"odd offset); pass {name}.clone(), which the kernels' vector loads need")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor (got {t.dtype})")
    dtype = tensors[same_dtype[0]].dtype
    if dtype not in DTYPES:
        raise TypeError(f"{op}: {same_dtype[0]} has dtype {dtype}; supported: float32, bfloat16, float16")
    for name in same_dtype[1:]:
        if tensors[name].dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {tensors[name].dtype} but {same_dtype[0]} has {dtype}; "
                            "cast them to one dtype")
    check_device(op, kernel, tensors)
    return dtype, sizes


def check_device(op: str, kernel: object, tensors: dict[str, torch.Tensor]) -> None:
    """All tensors on one device: CUDA, or the CPU when the kernels are interpreted."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"{op}: all tensors must be on one device ({where})")
    device = devices.pop()
    if device.type == "cuda":
        if device.index != torch.cuda.current_device():  # Triton launches on the current device
            raise ValueError(f"{op}: tensors are on {device} but the current device is "
                             f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device({device.index})")
        return
    if device.type == "cpu" and (interpreted(kernel) or _COMPILE_ONLY is not None):
        return
    if device.type == "cpu":
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors; to run them on the CPU, set "
                         "TRITON_INTERPRET=1 before triton is imported (slow; for tests), or use the "
                         "torch backend")
    raise ValueError(f"{op}: tensors on {device} are not supported; use CUDA tensors")


# -- outputs ---------------------------------------------------------------------------


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that a kernel writes completely: ``torch.empty``, or poison (NaN, or
    the most negative int32) inside ``poisoned_outputs()`` so tests see any unwritten element."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = math.nan if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this block every ``alloc`` returns poison instead of uninitialized memory."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def nvtx_range(name: str) -> nvtx.annotate:
    """An NVTX range (decorator or context manager) in the ``esosae`` domain; without a
    profiler attached the NVTX library turns it into a no-op."""
    return nvtx.annotate(message=name, domain="esosae")
