"""Microbenchmarks of the SAE's hot ops: ``pytest bench/test_ops.py --benchmark-only``.

encode, decode and the orthogonality penalty, forward and forward+backward, for each
provider available here:
- ``reference``: esosae.sae.reference, the oracle (plain eager PyTorch, dense);
- ``torch``: the torch backend (esosae.sae.torch_ops), CPU only (elsewhere it is the reference);
- ``triton``: the kernels, CUDA only (the interpreter is for tests, not timing).
Sizes: d = 576, m = 4,608, B = 1,024 on the CPU; d = 2,304, m = 16,384, B = 4,096 on CUDA
(skipped without it). Encoder and decoder run at L0 ≈ 32 (b_enc set per feature from the
batch's quantiles, θ = 0) and dense (b_enc = 0: about half the features fire, a ReLU SAE at
initialization); the penalty with the default tile fraction min(1, B/(3·m)) and exact.

Each benchmark records ``flops``, the dense-equivalent count of its math (the same for every
provider; see ``FLOPS``), and ``gflop_per_s`` = flops / median time: above the machine's GEMM
rate means work was skipped, not done faster. Encoder and decoder also record the path
taken (``dense`` or ``pairs``), the active pairs, and the FLOPs and gathered bytes of that
path (``work``), which scale with the pairs, not with B·m·d. CUDA timings synchronize inside
the timed call.
"""

from __future__ import annotations

import pytest
import torch

from esosae.sae import reference
from esosae.sae.backend import TORCH, get_backend, path
from esosae.sae.reference import sample_tiles

SIZES = {"cpu": (576, 4608, 1024), "cuda": (2304, 16384, 4096)}  # (d, m, B)
ROUNDS = {"cpu": 5, "cuda": 20}
L0 = 32


def providers() -> list:
    out = [pytest.param("cpu", "reference", id="cpu-reference"), pytest.param("cpu", "torch", id="cpu-torch")]
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU sizes and triton skipped")
    out += [pytest.param("cuda", "reference", id="cuda-reference", marks=cuda),
            pytest.param("cuda", "triton", id="cuda-triton", marks=cuda)]
    return out


def ops_for(provider: str):
    if provider == "reference":
        return reference
    if provider == "torch":
        return TORCH
    return get_backend("triton", torch.device("cuda"))  # what the trainer runs: dense or pairs by density


def FLOPS(op: str, mode: str, d: int, m: int, B: int, fraction: float = 1.0) -> float:
    """Dense-equivalent FLOPs: one (B×d)·(d×m) GEMM is 2·B·d·m; a backward is two more
    (the weight gradient and the input gradient). The penalty's GEMM is m×d·d×m, times the
    sampled fraction of its tiles."""
    gemm = 2.0 * (m * m * d * fraction if op == "orth" else B * d * m)
    return gemm * (3 if mode == "fwd+bwd" else 1)


def work(op: str, mode: str, path: str, d: int, m: int, B: int, nnz: int, size: int) -> dict[str, float]:
    """FLOPs and gathered bytes of the path actually taken (``esosae.sae.backend.path``): the
    dense path's products are 2·B·d·m each; on the pair path every product but the encoder
    forward is 2·nnz·d FLOPs over gathered rows of d elements (nnz·d·size bytes each). Encode
    backward: grad_x and grad_W_enc; decode: forward, grad_f (two gathers) and grad_W_dec."""
    dense = 2.0 * B * d * m
    pair, rows = 2.0 * nnz * d, float(nnz) * d * size
    products = {("encode", "fwd"): 0, ("encode", "fwd+bwd"): 2, ("decode", "fwd"): 1, ("decode", "fwd+bwd"): 3}
    n = products[op, mode]
    fixed = dense if op == "encode" else 0.0  # the encoder forward is dense on both paths
    if path == "dense":
        return {"work_flops": fixed + n * dense, "gathered_bytes": 0.0}
    gathers = {("encode", "fwd"): 0, ("encode", "fwd+bwd"): 2, ("decode", "fwd"): 1, ("decode", "fwd+bwd"): 4}
    return {"work_flops": fixed + n * pair, "gathered_bytes": gathers[op, mode] * rows}


def sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


_CACHE: dict = {}


def weights(device: str, sparsity: str) -> dict[str, torch.Tensor]:
    """Random unit decoder rows, tied encoder, gaussian x; b_enc from quantiles for L0 ≈ 32."""
    key = (device, sparsity)
    if key not in _CACHE:
        d, m, B = SIZES[device]
        g = torch.Generator().manual_seed(0)
        W_dec = torch.randn(m, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        x = torch.randn(B, d, generator=g)
        b_dec = x.mean(0)
        W_enc = W_dec.T.contiguous()
        b_enc = torch.zeros(m)
        if sparsity == "l0_32":
            pre = (x - b_dec) @ W_enc
            b_enc = -pre.kthvalue(round((1 - L0 / m) * B), dim=0).values
        t = {"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "W_dec": W_dec, "theta": torch.zeros(m),
             "W_dec2": torch.roll(W_dec, 1, dims=1).contiguous()}
        _CACHE[key] = {k: v.to(device) for k, v in t.items()}
    return _CACHE[key]


def record(benchmark, report, machine_info: dict, provider: str, flops: float, **info) -> None:
    benchmark.extra_info.update(machine_info, provider=provider, flops=flops, **info)
    report("GFLOP/s (dense-equivalent)", flops / benchmark.stats.stats.median / 1e9, ".1f")


def params(t: dict, names: tuple[str, ...], grad: bool) -> dict[str, torch.Tensor]:
    return {k: t[k].detach().clone().requires_grad_(grad and k in names) for k in t}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("sparsity", ["l0_32", "dense"])
@pytest.mark.parametrize("device,provider", providers())
def test_encode(benchmark, report, machine_info, device, provider, sparsity, mode):
    ops, (d, m, B) = ops_for(provider), SIZES[device]
    p = params(weights(device, sparsity), ("W_enc", "b_enc", "b_dec"), mode == "fwd+bwd")
    g_f, g_l1 = torch.randn(B, m, device=device), torch.randn(B, device=device)
    done = sync(device)

    def run():
        f, l1, _ = ops.encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], p["theta"])
        if mode == "fwd+bwd":
            torch.autograd.backward((f, l1), (g_f, g_l1))
            for k in ("W_enc", "b_enc", "b_dec"):
                p[k].grad = None
        done()
        return f

    f = benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=1)
    nnz, taken = int((f != 0).sum()), path(f)
    record(benchmark, report, machine_info, provider, FLOPS("encode", mode, d, m, B),
           l0=nnz / B, size=f"d={d} m={m} B={B}", path=taken, pairs=nnz,
           **work("encode", mode, taken, d, m, B, nnz, f.element_size()))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("sparsity", ["l0_32", "dense"])
@pytest.mark.parametrize("device,provider", providers())
def test_decode(benchmark, report, machine_info, device, provider, sparsity, mode):
    """f comes from the same provider's encoder (as in training: the torch backend's f carries
    its active pairs); the backward gives the gradients of f, W_dec and the bias."""
    ops, (d, m, B) = ops_for(provider), SIZES[device]
    p = params(weights(device, sparsity), ("W_enc", "W_dec", "b_dec"), mode == "fwd+bwd")
    f, _, _ = ops.encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], p["theta"])
    g_xh = torch.randn(B, d, device=device)
    done = sync(device)

    def run():
        x_hat, sq = ops.decode(f, p["W_dec"], p["b_dec"], p["x"])
        if mode == "fwd+bwd":
            torch.autograd.grad((x_hat, sq), (f, p["W_dec"], p["b_dec"]), (g_xh, torch.ones_like(sq)),
                                retain_graph=True)  # f's encoder graph is shared by every round
        done()

    benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=1)
    nnz, taken = int((f != 0).sum()), path(f)
    record(benchmark, report, machine_info, provider, FLOPS("decode", mode, d, m, B),
           l0=nnz / B, size=f"d={d} m={m} B={B}", path=taken, pairs=nnz,
           **work("decode", mode, taken, d, m, B, nnz, f.element_size()))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tiles", ["auto", "exact"])
@pytest.mark.parametrize("device,provider", providers())
def test_orth(benchmark, report, machine_info, device, provider, tiles, mode):
    """m1 = m2 = m unit decoder rows; ρ = 0.1; auto samples min(1, B/(3·m)) of the 64×64 tiles."""
    ops, (d, m, B) = ops_for(provider), SIZES[device]
    p = params(weights(device, "dense"), ("W_dec", "W_dec2"), mode == "fwd+bwd")
    fraction = min(1.0, B / (3 * m)) if tiles == "auto" else 1.0
    sel = sample_tiles(m, m, fraction, torch.Generator().manual_seed(0))
    sel = sel.to(device) if sel is not None else None
    done = sync(device)

    def run():
        pen = ops.orth_penalty(p["W_dec"], p["W_dec2"], 0.1, sel)
        if mode == "fwd+bwd":
            torch.autograd.grad(pen, (p["W_dec"], p["W_dec2"]))
        done()

    rounds = ROUNDS[device] if tiles == "auto" or device == "cuda" else 2
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1 if tiles == "auto" else 0)
    record(benchmark, report, machine_info, provider, FLOPS("orth", mode, d, m, B, fraction),
           tile_fraction=fraction, size=f"d={d} m1=m2={m}")
