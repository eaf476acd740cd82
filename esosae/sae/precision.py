"""The precision of the SAE's products (``--dtype``): what is cast, what stays fp32.

    bf16, fp16   the kernels' GEMM operands (x, W_enc, b_enc, b_dec, f, W_dec and the
                 gradients flowing between them) in 16 bits: tensor cores, fp32 accumulate
    tf32         fp32 operands, products on the tensor cores' TF32 path (10-bit mantissa
                 inputs, fp32 accumulate): torch.set_float32_matmul_precision("high")
    fp32         IEEE fp32 products (matmul precision "highest")
    auto         bf16 on CUDA, fp32 on the CPU

Always fp32, whatever the choice: the master weights (nn.Parameters) and Adam's state, the
gradients the optimizer sees (autograd casts them back through the ``.to`` of each step),
the thresholds θ and margins μ, and the reductions the kernels return (row L1, squared
error, fire counts). The decoder-norm constraint and the margin updates act on the fp32
master copies, so they are exact. The 16-bit casts are recomputed every step from the
master weights (one read of each weight, one 16-bit write).

On the CPU only fp32 runs, except under TRITON_INTERPRET=1 with the triton backend (the
interpreter, for tests of the mixed-precision path).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from esosae.config import Dtype, choices
from esosae.errors import UserError

CHOICES = choices(Dtype)  # declared once, in esosae.config
_OPERAND = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


class PrecisionError(UserError):
    """A --dtype this device and backend cannot run; the message says what to pass."""


def resolve(name: str, device: torch.device, backend: str) -> str:
    """The concrete precision of ``name`` on ``device`` with ``backend`` ('torch' or 'triton')."""
    if name not in CHOICES:
        raise PrecisionError(f"--dtype must be one of {', '.join(CHOICES)} (got {name!r})")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and name != "fp32" and backend != "triton":
        raise PrecisionError(f"--dtype {name} runs on CUDA; on the CPU use --dtype fp32 (or auto)")
    return name


def operand_dtype(name: str) -> torch.dtype:
    """The dtype the kernels' operands are cast to for a resolved precision ``name``."""
    return _OPERAND[name]


@contextlib.contextmanager
def matmul_precision(name: str) -> Iterator[None]:
    """Within this block fp32 products use TF32 for ``tf32`` and IEEE fp32 otherwise (the
    Triton kernels read the same setting); the previous setting is restored after."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
