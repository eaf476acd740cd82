"""bench/roofline.py, the roofline MODEL: its arithmetic against hand formulas, and its report."""

import dataclasses
import datetime
import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_roofline():
    """bench/ is not a package: import bench/roofline.py by path (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("roofline", REPO / "bench" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rl = _load_roofline()
DEFAULT, LARGE = rl.SHAPES
H100, H200 = rl.DEVICES


def by_name(ops, fragment):
    found = [op for op in ops if fragment in op.name]
    assert len(found) == 1, [op.name for op in found]
    return found[0]


def test_shapes_and_devices_are_the_issues():
    assert (DEFAULT.d, DEFAULT.m1, DEFAULT.m2, DEFAULT.B, DEFAULT.l0) == (576, 1152, 1152, 1024, 32)
    assert (LARGE.d, LARGE.m1, LARGE.m2, LARGE.B) == (2304, 16384, 16384, 4096)
    assert (H100.bandwidth, H200.bandwidth) == (3.35e12, 4.8e12)
    assert H100.matmul["bf16"] == H200.matmul["bf16"] == 989e12 and H100.matmul["tf32"] == 494.5e12


@pytest.mark.parametrize("shape", [DEFAULT, LARGE], ids=["default", "large"])
def test_encoder_gemm_flops_and_bytes(shape):
    B, d, m = shape.B, shape.d, shape.m1
    op = by_name(rl.step_ops(shape, "bf16"), "layer 1 encoder fwd")
    assert op.flops == 2 * B * d * m and op.matmul and op.dtype == "bf16"
    # x, W_enc, b_enc, b_dec in bf16, θ fp32; f in bf16; fp32 row-L1 and int32 fire partials over 128-tiles
    hand = 2 * (B * d + d * m + m + d) + 4 * m + 2 * B * m + 4 * (B * math.ceil(m / 128) + m * math.ceil(B / 128))
    assert op.bytes == hand
    assert op.intensity == pytest.approx(op.flops / hand)


def test_saelens_gemm_bytes_scale_with_the_operand_width():
    B, d, M = DEFAULT.B, DEFAULT.d, DEFAULT.m1 + DEFAULT.m2
    for precision, s in (("bf16", 2), ("tf32", 4)):
        op = by_name(rl.saelens_ops(DEFAULT, precision), "encoder fwd GEMM")
        assert op.flops == 2 * B * d * M and op.bytes == s * (B * d + d * M + B * M)


def test_memory_bound_op_time_is_bytes_over_bandwidth():
    P = 2 * DEFAULT.d * (DEFAULT.m1 + DEFAULT.m2) + DEFAULT.m1 + DEFAULT.m2 + DEFAULT.d
    adam = by_name(rl.step_ops(DEFAULT, "bf16"), "Adam")
    assert adam.bytes == 28 * P  # read p, g, m, v; write p, m, v in fp32
    for dev in rl.DEVICES:
        assert rl.memory_bound(adam, dev)
        assert rl.op_time(adam, dev) == pytest.approx(28 * P / dev.bandwidth)


def test_compute_bound_op_time_is_flops_over_peak():
    op = by_name(rl.saelens_ops(LARGE, "bf16"), "encoder fwd GEMM")
    assert op.flops / op.bytes > 989e12 / 3.35e12  # past the ridge point
    assert not rl.memory_bound(op, H100)
    assert rl.op_time(op, H100) == pytest.approx(op.flops / 989e12)
    assert rl.op_time(op, H100) == rl.op_time(op, H200)  # same peak, bandwidth does not matter


@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32"])
def test_step_bound_is_the_sum_of_per_op_bounds(precision):
    for build in (rl.step_ops, rl.saelens_ops):
        ops = build(LARGE, precision)
        for dev in rl.DEVICES:
            hand = 0.0
            for op in ops:
                peak = dev.matmul[op.dtype] if op.matmul else 67e12
                hand += max(op.flops / peak, op.bytes / dev.bandwidth)
            assert rl.bound(ops, dev) == pytest.approx(hand, rel=1e-12)


def test_our_products_follow_the_code():
    """Layer 1: encoder fwd, decoder fwd, grad_f, grad_W_dec, grad_W_enc; layer 2 also grad_x (its
    input r carries the gradient into layer 1); the penalty at φ = min(1, B/(3·m2))."""
    B, d, m = DEFAULT.B, DEFAULT.d, DEFAULT.m1
    ops = rl.step_ops(DEFAULT, "bf16")
    assert [op.name for op in ops if "grad_x" in op.name] == ["layer 2 encoder bwd grad_x (into r)"]
    layer_products = [op for op in ops if op.matmul and op.name.startswith("layer")]
    assert len(layer_products) == 11 and all(op.flops == 2 * B * d * m for op in layer_products)
    n_tiles = math.ceil(m / 64) ** 2
    n_sel = math.ceil(min(1, B / (3 * m)) * n_tiles)
    fwd, tiles, reduce = by_name(ops, "orth fwd"), by_name(ops, "orth bwd G tiles"), by_name(ops, "orth bwd G W2")
    assert fwd.flops == tiles.flops == 2 * 64 * 64 * d * n_sel and reduce.flops == 2 * fwd.flops
    assert tiles.bytes - fwd.bytes == n_sel * 64 * 64 * 2  # the G tiles, in bf16


def test_saelens_step_has_no_grad_x():
    B, d, M = DEFAULT.B, DEFAULT.d, DEFAULT.m1 + DEFAULT.m2
    core = rl.saelens_ops(DEFAULT, "bf16", as_coded=False)
    products = [op for op in core if op.matmul]
    assert len(products) == 5 and not any("grad_x" in op.name for op in core)
    assert all(op.flops == 2 * B * d * M for op in products)
    extra = [op for op in rl.saelens_ops(DEFAULT, "bf16") if op.matmul and op not in products]
    assert [op.name for op in extra] == ["encoder bwd grad_(x − b_dec) → grad_b_dec [as coded]"]


def test_precisions_casts_and_optimizer():
    bf16, tf32 = rl.step_ops(DEFAULT, "bf16"), rl.step_ops(DEFAULT, "tf32")
    assert {op.name for op in bf16} - {op.name for op in tf32} == {
        "cast fp32→bf16: weights and x", "cast bf16→fp32: gradients"}
    assert by_name(bf16, "Adam").bytes == by_name(tf32, "Adam").bytes
    assert by_name(bf16, "layer 1 decoder bwd grad_f").flops == by_name(tf32, "layer 1 decoder bwd grad_f").flops
    assert rl.bound(bf16, H100) < rl.bound(tf32, H100) < rl.bound(rl.step_ops(DEFAULT, "fp32"), H100)


def test_pair_path_replaces_only_the_ops_after_the_encoder_forward():
    dense, pairs = rl.step_ops(LARGE, "bf16"), rl.step_ops(LARGE, "bf16", "pairs")
    same = [op for op in dense if not op.name.startswith("layer") or "encoder fwd" in op.name]
    assert [op for op in pairs if not op.name.startswith("layer") or "encoder fwd" in op.name] == same
    gathers = [op for op in pairs if op.name.startswith("layer") and op.flops == 2 * LARGE.B * LARGE.l0 * LARGE.d]
    assert len(gathers) == 9 and not any(op.matmul for op in gathers)  # 4 per layer, + grad_x in layer 2
    assert rl.bound(pairs, H100) < rl.bound(dense, H100)


def test_gathered_bytes_model():
    L2 = rl.L2_BYTES
    assert rl.gathered(L2 / 2, 10 * L2) == L2 / 2  # fits in L2: read once
    assert rl.gathered(2 * L2, L2) == L2  # touched less than the table: cold misses only
    assert rl.gathered(2 * L2, 10 * L2) == 2 * L2 + 8 * L2 * 0.5  # then misses with probability 1 − L2/table


@pytest.mark.parametrize("dev", [H100, H200], ids=["H100", "H200"])
def test_crossover_is_where_the_two_paths_cost_the_same(dev):
    rho = rl.crossover(LARGE, dev)
    assert 0 < rho < 0.1
    at = dataclasses.replace(LARGE, l0=rho * LARGE.m1)
    dense, pairs = rl.pair_time(at, dev, "bf16", "dense"), rl.pair_time(at, dev, "bf16", "pairs")
    assert pairs == pytest.approx(dense, rel=1e-6)
    below = dataclasses.replace(LARGE, l0=0.5 * rho * LARGE.m1)
    assert rl.pair_time(below, dev, "bf16", "pairs") < rl.pair_time(below, dev, "bf16", "dense")


def test_main_writes_the_markdown_with_the_speed_up(tmp_path, capsys):
    out = tmp_path / "roofline.md"
    text = rl.main(["--out", str(out)])
    assert out.read_text() == text + "\n" and text in capsys.readouterr().out
    assert "MODEL" in text and datetime.date.today().isoformat() in text
    for name in ("H100 SXM", "H200", "## default", "## large"):
        assert name in text
    core, coded = rl.saelens_ops(DEFAULT, "bf16", as_coded=False), rl.saelens_ops(DEFAULT, "bf16")
    dense, ours = rl.bound(rl.step_ops(DEFAULT, "bf16"), H200), rl.bound(rl.step_ops(DEFAULT, "bf16", "pairs"), H200)
    row = next(line for line in text.splitlines() if line.startswith("| default | H200 | bf16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{dense * 1e6:,.1f}" and cells[4] == f"{ours * 1e6:,.1f}"
    assert cells[9] == f"{rl.bound(core, H200) / ours:.2f}×" and cells[10] == f"{rl.bound(coded, H200) / ours:.2f}×"
