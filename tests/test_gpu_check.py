"""bench/gpu_check.sh end to end in its dry mode (CPU, interpreter, tiny shapes), and the parts of
bench/gpu_check.py that a dry run cannot reach on the CPU: budget skipping, the determinism
comparison, the error check's failures and the compiled-kernel inspection."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OPS = {"encoder fwd", "encoder fwd+bwd", "decoder fwd", "decoder fwd+bwd", "orth fwd", "orth fwd+bwd",
       "orth sampled fwd+bwd", "train step"}
TIMED = ("ours", "eager", "compile", "max-autotune")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def op_kind(op: str) -> str:
    return op.split(" (")[0]


@pytest.mark.slow  # the whole script under the interpreter
def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["env"]["device"] == "cpu (dry run)"
    assert {"driver", "cuda", "torch", "triton", "date", "capability"} <= result["env"].keys()
    assert len(result["shapes"]) == 2 and result["precisions"] == ["bf16", "tf32"]
    pair_rows = [r for r in result["rows"] if r["op"].startswith("pairs vs dense")]
    assert {r["shape"] for r in pair_rows} == {result["shapes"][0]}  # the large shape only
    assert {(r["op"].split(": ")[1], r["precision"], r["provider"]) for r in pair_rows} == {
        (f"encoder→decoder fwd+bwd {label}", p, provider) for label in ("L0=8", "L0=32", "L0=1.28 (crossover)")
        for p in ("bf16", "tf32") for provider in ("ours", "ours-dense")}  # m = 128: L0 128 is half of it
    providers: dict[tuple[str, str, str], set[str]] = {}
    for row in result["rows"]:
        key = (op_kind(row["op"]), row["shape"], row["precision"])
        providers.setdefault(key, set()).add(row["provider"])
        if row["provider"] == "saelens":
            assert "skipped" in row or "ms" in row  # skipped where sae_lens does not import
            continue
        assert "skipped" not in row and "error" not in row, row
        assert 0 < row["ms_q20"] <= row["ms"] <= row["ms_q80"] and math.isfinite(row["ms_q80"])
        assert row["tflops"] > 0 and row["pct_of_cublas"] > 0 and row["first_call_s"] > 0
        assert row["peak_mib"] is None and row["cublas"] in result["cublas_tflops"]  # no CUDA memory stats
    assert {k[0] for k in providers} - {op_kind(r["op"]) for r in pair_rows} == OPS
    for (op, _, _), names in providers.items():
        if op.startswith("pairs vs dense"):
            continue
        assert names == set(TIMED) | ({"saelens"} if op == "train step" else set()), (op, names)
    checked = {(op_kind(c["case"].split(" d=")[0])) for c in result["checks"]}
    assert checked == {"encoder fwd+bwd", "decoder fwd+bwd", "orth fwd+bwd", "orth sampled fwd+bwd"}
    assert len(result["checks"]) == 4 * 2 * 2 and all(c["ok"] for c in result["checks"]), result["checks"]
    encoder = next(c for c in result["checks"] if c["case"].startswith("encoder"))["tensors"]
    assert set(encoder) == {"f", "row_l1", "fire_count", "grad_x", "grad_W_enc", "grad_b_enc", "grad_b_dec"}
    assert encoder["fire_count"]["mismatches"] == 0 and 0 < encoder["f"]["max_abs"] <= encoder["f"]["bound"]
    assert len(result["determinism"]) == 5 * 2 * 2
    assert all(d["differing"] == [] for d in result["determinism"])  # the interpreter runs in one order
    assert result["kernels"] == []  # interpreted: nothing compiled
    assert {t["issue"] for t in result["targets"]} == {3, 12, 15}
    pair_targets = [t for t in result["targets"] if t["target"].startswith("pairs vs dense")]
    assert len(pair_targets) == 3 and [t["met"] for t in pair_targets].count(None) == 1  # the crossover: no goal
    assert {t["target"] for t in result["targets"]} >= {"encoder fwd: % of cuBLAS",
                                                         "encoder fwd+bwd: speed-up over compile"}
    md = out.with_suffix(".md").read_text()
    for section in ("## Timings", "## Targets", "## Output checks", "## Determinism", "## Compiled kernels"):
        assert section in md and section in proc.stdout
    assert "| train step d=32 m=128 B=32 tf32 |" in md and "Dry run" in md


def test_gpu_check_out_of_budget_skips_every_case_with_a_note(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    timed = [r for r in result["rows"] if r["provider"] != "saelens"]
    pairs = 3 * 2 * 2  # three densities × two precisions × ours and ours-dense, large shape only
    assert len(timed) == len(OPS) * 2 * 2 * len(TIMED) + pairs
    assert all(r["skipped"].startswith("time budget:") for r in timed)
    assert result["checks"] == [] and result["determinism"] == [] and result["targets"] == []
    assert sum("checks skipped (time budget" in n for n in result["notes"]) == 5 * 2 * 2
    md = out.with_suffix(".md").read_text()
    assert "## Skipped and failed" in md and "skipped (time budget" in md


def test_budget_estimates_each_kind_from_its_longest_case(gpu_check):
    bench = gpu_check.Bench(torch.device("cpu"), budget_s=100, priors={"compile": 45.0})
    assert bench.skip_reason("ours") is None and bench.skip_reason("compile") is None
    bench.took("compile", 120.0)
    bench.took("compile", 10.0)  # the longest so far counts
    assert "a compile case takes ~120 s" in bench.skip_reason("compile")
    assert bench.skip_reason("eager") is None
    bench.budget_s = 0
    assert bench.skip_reason("eager").startswith("time budget: 0 s of 0 s left")


def test_determinism_names_what_differs_in_any_bit(gpu_check):
    a = {"f": torch.tensor([1.0, 0.0]), "grad": torch.ones(2, 3), "none": None, "nan": torch.tensor([math.nan])}
    assert gpu_check.differing(a, {k: None if v is None else v.clone() for k, v in a.items()}) == []
    b = {**a, "f": torch.tensor([1.0, -0.0]), "grad": torch.nextafter(torch.ones(2, 3), torch.tensor(2.0))}
    assert gpu_check.differing(a, b) == ["f", "grad"]  # −0 and one ulp count
    assert gpu_check.differing(a, {**a, "none": torch.zeros(1)}) == ["none"]
    assert gpu_check.differing(a, {**a, "grad": torch.ones(3, 2)}) == ["grad"]
    assert gpu_check.differing({"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)}) == ["x"]


def test_error_check_applies_the_2x_rule(gpu_check):
    torch.manual_seed(0)
    ref = {"y": torch.randn(64, dtype=torch.float64), "fire_count": torch.arange(4, dtype=torch.int32)}
    low = {"y": ref["y"].bfloat16(), "fire_count": ref["fire_count"]}
    base = (low["y"].double() - ref["y"]).abs().max().item()
    good = gpu_check.error_check(low, ref, low, "bf16")
    assert good["ok"] and good["tensors"]["y"]["max_abs"] == base and good["tensors"]["fire_count"]["mismatches"] == 0
    worse = {"y": ref["y"] + 4 * base + 2**-9 * ref["y"].abs().max(), "fire_count": ref["fire_count"] + 1}
    bad = gpu_check.error_check(worse, ref, low, "bf16")
    assert not bad["ok"] and not bad["tensors"]["y"]["ok"] and bad["tensors"]["fire_count"]["mismatches"] == 4
    nan = gpu_check.error_check({**low, "y": torch.full((64,), math.nan)}, ref, low, "bf16")
    assert not nan["tensors"]["y"]["ok"]
    assert not gpu_check.error_check({"g": None}, {"g": torch.ones(1)}, {"g": torch.ones(1)}, "tf32")["ok"]


class FakeCompiled:
    """What a CompiledKernel offers: metadata, src (signature, constants) and lazily loaded handles."""

    def __init__(self, dtype: str, block: int):
        self.metadata = SimpleNamespace(num_warps=8, num_stages=3, shared=98304)
        self.src = SimpleNamespace(signature={"x_ptr": f"*{dtype}", "n": "i32", "BLOCK": "constexpr",
                                              "INTERP_BF16": "constexpr"},
                                   constants={(2,): block, (3,): False})
        self.n_regs = self.n_spills = None

    def _init_handles(self):
        self.n_regs, self.n_spills = 232, 0


def test_kernel_variants_reads_registers_spills_and_shared_memory(gpu_check):
    future = SimpleNamespace(result=lambda: FakeCompiled("fp32", 64))  # an asynchronous compile
    fn = SimpleNamespace(__name__="_fake_kernel", arg_names=["x_ptr", "n", "BLOCK", "INTERP_BF16"],
                         device_caches={0: ({"k1": FakeCompiled("bf16", 128), "k2": future}, {"k": "v"}, "target")})
    rows = gpu_check.kernel_variants(fn)
    assert [(r["dtype"], r["config"]) for r in rows] == [("bf16", "BLOCK=128"), ("fp32", "BLOCK=64")]
    assert all(r["kernel"] == "_fake_kernel" and r["n_regs"] == 232 and r["n_spills"] == 0 for r in rows)
    assert rows[0]["shared_bytes"] == 98304 and rows[0]["num_warps"] == 8 and rows[0]["num_stages"] == 3
    result = {"env": {k: "x" for k in ("device", "date", "capability", "driver", "cuda", "torch", "triton",
                                       "python", "started")},
              "dry_run": False, "wall_s": 1.0, "budget_s": 2.0, "rows": [], "cublas_tflops": {}, "checks": [],
              "determinism": [{"case": "orth fwd+bwd", "differing": ["grad_W1"]}], "kernels": rows,
              "targets": [], "notes": []}
    md = gpu_check.markdown(result)
    assert "| _fake_kernel | bf16 | BLOCK=128 | 8 | 3 | 232 | 0 | 96.0 |" in md
    assert "| orth fwd+bwd | NO | grad_W1 |" in md


def test_no_jit_function_is_compiled_under_the_interpreter(gpu_check):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert gpu_check.jit_functions() == []  # InterpretedFunction keeps no device caches


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_or_dry_run_says_so():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
