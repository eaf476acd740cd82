"""The peer race: SAELens's StandardTrainingSAE step against ours, same shapes, same machine,
same run: ``pytest bench/test_peers.py --benchmark-only``.

SAELens runs in its own environment (sae-lens pins transformer-lens < 4; see bench/README.md
"The peer race"), as a worker subprocess (bench/peers_worker.py) that stays up for the whole
module. Each timed round of ours is preceded by one SAELens step on the same weights and
batch, so the two are measured back to back, step by step, under the same load: a pair.
The headline ratio is the median over the pairs of SAELens's time / ours (at least 5 pairs
per race, 7 in the three target races), which cancels load that changes between pairs;
the ratio of the two medians is kept as well. Both start every step from the same tensors (bench/race_data.py): at
L0 ≈ 32 and at initialization (dense). d = 576, m = 4,608, B = 1,024, float32, the CPU's
default threads, Adam in both (the trainers' defaults), gradient clipping at 1 in both.

Ours: ``esosae.training.loop.train_step`` on the torch backend, single-layer ReLU + L1 against
SAELens's single layer; then our dual-layer E-SOSAE (m1 = m2 = 4,608) against the same
SAELens single-layer step, with the default tile fraction and exact, where the share of the
step that the penalty's forward + backward takes is measured on its own.
Then the three target races (single layer at L0 ≈ 32 and at initialization, dual layer at the
default tile fraction) again with ``esosae.training.optim.Adam`` as our optimizer (torch's fused Adam
stepping on one intra-op thread: the change proposed for the trainer's ``build``; SAELens
keeps its trainer's default Adam; once ``build`` makes it, these rows repeat the first
ones), and the single-layer race with both trainers on one intra-op thread, the thread
setting that wins on this shared machine when other jobs hold the cores.
Skips (with the reason) when the peers environment is missing, as in CI.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import race_data
import torch
from peers_env import PEERS_PYTHON, peer_problem

from esosae.sae import schedules
from esosae.sae.backend import TORCH
from esosae.sae.reference import sample_tiles
from esosae.training.loop import step_generator

WORKER = Path(__file__).with_name("peers_worker.py")


class Peer:
    """The SAELens worker: one JSON command line in, one JSON answer line out."""

    def __init__(self, race_file: Path):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([str(PEERS_PYTHON), "-P", str(WORKER), str(race_file)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=tempfile.gettempdir())
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"the SAELens worker died:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def steps(self, case: str, n: int, lr: float, l1: float, threads: int) -> dict:
        cmd = {"case": case, "steps": n, "lr": lr, "l1": l1, "threads": threads}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def peer(race):
    problem = peer_problem()
    if problem:
        pytest.skip(problem)
    p = Peer(race_data.path())
    yield p
    p.close()


RACES = [  # ours, its tile fraction, esosae.training.optim.Adam?, SAELens's case, pairs, intra-op threads of both (0: default)
    pytest.param("relu_l0_32", None, False, "relu_l0_32", 7, 0, id="relu_l0_32"),
    pytest.param("relu_init", None, False, "relu_init", 7, 0, id="relu_init"),
    pytest.param("esosae_l0_32", None, False, "relu_l0_32", 7, 0, id="esosae_dual_l0_32-orth_auto"),
    pytest.param("esosae_l0_32", 1.0, False, "relu_l0_32", 5, 0, id="esosae_dual_l0_32-orth_exact"),
    pytest.param("relu_l0_32", None, True, "relu_l0_32", 7, 0, id="relu_l0_32-proposed_adam"),
    pytest.param("relu_init", None, True, "relu_init", 7, 0, id="relu_init-proposed_adam"),
    pytest.param("esosae_l0_32", None, True, "relu_l0_32", 7, 0, id="esosae_dual_l0_32-orth_auto-proposed_adam"),
    pytest.param("relu_l0_32", None, False, "relu_l0_32", 5, 1, id="relu_l0_32-both_1_thread"),
]


def orth_seconds(run: race_data.Runner, reps: int = 3) -> float:
    """Median time of the step's penalty alone, forward + backward, on the case's weights."""
    cfg, model = run.cfg, run.model
    tiles = sample_tiles(cfg.sae.m1, cfg.sae.m2, cfg.orth_block_fraction, step_generator(cfg.seed, run.step_no, 1))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pen = TORCH.orth_penalty(model.W_dec1, model.W_dec2, cfg.sae.orth_margin, tiles)
        torch.autograd.grad(pen, (model.W_dec1, model.W_dec2))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class threads:
    """torch's intra-op threads set to n inside (n = 0: unchanged)."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@pytest.mark.parametrize("ours,fraction,proposed,theirs,rounds,n_threads", RACES)
def test_race(benchmark, report, machine_info, race, peer, ours, fraction, proposed, theirs, rounds, n_threads):
    run = race_data.Runner(race, ours, fraction, ours=proposed)
    n_threads_both = n_threads or torch.get_num_threads()
    cfg = race_data.config(theirs)  # SAELens gets the single-layer run's λ and learning rate
    step = race_data.step_of(cfg)
    lr, l1 = schedules.lr(step, cfg), schedules.l1_weight(step, cfg.steps, cfg.schedule, cfg.sae.l1_coeff)
    peer_times, peer_l0 = [], []

    def their_step_then_reset() -> None:
        answer = peer.steps(theirs, 1, lr, l1, n_threads_both)
        peer_times.extend(answer["times"])
        peer_l0.extend(answer["l0"])
        run.reset()

    def our_step() -> dict:
        with threads(n_threads):
            return run.step(TORCH)

    their_step_then_reset()  # warm-up of both, not counted
    our_step()
    peer_times.clear()
    res = benchmark.pedantic(our_step, setup=their_step_then_reset, rounds=rounds)
    t_ours, t_peer = benchmark.stats.stats.median, statistics.median(peer_times)
    our_times = list(benchmark.stats.stats.data)  # in round order, each right after its SAELens step
    assert len(our_times) == len(peer_times) == rounds
    pair_ratios = [p / o for p, o in zip(peer_times, our_times)]
    out = res["out"]
    l0 = [(out[f"f{i}"] > 0).sum(1).float().mean().item() for i in range(1, run.model.layers + 1)]
    opt = type(run.opt)
    info = {"our_adam_fused": bool(run.opt.param_groups[0].get("fused")), "our_optimizer": f"{opt.__module__}.{opt.__name__}",
            "threads_both": n_threads_both, "saelens_s": t_peer, "saelens_times_s": peer_times,
            "ours_times_s": our_times, "pair_ratios": pair_ratios, "median_pair_ratio": statistics.median(pair_ratios),
            "saelens_l0": statistics.median(peer_l0),
            "ours_l0": l0, "saelens_version": peer.hello["sae_lens"], "saelens_threads": peer.hello["threads"]}
    benchmark.extra_info.update(machine_info, **info)
    report("SAELens s/step", t_peer, ".3f")
    report("ours s/step", t_ours, ".3f")
    report(f"SAELens time / ours, median of {rounds} pairs (x faster)", statistics.median(pair_ratios), ".2f")
    report("SAELens time / ours, ratio of the medians", t_peer / t_ours, ".2f")
    report("ours tokens/s", race_data.B / t_ours)
    report("SAELens tokens/s", race_data.B / t_peer)
    if run.model.layers == 2:
        t_orth = orth_seconds(run)
        benchmark.extra_info.update(orth_s=t_orth, orth_share=t_orth / t_ours,
                                    tile_fraction=run.cfg.orth_block_fraction)
        report(f"penalty fwd+bwd s (tile fraction {run.cfg.orth_block_fraction:.3f})", t_orth, ".3f")
        report("penalty share of our step", t_orth / t_ours, ".2f")
