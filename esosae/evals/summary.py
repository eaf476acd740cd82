"""What follows a training run: its held-out headline, summary.md and the evaluations.

The trainer (esosae.training.loop.run) returns the trained model and its source; ``evaluate``
measures it on the source's held-out activations (FVU, MSE, L0, dead/dense %, and atom
recovery on a planted dictionary), writes ``summary.md``, and, unless the config turns
them off, runs every evaluation of the run directory (esosae.evals.run.run_all). The CLI
and the grid call it, so that training never imports the evaluations.
"""

from __future__ import annotations

import json
from typing import Any

from esosae.config import TrainConfig
from esosae.data.sources import ActivationSource, SyntheticSource, atom_recovery
from esosae.evals.core import reconstruction_metrics
from esosae.evals.headline import probing_headline
from esosae.run.atomic import atomic_write_text
from esosae.run.layout import SUMMARY_FILE
from esosae.training.loop import Trained
from esosae.training.tracking import evaluation_numbers


def headline(trained: Trained) -> dict[str, Any]:
    """The held-out metrics of a freshly trained SAE, and summary.md written from them."""
    model, source = trained.model, trained.source
    metrics = reconstruction_metrics(model, source.heldout(), trained.ops)
    if isinstance(source, SyntheticSource):
        metrics["atom_recovery"], _ = atom_recovery([model.W_dec1, model.W_dec2], source.atoms)
    metrics["wall_s"] = trained.wall_s
    atomic_write_text(trained.run_dir / SUMMARY_FILE, summary_markdown(trained.cfg, source, metrics))
    return metrics


def evaluate(trained: Trained, progress: bool = True) -> dict[str, Any]:
    """``headline``, then (with ``cfg.eval``) every evaluation; CE loss recovered joins the
    headline when the run is on a language model, and the probing headline
    (esosae.evals.headline.probing_headline) as ``probing``. The run's tracker gets the
    headline and every evaluation's numbers, and closes."""
    metrics, results = headline(trained), {}
    if trained.cfg.eval:
        from esosae.evals.run import run_all  # the evals import the language-model stack

        with trained.ranges("eval"):
            results = run_all(trained.run_dir, progress=progress)
        ce = results.get("core", {}).get("eval_result_metrics", {}).get("model_performance_preservation", {})
        if "ce_loss_score" in ce:
            metrics["ce_loss_recovered"] = ce["ce_loss_score"]
        if "sparse_probing" in results:
            metrics["probing"] = probing_headline(results["sparse_probing"])
    numbers = {k: v for k, v in metrics.items() if k != "probing"}  # the probing numbers are in results too
    trained.tracker.finish({**numbers, **evaluation_numbers(results)}, trained.cfg.steps - 1)  # the last logged step
    return metrics


def summary_markdown(cfg: TrainConfig, source: ActivationSource, m: dict[str, Any]) -> str:
    sae = cfg.sae
    lines = [
        "# Run summary", "",
        f"- SAE: arch `{sae.arch}`, m1 = {sae.m1}, m2 = {sae.m2}"
        + (f", k = {sae.k}" if sae.arch == "topk" else ""),
        f"- schedule `{cfg.schedule.schedule}`, τ_0 = {cfg.schedule.tau_0}, τ_T = {cfg.schedule.tau_final}"
        f" / {cfg.schedule.tau_final_2}; γ warmup `{cfg.schedule.gamma_warmup}`, γ_max = {sae.gamma_max}",
        f"- margins `{sae.margins}`, clamped = {sae.clamp_margins}; λ = {sae.l1_coeff} / {sae.lambda2}",
        f"- {cfg.steps} steps × {cfg.batch_size} tokens, seed {cfg.seed}, backend `{cfg.backend}`",
        f"- source: {json.dumps(source.describe())}",
        f"- wall time: {m['wall_s']:.1f} s", "",
        f"Held-out metrics ({m['tokens']} tokens):", "",
        "| metric | value |", "|---|---|",
    ]
    for key in ("fvu", "mse", "l0", "l0_1", "l0_2", "dead_pct", "dense_pct", "cos_mean", "cos_max",
                "atom_recovery"):
        if key in m:
            lines.append(f"| {key} | {m[key]:.4g} |")
    if "atom_recovery" in m:
        lines += ["", "atom_recovery: fraction of planted atoms whose best cosine with any decoder "
                  "row (either layer) is ≥ 0.9."]
    return "\n".join(lines) + "\n"
