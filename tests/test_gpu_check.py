"""bench/gpu_check.sh runs end to end in its dry mode (CPU, interpreter, tiny shapes)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = {"ours", "eager", "compile"}


def test_gpu_check_dry_run_writes_the_table(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["device"] == "cpu (dry run)"
    cases = {}
    for row in result["rows"]:
        assert "skipped" not in row, row
        assert 0 < row["ms_q20"] <= row["ms"] <= row["ms_q80"] and math.isfinite(row["ms_q80"])
        assert row["tflops"] > 0 and row["pct_of_gemm"] > 0 and row["peak_mib"] is None  # no CUDA memory stats
        cases.setdefault(row["case"], set()).add(row["provider"])
    assert all(providers == PROVIDERS for providers in cases.values())
    kinds = {case.split(" d=")[0].split(" m1=")[0] for case in cases}
    assert kinds == {"encoder fwd", "encoder fwd+bwd", "orth fwd+bwd", "train step"}
    assert result["gemm_tflops"] and all(v > 0 for v in result["gemm_tflops"].values())
    assert {t["target"].split(":")[1].strip() for t in result["targets"]} >= {
        "speed-up over eager", "speed-up over compile", "% of GEMM rate", "time / three GEMMs"}
    assert "train step" in proc.stdout and "targets:" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_or_dry_run_says_so():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
