"""A roofline MODEL of one training step: lower bounds from peak rates, never a measurement.

    python bench/roofline.py [--out bench/results/roofline.md]

Every op of one dual-layer E-SOSAE step as the trainer runs it on CUDA (dense Triton
kernels, esosae/training/loop.py ``train_step``) and of SAELens's dense single-layer standard (ReLU +
L1) step of width M = m1 + m2 gets FLOPs, minimum bytes and intensity I = FLOPs / bytes:

    t = max(FLOPs / peak, bytes / bandwidth)       memory-bound when bytes/bw > FLOPs/peak

and a step's bound is the sum over its ops (no overlap, no launch latency). Counting rules:
- a product (M×K)·(K×N) is 2·M·N·K FLOPs at the matmul peak of its operand dtype; epilogue
  arithmetic is not counted (< 1% of a product at d ≥ 576);
- bytes: each operand read once, each output written once (tile re-reads, mostly L2 hits, not
  counted), in the code's dtypes: s bytes per operand (bf16 2, fp32 4); fp32 for masters,
  optimizer state, accumulators and partials;
- elementwise ops and reductions run at the CUDA-core fp32 rate (memory-bound regardless).
Precisions (``--dtype``, esosae/sae/precision.py): ``bf16`` (the CUDA default) = fp32 masters
cast to bf16 each step, gradients cast back; ``tf32`` = fp32 tensors, products at the TF32
rate (``torch.set_float32_matmul_precision("high")``); ``fp32`` = IEEE ``tl.dot`` on CUDA
cores, in the totals only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path

from esosae.config import SAEConfig, TrainConfig
from esosae.sae.reference import ORTH_TILE, tile_grid

OUT = Path(__file__).resolve().parent / "results" / "roofline.md"
F32 = 4
OPERAND_BYTES = {"bf16": 2, "tf32": 4, "fp32": 4}
ADAM_BYTES = 7 * F32  # read p, g, m, v; write p, m, v (fp32)
SAELENS_EAGER_PASSES = 20  # accesses per (B, M) element by SAELens's unfused eager ops; see saelens_ops


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    m1: int
    m2: int
    B: int
    l0: float = 32.0  # active features per token per layer

    @property
    def params(self) -> int:
        """P = 2·d·(m1 + m2) + m1 + m2 + d (weights, b_enc1, b_enc2, b_dec; SAELens's too)."""
        return 2 * self.d * (self.m1 + self.m2) + self.m1 + self.m2 + self.d


SHAPES = (Shape("default", 576, 1152, 1152, 1024), Shape("large", 2304, 16384, 16384, 4096))


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # HBM bytes/s
    matmul: dict[str, float] = field(default_factory=lambda: {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12})
    vector: float = 67e12  # CUDA-core fp32 FLOP/s, for elementwise ops and reductions


DEVICES = (Device("H100 SXM", 3.35e12), Device("H200", 4.8e12))


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float
    dtype: str  # operand dtype; a product runs at device.matmul[dtype]
    matmul: bool = False

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def peak(self, dev: Device) -> float:
        return dev.matmul[self.dtype] if self.matmul else dev.vector


def op_time(op: Op, dev: Device) -> float:
    """max(FLOPs / peak, bytes / bandwidth), seconds."""
    return max(op.flops / op.peak(dev), op.bytes / dev.bandwidth)


def memory_bound(op: Op, dev: Device) -> bool:
    return op.bytes / dev.bandwidth > op.flops / op.peak(dev)


def bound(ops: list[Op], dev: Device) -> float:
    """The step's lower bound: Σ_op max(FLOPs / peak, bytes / bandwidth), seconds."""
    return sum(op_time(op, dev) for op in ops)


def product(name: str, M: int, N: int, K: int, reads: float, writes: float, dtype: str) -> Op:
    """(M×K)·(K×N): 2·M·N·K FLOPs; bytes = reads + writes."""
    return Op(name, 2.0 * M * N * K, reads + writes, dtype, matmul=True)


def elementwise(name: str, flops: float, nbytes: float, dtype: str = "fp32") -> Op:
    """An elementwise op or reduction on bf16 or fp32 data (tf32 data is fp32), CUDA-core rate."""
    return Op(name, flops, nbytes, "bf16" if dtype == "bf16" else "fp32")


def casts(shape: Shape, precision: str, extra_in: int = 0) -> tuple[list[Op], list[Op]]:
    """bf16 only: fp32 → bf16 of the P master weights (and x): 6 B/element; the P bf16
    gradients → fp32: 6 B/element. tf32/fp32 cast nothing."""
    if precision != "bf16":
        return [], []
    n = shape.params + extra_in
    return ([elementwise("cast fp32→bf16: weights and x", n, 6.0 * n, "bf16")],
            [elementwise("cast bf16→fp32: gradients", shape.params, 6.0 * shape.params, "bf16")])


def optimizer_ops(shape: Shape, decoder_rows: int, ours: bool) -> list[Op]:
    """Clipping: norms then scale, 12·P bytes. Adam: 28·P bytes, ≈ 12 FLOPs/param. Ours also:
    parallel-gradient removal g ← g − ⟨g, w⟩w (read g, w; write g: 12 B/element of W_dec) and
    renormalization w ← w/‖w‖ (read, write: 8 B/element), over the decoder rows."""
    P, n = shape.params, decoder_rows * shape.d
    return ([elementwise("remove_parallel_grads (W_dec1, W_dec2)", 4.0 * n, 12.0 * n)] * ours
            + [elementwise("clip_grad_norm_ (norms, scale)", 3.0 * P, 12.0 * P),
               elementwise("Adam (fp32 p, g, m, v)", 12.0 * P, ADAM_BYTES * P)]
            + [elementwise("normalize_decoder (W_dec1, W_dec2)", 3.0 * n, 8.0 * n)] * ours)


def orth_ops(shape: Shape, s: int, dtype: str) -> list[Op]:
    """At the default tile fraction φ = min(1, B/(3·m2)) (esosae.config), n_sel = ⌈φ·n_tiles⌉
    ORTH_TILE² tiles of c = W_dec1 W_dec2ᵀ. Forward: 2·T²·d·n_sel FLOPs, reads both decoders.
    Backward (every tile assumed to hold pairs beyond ρ): recompute c and store the G tiles
    (n_sel·T²·s bytes), then per side a fixed-order reduction of the G tiles against the
    other decoder: 3× the forward's FLOPs; reads both decoders twice and the G tiles twice,
    writes both gradients in the weights' dtype; autograd then adds them to the decoders'
    grad_W_dec (3·s B/element)."""
    n1, n2 = tile_grid(shape.m1, shape.m2)
    phi = TrainConfig(batch_size=shape.B, sae=SAEConfig(m1=shape.m1, m2=shape.m2)).orth_block_fraction
    n_sel = min(n1 * n2, max(1, math.ceil(phi * n1 * n2)))
    w = (shape.m1 + shape.m2) * shape.d
    g_tiles = n_sel * ORTH_TILE**2 * s
    fwd = 2.0 * ORTH_TILE**2 * shape.d * n_sel
    return [Op(f"orth fwd (φ = {phi:.3f}, {n_sel} of {n1 * n2} tiles)", fwd, w * s + n_sel * F32, dtype, True),
            Op("orth bwd G tiles (recompute c)", fwd, w * s + g_tiles + n_sel * F32, dtype, True),
            Op("orth bwd G W2, Gᵀ W1 (fixed-order reductions)", 2 * fwd, 2 * w * s + 2 * g_tiles, dtype, True),
            elementwise("grad_W_dec += orth grads (autograd)", w, 3.0 * w * s, dtype)]


L2_BYTES = 50e6
"""L2 cache of the H100 SXM and the H200 (50 MB), for the pair kernels' gathers."""


def gathered(table: float, touched: float) -> float:
    """HBM bytes of gathering rows of a ``table``-byte table, ``touched`` bytes in all: every
    row once (cold misses), and each further touch a miss with the chance that its row has left
    L2, 1 − L2/table when the table is larger than L2 (0 when it fits): a uniform-reuse model."""
    first = min(table, touched)
    return first + (touched - first) * max(0.0, 1.0 - L2_BYTES / table)


def pair_ops(name: str, shape: Shape, m: int, s: int, layer: int) -> list[Op]:
    """The pair path of one layer (kernels/sparse.py) with nnz = B·L0 pairs, each op at the
    CUDA-core rate (gathers, 2·nnz·d FLOPs) with the bytes of its gathers (``gathered``):
      pairs         read f (B·m·s), write indices int64 ×2, rows/cols/order int32, values; sort passes
      decoder fwd   gather W_dec rows; read pairs, bias, target; write x̂, partials
      G             (B, d) elementwise: grad_x̂ − 2·grad_sq·(target − x̂), and grad_bias
      grad_f        gather G and W_dec rows per pair; write nnz values
      grad_W_dec    segment sums by feature: gather G rows; write grad_W_dec (m·d)
      grad_x        layer 2 only: W_encᵀ copy (m·d), gather its rows; write grad_x
      grad_W_enc    x − b_dec (B·d); gather its rows; write grad_W_encᵀ, its transpose into W_enc's layout."""
    B, d = shape.B, shape.d
    nnz, bd, w = B * shape.l0, B * shape.d * s, d * m * s
    k = 2.0 * nnz * d
    ops = [elementwise(f"{name} pairs: nonzero(f), feature sort", 4.0 * nnz, B * m * s + nnz * (28 + s) + 4 * nnz * 8),
           Op(f"{name} decoder fwd: row gather of W_dec (+squared error)", k,
              gathered(w, nnz * d * s) + nnz * (8 + s) + 2 * bd + d * s + B * F32, "fp32"),
           elementwise(f"{name} G = grad_x̂ − 2·grad_sq·(target − x̂), grad_bias", 5.0 * B * d, 4 * bd + B * F32 + d * s),
           Op(f"{name} grad_f on the pairs (pair dot)", k,
              gathered(bd, nnz * d * s) + gathered(w, nnz * d * s) + nnz * (8 + s), "fp32"),
           Op(f"{name} grad_W_dec (segment sums by feature)", k,
              gathered(bd, nnz * d * s) + nnz * (12 + s) + w, "fp32")]
    if layer == 2:
        ops += [elementwise(f"{name} W_encᵀ copy", 0.0, 2.0 * w),
                Op(f"{name} grad_x: row gather of W_encᵀ (into r)", k,
                   gathered(w, nnz * d * s) + nnz * 12 + bd, "fp32")]
    ops += [elementwise(f"{name} x − b_dec", B * d, 2 * bd),
            Op(f"{name} grad_W_enc (segment sums by feature, +grad_b_enc)", k,
               gathered(bd, nnz * d * s) + nnz * 16 + w + m * F32, "fp32"),
            elementwise(f"{name} grad_W_encᵀ → W_enc's layout", 0.0, 2.0 * w)]
    return ops


def step_ops(shape: Shape, precision: str = "bf16", path: str = "dense") -> list[Op]:
    """One dual-layer E-SOSAE step (METHOD.md §2–3) as esosae/training/loop.py runs it on CUDA.

    Per layer l with width m, input u (x; layer 2: r = x − x̂1), s = operand bytes, T = the
    kernels' tile side, which sizes only the partial buffers (128 for 16-bit, 64 for fp32):
      encoder fwd   2·B·d·m   reads u, W_enc, b_enc, b_dec, θ; writes f, fp32 row-L1 and int32 fire partials
      decoder fwd   2·B·m·d   reads f, W_dec, bias, target; writes x̂, fp32 squared-error partials
      grad_f        2·B·d·m   reads grad_x̂, target, x̂, grad_sq, W_dec; writes grad_f
      grad_W_dec    2·m·B·d   reads f, grad_x̂, target, x̂, grad_sq; writes grad_W_dec, grad_bias
                               (layer 2 also grad_target = 2·grad_sq·(r − r̂): its target r needs it)
      grad_x        2·B·m·d   layer 2 only (r = x − x̂1 carries the gradient into layer 1; x needs none)
      grad_W_enc    2·d·B·m   reads u, b_dec, grad_f, f (the mask); writes grad_W_enc, grad_b_enc, partials
    ``path = "pairs"``: every op after the encoder forward runs on the B·L0 active pairs
    (``pair_ops``), as the Triton backend does below ``kernels.pairs.PAIRS_MAX_DENSITY``.
    """
    s, p = OPERAND_BYTES[precision], precision
    B, d, m_all = shape.B, shape.d, shape.m1 + shape.m2
    T, bd = (128 if s == 2 else 64), B * d * s
    cast_in, cast_out = casts(shape, precision, extra_in=B * d)
    ops, partials = list(cast_in), 0
    for layer, m in ((1, shape.m1), (2, shape.m2)):
        w, g_sq = d * m * s, B * F32  # a weight matrix; grad_sq (B,) fp32
        f = gf = B * m * s  # f and grad_f as read and written
        k = 2.0 * B * d * m  # FLOPs of each product
        nt_m, nt_b, nt_d = math.ceil(m / T), math.ceil(B / T), math.ceil(d / T)
        partials += nt_m * (B + d) + nt_b * m + nt_d * B
        name = f"layer {layer}"
        ops.append(product(f"{name} encoder fwd (+bias, threshold, L1, fire)", B, m, d,
                           bd + w + (m + d) * s + m * F32, f + (nt_m * B + nt_b * m) * F32, p))
        if path == "pairs":
            ops += pair_ops(name, shape, m, s, layer)
            continue
        ops += [Op(f"{name} decoder fwd (+squared error)", k, f + w + d * s + 2 * bd + nt_d * B * F32, p, True),
                Op(f"{name} decoder bwd grad_f", k, 3 * bd + g_sq + w + gf, p, True),
                Op(f"{name} decoder bwd grad_W_dec", k, f + 3 * bd + g_sq + w + d * s + (layer - 1) * bd, p, True)]
        if layer == 2:
            ops.append(Op(f"{name} encoder bwd grad_x (into r)", k, gf + f + g_sq + w + bd, p, True))
        ops.append(Op(f"{name} encoder bwd grad_W_enc (+grad_b_enc, grad_b_dec)", k,
                      bd + d * s + gf + f + g_sq + w + m * s + nt_m * d * F32, p, True))
    return [*ops, *orth_ops(shape, s, p),
            elementwise("(B, d) elementwise: r, x̂, zero grads, grad_r, −grad_r", 4.0 * B * d, 12 * bd, p),
            elementwise("partial sums (row L1, fire, sq_err, grad_b_dec), loss means", partials,
                        (partials + 6 * B) * F32),
            *cast_out, *optimizer_ops(shape, m_all, ours=True),
            elementwise("firing statistics, thresholds θ = τ·clamp(μ)", 8.0 * m_all, 36.0 * m_all)]


def pair_time(shape: Shape, dev: Device, precision: str, path: str) -> float:
    """Seconds of the ops that differ between the dense and the pair path (all but the
    encoder forward, orthogonality, optimizer and shared elementwise work), both layers."""
    return sum(op_time(op, dev) for op in step_ops(shape, precision, path)
               if op.name.startswith("layer") and "encoder fwd" not in op.name)


def crossover(shape: Shape, dev: Device, precision: str = "bf16") -> float:
    """The density L0/m at which the pair path's ops cost what the dense products cost
    (bisection over L0 in the model)."""
    lo, hi = 0.0, float(shape.m1)
    for _ in range(60):
        mid = (lo + hi) / 2
        at = dataclasses.replace(shape, l0=mid)
        lo, hi = (mid, hi) if pair_time(at, dev, precision, "pairs") < pair_time(at, dev, precision, "dense") else (lo, mid)
    return lo / shape.m1


def saelens_ops(shape: Shape, precision: str = "bf16", as_coded: bool = True) -> list[Op]:
    """SAELens 6's StandardTrainingSAE step (ReLU + L1 on f·‖W_dec‖, Adam, clipping, firing
    statistics) at width M = m1 + m2, the same batch and precision. Core (every dense
    implementation pays it): encoder fwd, decoder fwd, grad_f, grad_W_dec, grad_W_enc (2·B·d·M
    each; x is data: no grad_x), W_dec row norms, one read of f for the firing statistics,
    one of grad_a for grad_b_enc, clipping, Adam.

    ``as_coded`` adds what its eager PyTorch code does on top (sae_lens/saes/sae.py,
    standard_sae.py): with ``apply_b_dec_to_input`` (default True) the encoder's input is
    x − b_dec, which requires grad, so autograd runs the input-gradient product too (2·B·M·d)
    to reduce it to grad_b_dec; and unfused passes over the (B, M) tensors, at s bytes per
    access (fp32 promotion under autocast would cost more): bias add 2, ReLU 2, f·‖W_dec‖ 2,
    its p = 1 norm 1, the second firing reduction 1; backward: norm 2, mul 2 + its
    reduction to grad_norms 2, sum of the two grad_f 3, ReLU 3: 20; the ‖W_dec‖ backward
    into W_dec and its accumulation (20 B per W_dec element), and ≈ 18 (B, d) accesses.
    """
    s, p = OPERAND_BYTES[precision], precision
    B, d, M = shape.B, shape.d, shape.m1 + shape.m2
    bd, bm, w = B * d * s, B * M * s, d * M * s
    cast_in, cast_out = casts(shape, precision, extra_in=B * d)
    ops = [*cast_in,
           product("encoder fwd GEMM", B, M, d, bd + w, bm, p),
           product("decoder fwd GEMM", B, d, M, bm + w, bd, p),
           product("decoder bwd grad_f", B, M, d, bd + w, bm, p),
           product("decoder bwd grad_W_dec", M, d, B, bm + bd, w, p),
           product("encoder bwd grad_W_enc", d, M, B, bd + bm, w, p)]
    if as_coded:
        ops.append(product("encoder bwd grad_(x − b_dec) → grad_b_dec [as coded]", B, d, M, bm + w, bd, p))
    ops += [elementwise("W_dec row norms (L1 weight)", 2.0 * M * d, (M * d + M) * F32),
            elementwise("firing statistics (one read of f)", B * M, bm + 16 * M, p),
            elementwise("grad_b_enc = Σ_rows grad_a", B * M, bm + M * s, p)]
    if as_coded:
        ops += [elementwise(f"eager (B, M) passes, {SAELENS_EAGER_PASSES} accesses/element [as coded]",
                            10.0 * B * M, SAELENS_EAGER_PASSES * bm, p),
                elementwise("‖W_dec‖ backward into W_dec, accumulate [as coded]", 4.0 * M * d, 20.0 * M * d),
                elementwise("(B, d) elementwise: x − b_dec, + b_dec, MSE, backward [as coded]",
                            6.0 * B * d, 18 * bd, p)]
    return ops + cast_out + optimizer_ops(shape, M, ours=False)


# -- the report ------------------------------------------------------------------------


def us(t: float) -> str:
    return f"{t * 1e6:,.1f}"


def op_table(shape: Shape, dev: Device, build) -> list[str]:
    """One row per op, bf16 and tf32 side by side (the same FLOPs; tf32 has no casts)."""
    by_p = {p: build(shape, p) for p in ("bf16", "tf32")}
    tf32 = {op.name: op for op in by_p["tf32"]}

    def cells(op: Op | None) -> str:
        if op is None:
            return "— | — | — | —"
        limit = "memory" if memory_bound(op, dev) else "compute"
        return f"{op.bytes / 1e6:,.2f} | {op.intensity:,.1f} | {us(op_time(op, dev))} | {limit}"

    head = " | ".join(f"{p} {c}" for p in by_p for c in ("MB", "FLOP/B", "µs", "limit"))
    rows = [f"| op | GFLOP | {head} |", "|---|---:" + "|---:|---:|---:|---" * 2 + "|"]
    rows += [f"| {op.name} | {op.flops / 1e9:,.3f} | {cells(op)} | {cells(tf32.get(op.name))} |" for op in by_p["bf16"]]
    tot = " ".join(f"{sum(o.bytes for o in ops) / 1e6:,.1f} | | **{us(bound(ops, dev))}** | |" for ops in by_p.values())
    rows += [f"| **step bound** | {sum(o.flops for o in by_p['bf16']) / 1e9:,.3f} | {tot}", ""]
    for p, ops in by_p.items():
        products = [o for o in ops if o.matmul]
        mem = [o.name for o in products if memory_bound(o, dev)]
        which = "every product" if len(mem) == len(products) else ", ".join(mem) if mem else "no product"
        rows.append(f"Memory-bound in {p}: every elementwise op and reduction, and {which}.  ")
    return rows


def totals_table() -> list[str]:
    rows = ["| shape | device | precision | ours dense µs | ours pairs µs | ours tokens/s (pairs) | memory-bound share "
            "(pairs) | SAELens core µs | SAELens as coded µs | speed-up pairs (core) | speed-up pairs (as coded) "
            "| crossover density |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in SHAPES:
        for dev in DEVICES:
            for p in ("bf16", "tf32", "fp32"):
                dense, ops = bound(step_ops(shape, p), dev), step_ops(shape, p, "pairs")
                ours = bound(ops, dev)
                core, coded = bound(saelens_ops(shape, p, False), dev), bound(saelens_ops(shape, p), dev)
                mem = sum(op_time(o, dev) for o in ops if memory_bound(o, dev)) / ours
                rows.append(f"| {shape.name} | {dev.name} | {p} | {us(dense)} | {us(ours)} | {shape.B / ours:,.0f} | "
                            f"{mem:.0%} | {us(core)} | {us(coded)} | {core / ours:.2f}× | {coded / ours:.2f}× | "
                            f"{crossover(shape, dev, p):.2%} |")
    return rows


def shares_table(shape: Shape, dev: Device, precision: str = "bf16") -> list[str]:
    """Where the pair-path step's bound goes, by kind of op."""
    ops = step_ops(shape, precision, "pairs")
    kinds = {"encoder forward GEMMs": lambda o: "encoder fwd" in o.name,
             "pair ops (decoder, backward)": lambda o: o.name.startswith("layer") and "encoder fwd" not in o.name,
             "orthogonality": lambda o: "orth" in o.name,
             "optimizer, clipping, casts, decoder-row passes": lambda o: any(
                 k in o.name for k in ("Adam", "clip", "cast", "parallel", "normalize_decoder")),
             }
    total = bound(ops, dev)
    rows = ["| part | µs | share |", "|---|---:|---:|"]
    counted = 0.0
    for kind, test in kinds.items():
        t = sum(op_time(o, dev) for o in ops if test(o))
        counted += t
        rows.append(f"| {kind} | {us(t)} | {t / total:.0%} |")
    rows.append(f"| the rest (elementwise, statistics) | {us(total - counted)} | {(total - counted) / total:.0%} |")
    return rows


def markdown(date: str) -> str:
    dev_line = "; ".join(f"{d.name}: {d.matmul['bf16'] / 1e12:g} TFLOP/s bf16, {d.matmul['tf32'] / 1e12:g} tf32, "
                         f"{d.vector / 1e12:g} fp32 CUDA cores, {d.bandwidth / 1e12:g} TB/s" for d in DEVICES)
    out = [
        "# Roofline MODEL of one training step (lower bounds from peak rates, not measurements)", "",
        f"Generated by `python bench/roofline.py` on {date}. Nothing here ran on a GPU.", "",
        f"- Peaks (dense, no sparsity): {dev_line}.",
        "- Per op: t = max(FLOPs / peak, bytes / bandwidth); a step is the sum (no overlap between ops, "
        "no launch latency, no host syncs): a real step is slower, at the default shape by far (a bound "
        "of tens of µs against dozens of kernel launches of several µs each). Memory-bound share = the "
        "fraction of our bound spent in memory-bound ops; the `limit` columns say which ops they are.",
        "- FLOPs: 2·M·N·K per product; epilogue arithmetic not counted. Bytes: each operand read once and "
        "each output written once, in the dtype the code uses: operands at 2 B (bf16) or 4 B (tf32/fp32); "
        "fp32 master weights, gradients for the optimizer, Adam state (28 B/param), partials.",
        "- bf16 (`--dtype bf16`, the CUDA default) = fp32 masters cast to bf16 every step, gradients cast back; "
        "tf32 (`--dtype tf32`) = fp32 operands with `torch.set_float32_matmul_precision('high')`; "
        "fp32 (`--dtype fp32`) = IEEE `tl.dot` on CUDA cores, totals only.",
        "- Ours: dual-layer E-SOSAE, m1 = m2, L0 = 32 per layer, Triton kernels (encoder, decoder, "
        "orthogonality at the default tile fraction min(1, B/(3·m2)), every sampled tile beyond ρ).",
        "- SAELens: StandardTrainingSAE (ReLU + L1 on f·‖W_dec‖), width m1 + m2, same batch and precision. "
        "Core = its five products, norms and reductions, clipping, Adam; as coded = plus the input-gradient "
        "product autograd runs for b_dec (apply_b_dec_to_input) and its unfused eager passes "
        f"({SAELENS_EAGER_PASSES} accesses per (B, M) element). Speed-up = SAELens bound / our bound.",
        "- Pairs: the Triton backend's pair path (kernels/sparse.py), which it takes while f's density is at "
        "most `kernels.pairs.PAIRS_MAX_DENSITY`: the encoder forward stays a dense GEMM, every other op of a "
        "layer is a gather or segment sum over the B·L0 active pairs at the CUDA-core rate, its bytes from "
        f"a uniform-reuse L2 model ({L2_BYTES / 1e6:g} MB: a gathered table that fits is read once, a larger "
        "one misses with probability 1 − L2/table). Crossover density = the L0/m at which the pair ops cost "
        "what the dense products they replace cost, in this model.", "",
        "## Totals", "", *totals_table(), "",
        f"Where the pair path's bf16 bound goes at the large shape ({SHAPES[1].l0:g} active features per "
        "layer), H100 SXM:", "", *shares_table(SHAPES[1], DEVICES[0]), "",
        "At the large shape the pair path leaves the step bound to the passes over all parameters (Adam "
        "reads and writes 28 B per parameter, clipping 12, the bf16 casts 12, the decoder-row passes 20 "
        "per decoder element), which SAELens's step pays too; a ≥ 3× lead over its dense step would need "
        "those fused into one pass.", ""]
    for shape in SHAPES:
        out += [f"## {shape.name}: d = {shape.d:,}, m1 = m2 = {shape.m1:,}, B = {shape.B:,}, "
                f"L0 = {shape.l0:g} per layer, P = {shape.params:,} parameters", ""]
        for dev in DEVICES:
            out += [f"### ours (dual-layer E-SOSAE), dense path, {dev.name}", "", *op_table(shape, dev, step_ops), "",
                    f"### ours (dual-layer E-SOSAE), pair path, {dev.name}", "",
                    *op_table(shape, dev, lambda sh, p: step_ops(sh, p, "pairs")), "",
                    f"### SAELens standard, width {shape.m1 + shape.m2:,}, as coded, {dev.name}", "",
                    *op_table(shape, dev, saelens_ops), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    """Write the markdown (``--out``, default bench/results/roofline.md), print it, return it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="markdown file to write (default: %(default)s)")
    out, text = ap.parse_args(argv).out, markdown(datetime.date.today().isoformat())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
