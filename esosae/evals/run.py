"""``run_all``: every evaluation of one run directory, written into it.

    RUN_DIR/eval/core.json            core metrics (+ CE loss recovered on a language model)
    RUN_DIR/eval/sparse_probing.json  SAEBench sparse probing, accuracy and AUC
    RUN_DIR/eval/curriculum.json      threshold progression, margins, alignment
    RUN_DIR/plots/curriculum.png, RUN_DIR/plots/sparse_probing.png

It needs ``config.json`` (the TrainConfig), ``sae/`` (final weights) and, for the
curriculum, ``metrics.jsonl``. Everything is checked before any long computation, so bad
input fails at once with one line. A language-model run evaluates on its model and hook;
a synthetic run (no language model) gets core metrics with atom recovery instead of CE
loss, and probing on planted-atom tasks (esosae.evals.planted).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from esosae.config import TrainConfig
from esosae.data.models import LoadedModel, cache_root, check_hook, load_model, note
from esosae.data.sources import SyntheticSource, atom_recovery, spec_from_config
from esosae.errors import UserError
from esosae.evals import curriculum, headline, output, plots, probing, tasks
from esosae.evals.config import EvalConfig
from esosae.evals.core import lm_core_metrics, reconstruction_metrics
from esosae.evals.planted import planted_probing
from esosae.run.layout import CONFIG_FILE, METRICS_FILE, PLOTS_DIR, SAE_DIR
from esosae.sae.backend import resolve_device
from esosae.sae.model import DualLayerSAE


class EvalError(UserError):
    """A run directory that cannot be evaluated; the message names it and what to do."""


@dataclasses.dataclass
class Run:
    """One run directory, opened and checked."""

    dir: Path
    cfg: TrainConfig
    sae: DualLayerSAE
    device: torch.device

    @property
    def is_lm(self) -> bool:
        return self.cfg.data.source == "lm"

    @functools.cached_property
    def lm(self) -> LoadedModel:
        """The run's language model, loaded on first use only."""
        model = load_model(self.cfg.model, self.device)
        check_hook(model, self.cfg.model.hook)
        return model

    def synthetic_source(self) -> SyntheticSource:
        d = self.cfg.data
        return SyntheticSource(spec_from_config(d), seed=d.data_seed, eval_rows=d.eval_tokens)


def open_run(run_dir: Path, cfg: EvalConfig) -> Run:
    if not run_dir.is_dir():
        raise EvalError(f"run directory {run_dir} does not exist")
    if not (run_dir / CONFIG_FILE).is_file():
        raise EvalError(f"{run_dir} has no {CONFIG_FILE}; is it a run directory?")
    train_cfg = TrainConfig.from_json(run_dir / CONFIG_FILE)
    device = resolve_device(cfg.device)
    return Run(run_dir, train_cfg, DualLayerSAE.load(run_dir / SAE_DIR, device).eval(), device)


# -- the three evaluations ---------------------------------------------------------------


def core_eval(run: Run, cfg: EvalConfig) -> dict[str, Any]:
    d = run.cfg.data
    if run.is_lm:
        m = lm_core_metrics(run.sae, run.lm, run.cfg, cfg.ce_batch, cache_root(run.cfg.model.cache_dir))
    else:
        source = run.synthetic_source()
        m = reconstruction_metrics(run.sae, source.heldout())
        m["atom_recovery"] = atom_recovery([run.sae.W_dec1, run.sae.W_dec2], source.atoms)[0]
    layers = range(1, run.sae.layers + 1)
    metrics: dict[str, dict[str, Any]] = {}
    if run.is_lm:
        metrics["model_performance_preservation"] = {k: m[k] for k in (
            "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae", "ce_delta_nats",
            "kl_div")}
    metrics["reconstruction_quality"] = {"explained_variance": 1 - m["fvu"], "fvu": m["fvu"], "mse": m["mse"]}
    metrics["sparsity"] = {"l0": m["l0"], **{f"l0_{i}": m[f"l0_{i}"] for i in layers}}
    metrics["feature_density"] = {k: m[k] for k in ["dead_pct", "dense_pct"] + [
        f"{what}_pct_{i}" for i in layers for what in ("dead", "dense")]}
    if run.sae.layers == 2:
        metrics["cross_layer"] = {"cos_mean": m["cos_mean"], "cos_max": m["cos_max"]}
    if "atom_recovery" in m:
        metrics["planted"] = {"atom_recovery": m["atom_recovery"]}
    metrics["token_stats"] = {"total_tokens_eval_reconstruction": m["tokens"],
                              "total_tokens_eval_ce": m.get("ce_tokens")}
    widths = [run.sae.cfg.m1, run.sae.cfg.m2]
    details = [{"layer": i, "width": widths[i - 1], "l0": m[f"l0_{i}"], "dead_pct": m[f"dead_pct_{i}"],
                "dense_pct": m[f"dense_pct_{i}"]} for i in layers]
    eval_config = {"source": d.source, "model_name": run.cfg.model.model if run.is_lm else None,
                   "hook_name": run.cfg.model.hook if run.is_lm else None,
                   "dataset": d.dataset if run.is_lm else f"synthetic:{d.synthetic}",
                   "context_size": d.context_size, "eval_tokens": d.eval_tokens, "data_seed": d.data_seed,
                   "heldout": "the run's held-out contexts (never trained on)" if run.is_lm else
                              "the synthetic source's held-out stream", "ce_batch": cfg.ce_batch}
    return output.envelope("core", eval_config, metrics, details, None, run.dir,
                           output.sae_cfg_dict(run.cfg, run.sae.d))


def probing_eval(run: Run, cfg: EvalConfig, datasets: list[tasks.ProbeDataset], progress: bool) -> dict[str, Any]:
    if run.is_lm:
        results = probing.lm_probing(run.sae, datasets, run.cfg.model.model, run.cfg.model.hook,
                                     cache_root(run.cfg.model.cache_dir), lambda: run.lm, cfg, progress)
        names = [ds.name for ds in datasets]
    else:
        results = planted_probing(run.sae, run.synthetic_source(), cfg)
        names = list(results)
    metrics, details = probing.summarize(results, cfg)
    eval_config = {"model_name": run.cfg.model.model if run.is_lm else f"synthetic:{run.cfg.data.synthetic}",
                   "hook_name": run.cfg.model.hook if run.is_lm else None, "random_seed": cfg.seed,
                   "dataset_names": names, "probe_train_set_size": cfg.train_size,
                   "probe_test_set_size": cfg.test_size, "context_length": cfg.context_size,
                   "k_values": list(cfg.k_values), "llm_batch_tokens": cfg.llm_batch_tokens,
                   "sae_batch_size": cfg.sae_batch,
                   "llm_dtype": "float32", "activation_cache_dtype": "float16",
                   "standardize_inputs": cfg.standardize, "probe_C": cfg.probe_c, "probe_max_iter": cfg.max_iter,
                   "sae_features": "f1 and f2 concatenated (m1 + m2)" if run.sae.layers == 2 else "f1 (m1)",
                   "llm_features": "hidden units at the hook" if run.is_lm else "raw input dimensions of x",
                   "pooling": "mean over text positions (BOS and pad excluded)" if run.is_lm else "none (one row)"}
    return output.envelope("sparse_probing", eval_config, metrics, details, results, run.dir,
                           output.sae_cfg_dict(run.cfg, run.sae.d))


def curriculum_eval(run: Run, records: list[dict[str, Any]]) -> dict[str, Any]:
    res = curriculum.curriculum_metrics(records, run.sae, run.cfg)
    s = run.cfg.schedule
    eval_config = {"metrics_file": METRICS_FILE, "steps": run.cfg.steps, "log_every": run.cfg.log_every,
                   "schedule": s.schedule, "schedule_fraction": s.schedule_fraction, "gamma_warmup": s.gamma_warmup,
                   "settle_tolerance": curriculum.SETTLE}
    return output.envelope("curriculum", eval_config, res["metrics"], res["details"], {"curves": res["curves"]},
                           run.dir, output.sae_cfg_dict(run.cfg, run.sae.d))


# -- everything --------------------------------------------------------------------------


def run_all(run_dir: str | Path, only: Iterable[str] | None = None, progress: bool = True,
            config: EvalConfig | None = None) -> dict[str, dict[str, Any]]:
    """Run the evaluations ``only`` names (default all: core, probing, curriculum) on the run
    in ``run_dir``; write ``eval/*.json``, ``plots/*.png`` and summary.md's evaluation part
    (esosae.evals.headline); return {file stem: result}."""
    cfg = config or EvalConfig()
    if only is not None:
        cfg = dataclasses.replace(cfg, only=tuple(only))
    run_dir = Path(run_dir)
    run = open_run(run_dir, cfg)
    records = curriculum.read_metrics(run_dir / METRICS_FILE) if "curriculum" in cfg.only else []
    datasets = ([tasks.build(tasks.resolve(name), cfg.train_size, cfg.test_size, cfg.seed) for name in cfg.datasets]
                if "probing" in cfg.only and run.is_lm else [])
    title = f"{run_dir.resolve().name}: {run.cfg.sae.arch}, {run.cfg.schedule.schedule} schedule"
    done: dict[str, dict[str, Any]] = {}
    for name in ("curriculum", "core", "probing"):
        if name not in cfg.only:
            continue
        t0 = time.perf_counter()
        if name == "curriculum":
            result = curriculum_eval(run, records)
            plots.curriculum_plot(result["eval_result_unstructured"]["curves"],
                                  run_dir / PLOTS_DIR / "curriculum.png", title)
        elif name == "core":
            result = core_eval(run, cfg)
        else:
            result = probing_eval(run, cfg, datasets, progress)
            m = result["eval_result_metrics"]
            plots.probing_plot([("SAE features", m["sae"])],
                               ("model hidden units" if run.is_lm else "input dimensions", m["llm"]),
                               cfg.k_values, run_dir / PLOTS_DIR / "sparse_probing.png", title)
        stem = "sparse_probing" if name == "probing" else name
        path = output.write(run_dir, stem, result)
        done[stem] = result
        if progress:
            note(f"{name} evaluation: {path} ({time.perf_counter() - t0:.0f} s)")
    headline.update_summary(run_dir)
    return done
