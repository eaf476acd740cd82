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
from triton.runtime.interpreter import InterpretedFunction

ORTH_TILE = 64
"""Side of the square tiles of W_dec1 W_dec2ᵀ; equals ``esosae.reference.ORTH_TILE`` (tested)."""

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
def tile_ids(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Grouped launch order (Triton's matmul tutorial): GROUP consecutive row tiles walk the
    column tiles together, so the column operand they share is reused from L2."""
    width = GROUP * n_cols
    first = (pid // width) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


# -- launch configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one tiled product (M × K) @ (K × N) and the launch options."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP: int
    num_warps: int
    num_stages: int


def _fit(block: int, size: int) -> int:
    """Tile side for a dimension of ``size``: its next power of two, capped at ``block``, and
    at least 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, interpret: bool) -> MatmulConfig:
    """Tiles for a product with output M × N and reduction K.

    Compiled: 128×128×64 tiles, 8 warps, 3 stages for 16-bit operands (tensor cores);
    64×64×32, 4 warps for fp32. Interpreted: 32×32×32 tiles in groups of 2, so that the small
    shapes of the CPU tests still span several tiles, groups and reduction steps.
    """
    if interpret:
        return MatmulConfig(_fit(32, M), _fit(32, N), _fit(32, K), 2, 4, 1)
    if dtype == torch.float32:
        return MatmulConfig(_fit(64, M), _fit(64, N), _fit(32, K), 8, 4, 3)
    return MatmulConfig(_fit(128, M), _fit(128, N), _fit(64, K), 8, 8, 3)


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


# -- host-side checks ------------------------------------------------------------------


def check_inputs(op: str, kernel: object, tensors: dict[str, torch.Tensor],
                 shapes: dict[str, tuple[str, ...]], same_dtype: tuple[str, ...]) -> tuple[torch.dtype, dict[str, int]]:
    """Raise a clear error unless every tensor has its expected shape, is contiguous and
    non-empty, sits on one device the kernels can run on, and the ``same_dtype`` group shares
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
    if device.type == "cpu" and interpreted(kernel):
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
