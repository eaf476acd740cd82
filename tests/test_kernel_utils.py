"""The kernels' shared pieces, and the interpreter trap their bf16 handling works around."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from esosae.kernels import utils

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="checks Triton's CPU interpreter")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, INTERP_BF16: tl.constexpr):
    r = tl.arange(0, N)
    offs = r[:, None] * N + r[None, :]
    c = utils.mma(tl.zeros((N, N), tl.float32), tl.load(a_ptr + offs), tl.load(b_ptr + offs), INTERP_BF16, "ieee")
    tl.store(c_ptr + offs, c)


@triton.jit
def _cast_kernel(x_ptr, plain_ptr, rounded_ptr, N: tl.constexpr, INTERP_BF16: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r)
    tl.store(plain_ptr + r, x.to(tl.bfloat16))
    tl.store(rounded_ptr + r, utils.round_to(x, tl.bfloat16, INTERP_BF16))


@triton.jit
def _tile_ids_kernel(out_ptr, n_rows, n_cols, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    r, c = utils.tile_ids(pid, n_rows, n_cols, GROUP)
    tl.store(out_ptr + 2 * pid, r)
    tl.store(out_ptr + 2 * pid + 1, c)


def _dot(a: torch.Tensor, b: torch.Tensor, interp_bf16: bool) -> torch.Tensor:
    c = torch.empty(a.shape, dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, N=a.shape[0], INTERP_BF16=interp_bf16)
    return c


def _rel_err(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    ref = a.double() @ b.double()
    return ((c.double() - ref).abs().max() / ref.abs().max()).item()


@interpreter_only
def test_interpreter_trap_bf16_dot_is_still_wrong():
    """The trap itself (triton 3.9): a raw bf16 tl.dot under the interpreter is garbage.
    If this test fails, the interpreter got fixed and INTERP_BF16's widening can go."""
    a, b = torch.randn(32, 32).bfloat16(), torch.randn(32, 32).bfloat16()
    assert _rel_err(_dot(a, b, interp_bf16=False), a, b) > 1.0


@interpreter_only
def test_interpreter_trap_bf16_cast_still_truncates():
    """The second face of the trap: fp32 → bf16 casts truncate instead of rounding to
    nearest even. If this fails, the interpreter got fixed and round_to's hand rounding can go."""
    x = torch.randn(1024)
    plain, rounded = torch.empty(1024, dtype=torch.bfloat16), torch.empty(1024, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, plain, rounded, N=1024, INTERP_BF16=True)
    assert torch.equal(plain, _truncate_to_bf16(x))
    assert not torch.equal(plain, x.bfloat16())


def _truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & -65536).view(torch.float32).bfloat16()


@interpreter_only
def test_workaround_makes_interpreted_bf16_dot_right():
    a, b = torch.randn(32, 32).bfloat16(), torch.randn(32, 32).bfloat16()
    assert _rel_err(_dot(a, b, interp_bf16=True), a, b) < 1e-6
    for dtype in (torch.float16, torch.float32):  # these were never affected
        a16, b16 = a.to(dtype), b.to(dtype)
        assert _rel_err(_dot(a16, b16, interp_bf16=False), a16, b16) < 1e-6


@interpreter_only
def test_round_to_rounds_to_nearest_even_like_torch():
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                            3.3895e38, -2.5e-3])
    x = torch.cat([special, torch.randn(1015) * torch.logspace(-30, 30, 1015)])
    plain, rounded = torch.empty(1024, dtype=torch.bfloat16), torch.empty(1024, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, plain, rounded, N=1024, INTERP_BF16=True)
    want = x.bfloat16()
    assert torch.equal(rounded.view(torch.int16)[1:], want.view(torch.int16)[1:])  # bit-exact, signed zeros too
    assert rounded[0].isnan()


@interpreter_only
@pytest.mark.parametrize("n_rows,n_cols,group", [(1, 3, 2), (5, 3, 2), (7, 4, 8), (6, 1, 4)])
def test_tile_ids_visit_every_tile_once(n_rows, n_cols, group):
    out = torch.full((n_rows * n_cols, 2), -1, dtype=torch.int32)
    _tile_ids_kernel[(n_rows * n_cols,)](out, n_rows, n_cols, GROUP=group)
    assert sorted(map(tuple, out.tolist())) == [(r, c) for r in range(n_rows) for c in range(n_cols)]


def test_interp_bf16_flag_only_for_interpreted_bf16():
    assert utils.interp_bf16(_dot_kernel, torch.bfloat16) == INTERPRET
    assert not utils.interp_bf16(_dot_kernel, torch.float16)
    assert not utils.interp_bf16(_dot_kernel, torch.float32)


FAMILIES = ("sm_80", "sm_89", "sm_90")
KINDS = ("gemm", "fused", "orth_fwd", "orth_bwd", "orth_reduce", "gather", "pair_dot")


def test_every_family_has_a_config_for_every_kernel_and_precision():
    assert set(utils.CONFIGS) == {(f, o, k) for f in FAMILIES for o in ("16", "tf32", "fp32") for k in KINDS}
    assert set(utils.ARCHS.values()) == set(FAMILIES) == set(utils.SHARED_LIMIT)
    for (fam, ops, kind), cfg in utils.CONFIGS.items():
        for block in (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K):
            assert block >= 16 and block & (block - 1) == 0  # tl.dot needs powers of two ≥ 16
        assert cfg.num_warps in (4, 8) and 1 <= cfg.num_stages <= 4
        if kind in ("orth_fwd", "orth_bwd"):
            assert cfg.BLOCK_M == cfg.BLOCK_N == utils.ORTH_TILE  # one program owns one whole tile
        if kind == "orth_reduce":
            assert cfg.BLOCK_M == cfg.BLOCK_K == utils.ORTH_TILE  # a tile's rows, one G tile deep
        # the pipeline's operand buffers alone fit the family's shared memory (16-bit or 32-bit elements)
        size = 2 if ops == "16" else 4
        assert cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * size <= utils.SHARED_LIMIT[fam]


def test_operand_kind_follows_dtype_and_matmul_precision():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert [utils.operand_kind(t) for t in (torch.bfloat16, torch.float16, torch.float32)] == ["16", "16", "fp32"]
        torch.set_float32_matmul_precision("high")
        assert utils.operand_kind(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (37, 200, 48), (4096, 16384, 2304)])
def test_tile_config_fits_the_problem(M, N, K):
    cfg = utils.tile_config("gemm", torch.float32, _dot_kernel, torch.device("cpu"), M, N, K)
    for block, size in ((cfg.BLOCK_M, M), (cfg.BLOCK_N, N), (cfg.BLOCK_K, K)):
        assert 16 <= block <= max(16, triton.next_power_of_2(size)) and block & (block - 1) == 0


def test_group_size_keeps_the_row_strips_within_l2():
    compiled = object()  # not an interpreted function: the compiled rule
    assert utils.group_size(compiled, 32, 2304 * 128 * 2) == 32  # B 4,096 × d 2,304 bf16: every row tile
    assert utils.group_size(compiled, 512, 2304 * 128 * 2) == utils.L2_BUDGET // (2304 * 128 * 2)
    assert utils.group_size(compiled, 8, 10**12) == 1
    assert utils.group_size(_dot_kernel, 32, 1) == (2 if INTERPRET else 32)


def test_unsupported_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(utils.UnsupportedArchError, match=r"Tesla T4 is sm_75.*--backend torch"):
        utils.arch_family(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert utils.arch_family(torch.device("cuda")) == "sm_89"


@interpreter_only
def test_compile_only_needs_compiled_kernels():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with utils.compile_only(90):
            pass


def test_dot_precision_follows_torch_matmul_setting():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert utils.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert utils.dot_precision(torch.float32) == "tf32"
        assert utils.dot_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


def test_poisoned_outputs_fill_and_restore():
    with utils.poisoned_outputs():
        assert utils.alloc((3,), torch.float32, torch.device("cpu")).isnan().all()
        assert (utils.alloc((3,), torch.int32, torch.device("cpu")) == torch.iinfo(torch.int32).min).all()
    assert utils.alloc((3,), torch.float32, torch.device("cpu")).shape == (3,)
    assert not utils._POISON


def test_kernels_refuse_cpu_tensors_without_the_interpreter():
    """Without TRITON_INTERPRET=1 the kernels are compiled for CUDA: CPU tensors get a clear
    ValueError from every op, not a crash inside Triton."""
    code = textwrap.dedent("""
        import torch
        from esosae.kernels import decode, encode, orth_penalty
        x, W, b = torch.randn(4, 8), torch.randn(8, 16), torch.zeros(16)
        calls = [lambda: encode(x, W, b, torch.zeros(8), b), lambda: decode(torch.randn(4, 16), W.T.contiguous(),
                 torch.zeros(8), x), lambda: orth_penalty(W.T.contiguous(), W.T.contiguous(), 0.1)]
        for call in calls:
            try:
                call()
            except ValueError as e:
                assert "TRITON_INTERPRET=1" in str(e) and "CUDA" in str(e), e
            else:
                raise SystemExit("no error")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
