"""The training loop: schedules → forward/backward → clip → step → constraints → log → checkpoint.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per logged step, every
field of METHOD.md §6), ``checkpoints/`` (model, optimizer and step; written atomically),
``sae/`` (final weights, scale folded in). The evaluations (summary.md, eval/, plots/) are
not the trainer's: the CLI and the grid run them on what ``run`` returns.

Every random draw of a step (its batch, its orthogonality tiles) is a pure function of
(seed, step), so a run resumed from a checkpoint continues bit-for-bit on the CPU; a
streamed source's data position is stored in each checkpoint and restored with it.
Ctrl-C finishes the current step, writes a checkpoint and exits with code 130.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from esosae.config import TrainConfig
from esosae.data.models import note
from esosae.data.sources import ActivationSource, SyntheticSource, generator, spec_from_config
from esosae.errors import UserError
from esosae.run.atomic import Interrupted
from esosae.run.checkpoint import resume_checkpoint, save_checkpoint
from esosae.run.layout import CONFIG_FILE, METRICS_FILE, SAE_DIR, Claim, truncate_metrics
from esosae.sae import backend, precision, schedules
from esosae.sae.backend import Backend, get_backend, resolve_device
from esosae.sae.margins import effective_margins, pinned_fractions, project_margins, update_freq, update_margins
from esosae.sae.model import DualLayerSAE
from esosae.sae.reference import orth_scale, sample_tiles
from esosae.training.distributed import Dist
from esosae.training.optim import Adam
from esosae.training.profiling import NO_RANGES, Ranges, StepTimer, dense_flops_per_token, gemm_peak_tflops, torch_trace
from esosae.training.tracking import Tracker, open_tracker

COS_SAMPLE = 512
COS_HIGH = 0.9
"""Cosine above which a cross-layer pair of decoder rows counts as a near-duplicate (logged)."""
BATCHTOPK_EMA = 0.99
"""Decay of BatchTopK's inference threshold: a moving average of the batch's smallest kept activation."""


class RunError(UserError):
    """A run that cannot start or continue; the message names the file and what to do."""


def make_source(cfg: TrainConfig, device: torch.device) -> ActivationSource:
    """The activation source the config names."""
    if cfg.data.source == "synthetic":
        return SyntheticSource(spec_from_config(cfg.data), seed=cfg.data.data_seed,
                               eval_rows=cfg.data.eval_tokens)
    if cfg.data.activations == "stream":
        from esosae.data.stream import open_streams

        return open_streams(cfg, device)[cfg.model.hook]
    from esosae.data.activations import lm_source

    return lm_source(cfg, device)


# -- logging ---------------------------------------------------------------------------


@torch.no_grad()
def cosine_sample(model: DualLayerSAE, generator: torch.Generator) -> tuple[float, float]:
    """Max and mean |c_ij| over a random sample of cross-layer decoder-row pairs."""
    W1, W2 = model.W_dec1, model.W_dec2
    i = torch.randperm(W1.shape[0], generator=generator)[:COS_SAMPLE].to(W1.device)
    j = torch.randperm(W2.shape[0], generator=generator)[:COS_SAMPLE].to(W2.device)
    c = (W1[i] @ W2[j].T).abs()  # (≤512, ≤512)
    return c.max().item(), c.mean().item()  # host sync (logging steps only)


@torch.no_grad()
def count_high_cosines(model: DualLayerSAE, chunk: int = 1024) -> int:
    """Cross-layer pairs (i, j) with |c_ij| > COS_HIGH over all m1×m2 pairs, chunk rows at a time."""
    W1, W2 = model.W_dec1, model.W_dec2
    return sum(int(((W1[i:i + chunk] @ W2.T).abs() > COS_HIGH).sum()) for i in range(0, W1.shape[0], chunk))


def grad_ratio(penalty: torch.Tensor, mse: torch.Tensor, W_dec: tuple[torch.Tensor, ...]) -> float:
    """‖∇_{W_dec} γ·L_orth‖ / ‖∇_{W_dec} MSE‖ over both decoders: how much the penalty pulls
    against the reconstruction (an extra backward; logging steps only)."""
    if not penalty.requires_grad:
        return 0.0
    g_pen = torch.autograd.grad(penalty, W_dec, retain_graph=True, allow_unused=True)
    g_mse = torch.autograd.grad(mse, W_dec, retain_graph=True, allow_unused=True)

    def norm(gs: tuple[torch.Tensor | None, ...]) -> float:
        return math.sqrt(sum(float(g.float().square().sum()) for g in gs if g is not None))

    return norm(g_pen) / max(norm(g_mse), 1e-30)  # host sync


# -- the loop --------------------------------------------------------------------------


@dataclass
class StepState:
    """What the loop carries between steps besides the model and optimizer."""

    step: int = 0
    log_t0: float = field(default_factory=time.perf_counter)
    log_tokens: int = 0


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resumable randomness."""
    return generator("train", seed, step, stream)


@torch.no_grad()
def set_thresholds(model: DualLayerSAE, cfg: TrainConfig, step: int) -> tuple[float, float]:
    """θ_l = τ_l(t) · clamp(μ_l) for the JumpReLU layers; jumprelu's θ = τ_T·μ (no schedule);
    the ReLU, TopK and BatchTopK baselines keep their own θ (0, or BatchTopK's estimate)."""
    if cfg.sae.arch == "jumprelu":
        tau1 = tau2 = cfg.schedule.tau_final
    elif cfg.sae.arch == "esosae":
        tau1 = schedules.tau(step, cfg.steps, cfg.schedule, cfg.schedule.tau_final)
        tau2 = schedules.tau(step, cfg.steps, cfg.schedule, cfg.schedule.tau_final_2)
    else:
        return 0.0, 0.0
    model.taus = (tau1, tau2)
    model.theta1.copy_(tau1 * effective_margins(model.mu1, cfg.sae))
    model.theta2.copy_(tau2 * effective_margins(model.mu2, cfg.sae))
    return tau1, tau2


def train_step(model: DualLayerSAE, opt: torch.optim.Optimizer, ops: Backend, x: torch.Tensor,
               cfg: TrainConfig, step: int, dist: Dist | None = None,
               net: torch.nn.Module | None = None, timer: StepTimer | None = None,
               ranges: Ranges = NO_RANGES, diagnose: bool = False) -> dict[str, Any]:
    """One optimizer step on the normalized batch x (B, d); returns the step's tensors.

    ``net`` is the module to run forward (the DDP wrapper of ``model`` under torchrun,
    whose backward averages gradients over ranks); ``model`` itself by default. ``timer``
    splits the step into forward / backward / optimizer phases when it is measuring.
    ``diagnose`` (logging steps) adds the orthogonality-to-reconstruction gradient ratio.
    """
    sae_cfg = cfg.sae
    prec = precision.resolve(cfg.dtype, x.device, ops.name)
    dtype = precision.operand_dtype(prec)
    tau1, tau2 = set_thresholds(model, cfg, step)
    lam1 = schedules.l1_weight(step, cfg.steps, cfg.schedule, sae_cfg.l1_coeff)
    lam2 = schedules.l1_weight(step, cfg.steps, cfg.schedule, sae_cfg.lambda2)
    gamma = schedules.gamma(step, cfg.steps, cfg.schedule, sae_cfg.gamma_max) if model.layers == 2 else 0.0
    for group in opt.param_groups:
        group["lr"] = schedules.lr(step, cfg)

    with precision.matmul_precision(prec), ranges("sae_forward"):
        out = (net or model)(x, ops, dtype)
    mse = out["sq_err"].mean()
    l1 = lam1 * out["l1_1"].mean() if "topk" not in sae_cfg.arch else torch.zeros((), device=x.device)
    if model.layers == 2:
        l1 = l1 + lam2 * out["l1_2"].mean()
    orth = torch.zeros((), device=x.device)
    if gamma > 0 and step % sae_cfg.orth_every == 0:
        # drawn on the CPU and handed over as they are: the op checks and copies them without a host sync
        tiles = sample_tiles(sae_cfg.m1, sae_cfg.m2, cfg.orth_block_fraction, step_generator(cfg.seed, step, 1))
        with precision.matmul_precision(prec):
            orth = ops.orth_penalty(*out["W_dec"], sae_cfg.orth_margin, tiles)  # the decoders as cast for the step
        orth = orth * orth_scale(sae_cfg.orth_norm, sae_cfg.m1, sae_cfg.m2)
    aux = out.get("aux", torch.zeros((), device=x.device))
    loss = mse + l1 + gamma * orth + sae_cfg.aux_coeff * aux
    ratio = grad_ratio(gamma * orth, mse, (model.W_dec1, model.W_dec2)) if diagnose and gamma > 0 else None
    if timer is not None:
        timer.mark("forward")

    opt.zero_grad(set_to_none=True)
    with precision.matmul_precision(prec), ranges("backward"):
        loss.backward()  # under DDP this also all-reduces (averages) the gradients
    if timer is not None:
        timer.mark("backward")
    with ranges("optimizer"):
        model.remove_parallel_grads()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        model.normalize_decoder()
        if sae_cfg.learned_thresholds:
            for i in range(1, model.layers + 1):
                project_margins(getattr(model, f"mu{i}"), sae_cfg)
            set_thresholds(model, cfg, step)  # θ buffers follow the stepped μ (saved, and used at inference)
        update_feature_stats(model, out, cfg, step, x.shape[0], dist)
    if timer is not None:
        timer.mark("optimizer")
    return {"out": out, "loss": loss, "mse": mse, "l1": l1, "orth": orth, "aux": aux, "grad_ratio": ratio,
            "tau1": tau1, "tau2": tau2, "gamma": gamma, "lambda1": lam1, "lambda2": lam2}


@torch.no_grad()
def update_feature_stats(model: DualLayerSAE, out: dict[str, torch.Tensor], cfg: TrainConfig,
                         step: int, batch: int, dist: Dist | None = None) -> None:
    """Firing EMA, tokens since each feature last fired, and (every margin_every) μ."""
    for i in range(1, model.layers + 1):
        fire = out[f"fire{i}"]  # (m,) int32, this rank's tokens
        n = batch
        if dist is not None:  # every rank applies the same update from the global counts
            fire, n = dist.sum_fire_counts(fire), batch * dist.world
        freq = getattr(model, f"freq{i}")
        freq.copy_(update_freq(freq, fire, n, cfg.sae.freq_ema))
        since = getattr(model, f"since_fire{i}")
        since.copy_(torch.where(fire > 0, 0, since + n))
        if cfg.sae.arch == "esosae" and (step + 1) % cfg.sae.margin_every == 0:
            mu = getattr(model, f"mu{i}")
            mu.copy_(update_margins(mu, freq, cfg.sae, schedules.schedule_progress(step, cfg.steps, cfg.schedule)))
    if cfg.sae.arch == "batchtopk":  # the inference threshold: smallest activation the batch kept
        f1 = out["f1"]
        kept = torch.where(f1 > 0, f1, torch.full_like(f1, float("inf"))).amin().float()
        if dist is not None:
            kept = dist.min(kept)
        theta = model.theta1
        first = torch.full_like(theta, kept.item()) if step == 0 else theta  # host sync: one scalar
        new = BATCHTOPK_EMA * first + (1 - BATCHTOPK_EMA) * kept
        theta.copy_(torch.where(torch.isfinite(kept), new, theta))  # a batch that kept nothing moves nothing


def log_record(model: DualLayerSAE, cfg: TrainConfig, step: int, res: dict[str, Any], x: torch.Tensor,
               tokens_per_s: float, tokens_seen: int) -> dict[str, Any]:
    """Every field of METHOD.md §6 for one step (host syncs: logging steps only)."""
    out = res["out"]
    total_var = (x - x.mean(0)).square().sum()
    rec: dict[str, Any] = {
        "step": step, "tokens": tokens_seen,
        "tau1": res["tau1"], "tau2": res["tau2"], "gamma": res["gamma"],
        "lambda1": res["lambda1"], "lambda2": res["lambda2"],
        "loss": res["loss"].item(), "mse": res["mse"].item(), "l1": res["l1"].item(),
        "orth": res["orth"].item(), "aux": res["aux"].item(),
        "fvu": (out["sq_err"].sum() / total_var).item(),
        "schedule_progress": schedules.schedule_progress(step, cfg.steps, cfg.schedule),
        "lr": schedules.lr(step, cfg),
    }
    for i in range(1, model.layers + 1):
        rec[f"l0_{i}"] = (out[f"f{i}"] > 0).sum(1).float().mean().item()
        rec[f"dead_{i}"] = model.dead_fraction(i, tokens_seen, cfg.dead_window)
        low, high = pinned_fractions(getattr(model, f"mu{i}"), cfg.sae)
        rec[f"pinned_min_{i}"], rec[f"pinned_max_{i}"] = low, high
        rec[f"mu_mean_{i}"] = getattr(model, f"mu{i}").mean().item()
        rec[f"path_{i}"] = backend.path(out[f"f{i}"])  # dense products or active pairs this step
    if model.layers == 2:
        rec["cos_max"], rec["cos_mean"] = cosine_sample(model, step_generator(cfg.seed, step, 2))
        rec["cos_high_pairs"] = count_high_cosines(model)
        if res["grad_ratio"] is not None:
            rec["orth_grad_ratio"] = res["grad_ratio"]
    rec["tokens_per_s"] = tokens_per_s
    if x.is_cuda:
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    for key in ("loss", "mse", "fvu"):
        if not math.isfinite(rec[key]):
            raise RunError(f"training diverged at step {step} ({key} = {rec[key]}); lower --lr")
    return rec


class SigintGuard:
    """Turns the first Ctrl-C into a request to stop after the current step. Signals reach
    the main thread only: a loop in another thread (one hook of several, esosae.training.hooks)
    stops when ``stop_all`` is set, by the main thread's guard or by a failing hook."""

    stop_all = threading.Event()

    def __init__(self) -> None:
        self.main = threading.current_thread() is threading.main_thread()
        self._requested = False
        self._old: Any = None

    @property
    def requested(self) -> bool:
        return self._requested or (not self.main and SigintGuard.stop_all.is_set())

    def __enter__(self) -> SigintGuard:
        if self.main:
            SigintGuard.stop_all.clear()
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self._requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._requested = True
        SigintGuard.stop_all.set()

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def build(cfg: TrainConfig, source: ActivationSource, device: torch.device) -> tuple[DualLayerSAE, torch.optim.Optimizer]:
    """A freshly initialized model (on normalized inputs) and its Adam optimizer."""
    scale = source.norm_scale() if cfg.data.normalize == "expected_norm" else 1.0
    model = DualLayerSAE(cfg.sae, source.d, scale=scale)
    sample = source.init_sample(cfg.batch_size) * scale
    model.init_weights(step_generator(cfg.seed, 0, 0), sample)
    model.to(device)
    opt = Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))  # fused, fp32 state
    return model, opt


def run(cfg: TrainConfig, run_dir: Path, resume: bool = False, dist: Dist | None = None,
        progress: bool = True, source: ActivationSource | None = None) -> Trained | None:
    """Train (or resume) one run in ``run_dir``; returns the trained model and its source
    on rank 0 (None on the others), for the caller to evaluate (esosae.evals.summary).

    A new run claims ``run_dir`` (esosae.run.layout.Claim) only once the source and the model
    are built, and gives it back as it was if it fails before its first checkpoint: an old
    run there (``--overwrite``) is deleted only after that checkpoint. Under torchrun
    (``dist`` given) rank 0 alone builds caches and writes files; every rank reads its own
    shard of each global batch. ``source``: one the caller built (the hooks of one stream).
    """
    claim = Claim(run_dir) if not resume and (dist is None or dist.is_main) else None
    try:
        return _run(cfg, run_dir, resume, dist, progress, claim, source)
    except BaseException:
        if claim is not None:
            claim.abort()
        raise


def _run(cfg: TrainConfig, run_dir: Path, resume: bool, dist: Dist | None, progress: bool,
         claim: Claim | None, source: ActivationSource | None) -> Trained | None:
    if dist is not None and cfg.batch_size % dist.world:
        raise RunError(f"--batch-size {cfg.batch_size} is the global batch and must divide by the "
                       f"{dist.world} ranks; use a multiple of {dist.world}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device) if dist is None else dist.device
    ranges = Ranges(cfg.profile == "nvtx")
    ops = ranges.wrap_backend(get_backend(cfg.backend, device, cfg.pairs_max_density))
    precision.resolve(cfg.dtype, device, ops.name)  # a --dtype this device cannot run fails before any file is written
    is_main = dist is None or dist.is_main
    if not is_main:
        dist.barrier()  # wait until rank 0 has built (or found) the activation cache
    if source is None:
        with ranges("harvest"):
            source = make_source(cfg, device)
    if dist is not None and is_main:
        dist.barrier()
    model, opt = build(cfg, source, device)
    start = 0
    if resume:  # the newest intact checkpoint, checked against cfg (esosae.run.checkpoint)
        start, position = resume_checkpoint(run_dir, cfg, model, opt, say=note if is_main else None)
        if position is not None:
            source.seek(position)
    if claim is not None:
        claim.begin()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            cfg.to_json(run_dir / CONFIG_FILE)
        truncate_metrics(run_dir / METRICS_FILE, start)
    shard = (dist.rank, dist.world) if dist is not None else (0, 1)
    net = dist.wrap(model) if dist is not None else model

    state = StepState(step=start)
    timer = StepTimer(device)
    flops_per_token = dense_flops_per_token(cfg, source.d)
    peak_tflops = gemm_peak_tflops(device) if device.type == "cuda" else None
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True, desc="train", mininterval=2.0)
    metrics_fh = open(run_dir / METRICS_FILE, "a") if is_main else None
    tracker = open_tracker(cfg, run_dir, start) if is_main else Tracker()  # esosae.training.tracking
    try:
        with SigintGuard() as guard, torch_trace(run_dir, cfg.profile == "torch" and is_main) as trace_step:
            for step in range(start, cfg.steps):
                logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
                timer.start(measuring=logging)
                with ranges("data"):
                    x = source.batch(step, cfg.batch_size, shard).to(device, non_blocking=True) * model.scale
                timer.mark("data")
                res = train_step(model, opt, ops, x, cfg, step, dist, net, timer, ranges, diagnose=logging)
                trace_step()
                state.step, state.log_tokens = step + 1, state.log_tokens + cfg.batch_size
                bar.update(1)
                if logging:
                    if device.type == "cuda":
                        torch.cuda.synchronize()  # sync point: timing and logging only
                    now = time.perf_counter()
                    tps = state.log_tokens / max(now - state.log_t0, 1e-9)
                    rec = log_record(model, cfg, step, res, x, tps, (step + 1) * cfg.batch_size)
                    rec.update({f"time_{k}_ms": 1e3 * v for k, v in timer.phases.items()})
                    rec["gflop_per_s"] = flops_per_token * tps / 1e9
                    if peak_tflops is not None:
                        rec["mfu"] = rec["gflop_per_s"] / (1e3 * peak_tflops)
                    state.log_t0, state.log_tokens = now, 0
                    if metrics_fh is not None:
                        metrics_fh.write(json.dumps(rec) + "\n")
                        metrics_fh.flush()
                        tracker.log(rec)
                    l0 = rec["l0_1"] + rec.get("l0_2", 0.0)
                    bar.set_postfix(tok_s=f"{tps:,.0f}", fvu=f"{rec['fvu']:.3f}", l0=f"{l0:.1f}")
                done = step + 1 == cfg.steps
                stop = guard.requested if dist is None else dist.any(guard.requested)  # all ranks stop together
                if done or (step + 1) % cfg.checkpoint_every == 0 or stop:
                    if dist is not None:
                        dist.check_in_sync(model)
                    if is_main:
                        save_checkpoint(run_dir, step + 1, model, opt, cfg, cfg.keep_checkpoints,
                                        deliver_sigint=not stop,  # stopping: a 2nd Ctrl-C mid-write is dropped
                                        data=source.position(step + 1, cfg.batch_size))
                        if claim is not None:
                            claim.commit()  # the new run stands on its own: an old run set aside goes now
                if stop and not done:
                    raise Interrupted(f"interrupted at step {step + 1}/{cfg.steps}; checkpoint saved. "
                                      f"Continue with: python train.py --resume {run_dir}")
    except BaseException:
        tracker.close()
        raise
    finally:
        source.close()
        bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    if not is_main:
        return None
    return finish(model, cfg, source, run_dir, time.perf_counter() - t_start, ops, ranges, tracker)


@dataclass
class Trained:
    """What a finished run hands to the evaluations (esosae.evals.summary): the final model
    (already saved to ``sae/``), its source, the backend it ran on and its wall time."""

    model: DualLayerSAE
    cfg: TrainConfig
    source: ActivationSource
    run_dir: Path
    wall_s: float
    ops: Backend
    ranges: Ranges = NO_RANGES
    tracker: Tracker = field(default_factory=Tracker)
    """Still open: the evaluation's numbers go to it last (esosae.evals.summary.evaluate)."""


def finish(model: DualLayerSAE, cfg: TrainConfig, source: ActivationSource, run_dir: Path,
           wall_s: float, ops: Backend, ranges: Ranges = NO_RANGES, tracker: Tracker | None = None) -> Trained:
    """Save the final SAE (scale folded in) to ``sae/``; the model leaves training mode
    (BatchTopK then applies its threshold, learned margins their θ buffers)."""
    model.eval()
    extra = {"tau_final": cfg.schedule.tau_final, "tau_final2": cfg.schedule.tau_final_2,
             "source": source.describe(), "steps": cfg.steps}
    model.save(run_dir / SAE_DIR, extra)
    return Trained(model, cfg, source, run_dir, wall_s, ops, ranges, tracker or Tracker())
