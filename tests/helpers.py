"""What the tests share: the device the kernels run on, and one tolerance policy.

The policy (STYLE.md), for a result against its float64 reference ``ref``:

    fp32                 max|out − ref| ≤ FP32_TOL · max|ref|
    bf16, fp16, tf32     max|out − ref| ≤ 2 · max|low − ref| + u · max|ref|

where ``low`` is the plain PyTorch reference run in the same precision (flash-attention's
2× rule) and u the precision's unit roundoff (the floor for quantities that torch's path
happens to get exactly). FP32_TOL = 1e-5 is the rounding of fp32 sums of up to a few
thousand terms, relative to the result's scale; integer results (fire counts) must be
equal. Outputs are poisoned with NaN before a kernel writes them (the ``poisoned`` fixture
in conftest.py), so an unwritten element fails here.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
"""Where kernel tests run: the GPU, or the CPU under Triton's interpreter."""

F64 = torch.float64
FP32_TOL = 1e-5
UNIT_ROUNDOFF = {"fp32": 0.0, "bf16": 2**-9, "fp16": 2**-11, "tf32": 2**-11}  # 8, 11 and 11 significant bits
PRECISION_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def assert_matches(out: dict, ref: dict, low: dict | None = None, precision: str = "fp32") -> None:
    """Every tensor of ``out`` against the float64 ``ref`` by the policy above; ``low`` (the
    reference run in ``precision``) is needed for everything but fp32."""
    assert out.keys() == ref.keys(), (sorted(out), sorted(ref))
    for key, r in ref.items():
        o = out[key]
        if not o.is_floating_point():
            assert o.dtype == torch.int32 and torch.equal(o, r.to(torch.int32)), key
            continue
        assert not o.isnan().any(), f"{key}: unwritten (NaN-poisoned) elements"
        err = (o.double() - r).abs().max().item()
        scale = r.abs().max().item()
        if precision == "fp32":
            assert err <= FP32_TOL * scale, f"{key}: error {err:.3g} > {FP32_TOL} × {scale:.3g}"
        else:
            base = (low[key].double() - r).abs().max().item()
            floor = UNIT_ROUNDOFF[precision] * scale
            assert err <= 2 * base + floor, f"{key}: error {err:.3g} > 2 × torch's {base:.3g} + {floor:.3g}"


def assert_close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Two fp32 results of the same math summed in different orders: the fp32 rule, with
    ``b`` as the reference."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert_matches({name: a}, {name: b.double()})
