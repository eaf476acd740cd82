"""Every kernel compiles for sm_80, sm_89 and sm_90 on a machine without a GPU, with the
launchers' own configs, and the compiler's output passes the GPU path's checks.

The interpreter accepts programs the compiler rejects (layouts, dot shapes, types), and
only a compile shows registers, spills, shared memory and whether tensor cores are used.
``bench/compile_check.py`` compiles every kernel × {bf16, fp16, tf32, fp32} × {sm_80,
sm_89, sm_90} at the default and a large shape through ``compile_only`` (the real launchers,
grids and argument specialization) and reads each cubin; here it runs in a subprocess
(this process interprets kernels) with a fresh Triton cache, so it is a real compile.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"_encode_fwd_kernel", "_encode_bwd_dx_kernel", "_encode_bwd_dw_kernel", "_encode_bwd_theta_kernel",
           "_decode_fwd_kernel", "_decode_bwd_df_kernel", "_decode_bwd_dw_kernel", "_orth_fwd_kernel",
           "_orth_grad_tile_kernel", "_orth_reduce_kernel", "_row_gather_kernel", "_pair_dot_kernel",
           "_segment_sum_kernel"}
GATHERS = {"_row_gather_kernel", "_pair_dot_kernel", "_segment_sum_kernel"}  # no tensor cores expected


@pytest.mark.slow  # about 3 minutes on 2 cores: 204 compilations
def test_every_kernel_compiles_without_spills_within_shared_memory_on_tensor_cores(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "compile.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compile_check.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| sm_")]
    seen = {}
    for arch, precision, shapes, kernel, _tiles, regs, spills, _stack, shared, tc_ops in rows:
        arch, name = arch.strip("| "), re.sub(r"`| \(.*", "", kernel)
        seen.setdefault((arch, precision), set()).add(name)
        assert int(spills) == 0 and int(regs) <= 255, (arch, precision, kernel)
        used, limit = (int(v.replace(",", "")) for v in re.match(r"([\d,]+) \(([\d,]+)\)", shared).groups())
        assert used <= limit, (arch, precision, kernel, shared)
        if precision != "fp32" and name not in GATHERS:
            assert int(tc_ops.strip(" |")) > 0, (arch, precision, kernel)
        assert set(shapes.split(", ")) <= {"default", "large"}
    assert set(seen) == {(a, p) for a in ("sm_80", "sm_89", "sm_90") for p in ("bf16", "fp16", "tf32", "fp32")}
    assert all(names == KERNELS for names in seen.values())


def test_the_committed_table_is_the_checks_output_and_passes():
    """bench/results/compile.md is the check's own output (regenerate it with
    ``python bench/compile_check.py`` after changing a config) and reports no failure."""
    text = (REPO / "bench" / "results" / "compile.md").read_text()
    assert re.search(r"\*\*\d+ compilations, 0 failing checks\.\*\*", text)
    assert "❌" not in text
