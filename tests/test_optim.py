"""esosae.training.optim.Adam is torch's fused Adam, bit for bit, and steps on one intra-op thread."""

import pytest
import torch

from esosae.training import optim

from esosae.sae import torch_ops


def params_and_grads(seed: int, n_steps: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 96), (96,), (96, 48), (48,), (0, 48)]  # an empty tensor as the single-layer SAE has
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(n_steps)]
    return start, grads


def run(make, start, grads, lr=1e-2):
    ps = [p.clone().requires_grad_() for p in start]
    opt = make(ps, lr)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def test_equals_torch_fused_adam_bit_for_bit():
    start, grads = params_and_grads(0, 6)
    ours, opt = run(lambda ps, lr: optim.Adam(ps, lr=lr, betas=(0.9, 0.999)), start, grads)
    ref, _ = run(lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), fused=True), start, grads)
    assert opt.param_groups[0]["fused"] is True
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


def test_matches_the_default_adam_to_rounding():
    """The fused kernel computes the default Adam's update; only roundings differ."""
    start, grads = params_and_grads(1, 6)
    ours, _ = run(lambda ps, lr: optim.Adam(ps, lr=lr, betas=(0.9, 0.95)), start, grads)
    ref, _ = run(lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.95)), start, grads)
    ulp = torch.finfo(torch.float32).eps
    for a, r, s in zip(ours, ref, start):
        if s.numel() == 0:
            continue
        assert (r - s).abs().max() > 0.01  # the steps moved the weights
        assert (a - r).abs().max() <= 8 * ulp * r.abs().max()  # a few roundings apart


class FixedCores:
    def __init__(self, free: bool):
        self.free = free

    def look(self) -> bool:
        return self.free


@pytest.mark.parametrize("free", [False, True])
def test_step_threads_follow_the_cores_and_the_count_is_restored(free, monkeypatch):
    """One intra-op thread while other processes hold the cores, all of them while free."""
    monkeypatch.setattr(torch_ops, "SERIAL", True)
    monkeypatch.setattr(torch_ops, "CORES", FixedCores(free))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = torch.randn(10, requires_grad=True)
        opt = optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
        seen = []

        def closure():
            seen.append(torch.get_num_threads())
            p.grad = torch.ones_like(p)
            return torch.zeros(())

        opt.step(closure)
        assert seen == [2 if free else 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_state_dict_round_trip_continues_identically():
    start, grads = params_and_grads(2, 6)
    full, _ = run(lambda ps, lr: optim.Adam(ps, lr=lr, betas=(0.9, 0.999)), start, grads)
    half, opt = run(lambda ps, lr: optim.Adam(ps, lr=lr, betas=(0.9, 0.999)), start, grads[:3])
    state = opt.state_dict()
    resumed = [p.detach().clone().requires_grad_() for p in half]
    opt2 = optim.Adam(resumed, lr=1e-2, betas=(0.9, 0.999))
    opt2.load_state_dict(state)
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        opt2.step()
    for a, r in zip(resumed, full):
        assert torch.equal(a, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dtypes(dtype):
    p = torch.randn(7, dtype=dtype, requires_grad=True)
    opt = optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    p.grad = torch.randn(7, dtype=dtype)
    opt.step()
    assert p.dtype == dtype and opt.param_groups[0]["fused"] is True


def test_a_copied_optimizer_still_steps():
    """deepcopy and pickle keep only torch's own optimizer state (gpu_check copies optimizers)."""
    import copy

    p = torch.nn.Parameter(torch.randn(8))
    opt = copy.deepcopy(optim.Adam([p], lr=1e-2, betas=(0.9, 0.999)))
    p_copy = opt.param_groups[0]["params"][0]
    p_copy.grad = torch.ones(8)
    before = p_copy.detach().clone()
    opt.step()
    assert (p_copy < before).all()
