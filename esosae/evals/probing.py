"""Sparse probing, SAEBench's method (METHOD.md §7), with accuracy and ROC AUC.

For each text of a binary task (esosae.evals.tasks), the language model runs to the hook;
the SAE encodes every text position (BOS and pad excluded) and its features are
mean-pooled over them. For a dual-layer SAE the features are both layers' codes
concatenated, [f1, f2] (m1 + m2 of them), since the SAE's dictionary is both layers
together. The ``llm`` rows do the same with the model's own hidden units at the hook
(d of them).

Per task, on the train split only: rank features by |mean(pos) − mean(neg)| and keep the
top k (ties: the lower index first); fit an L2 logistic regression (sklearn, C = 1,
L-BFGS) on them; report the test accuracy and the ROC AUC of its decision function, for
each k in ``k_values`` and for the full width (``*_test_accuracy``, ``*_test_auc``).
A k above the width takes every feature.

Inputs are standardized per probe (mean 0, variance 1 on the train split;
``EvalConfig.standardize``), where SAEBench fits raw features. Without it, C = 1 means a
different regularization strength for every feature scale: mean-pooled SAE codes, raw
hidden units and a few massive residual dimensions differ by orders of magnitude, so the
llm-vs-sae comparison would partly compare scales, and L-BFGS needs many more iterations.
Features constant on the train split are dropped from the full-width probe (they would be
zero after standardizing). Standardizing does not change which k features are chosen.
The full-width probes are sklearn fits too (SAEBench trains those on a GPU with Adam).

Averages follow SAEBench: a dataset's metric is the mean over its tasks, and the
headline metric the mean over datasets.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from esosae.data.models import LoadedModel
from esosae.evals import probe_cache, tasks
from esosae.evals.config import EvalConfig
from esosae.evals.probe_cache import ProbeActivations
from esosae.evals.tasks import Task
from esosae.run.atomic import atomic_write_text
from esosae.sae.backend import TORCH
from esosae.sae.model import DualLayerSAE

LLM_RESULTS = "llm_results.json"


# -- features --------------------------------------------------------------------------


def sae_features(sae: DualLayerSAE, x: torch.Tensor) -> torch.Tensor:
    """[f1, f2] (B, m1 + m2) of raw activations x (B, d); [f1] for a single-layer SAE."""
    return sae.features(x * sae.scale, TORCH)


@torch.no_grad()
def pooled_sae_features(sae: DualLayerSAE, acts: ProbeActivations, batch_tokens: int) -> np.ndarray:
    """(n_texts, m1 + m2) float32: each text's features averaged over its token rows."""
    device = next(sae.parameters()).device
    offsets = acts.offsets
    n_texts = len(offsets) - 1
    pooled = np.zeros((n_texts, sae.cfg.m1 + sae.cfg.m2), np.float32)
    first = 0
    while first < n_texts:
        # texts [first, last) whose rows fit one batch (at least one text)
        last = max(int(np.searchsorted(offsets, offsets[first] + batch_tokens, side="right")) - 1, first + 1)
        last = min(last, n_texts)
        lo, hi = int(offsets[first]), int(offsets[last])
        x = torch.from_numpy(acts.rows[lo:hi].astype(np.float32)).to(device)  # (n_tok, d)
        counts = torch.from_numpy(np.diff(offsets[first:last + 1]))  # (n,)
        text_of_row = torch.repeat_interleave(torch.arange(last - first), counts).to(device)  # (n_tok,)
        f = sae_features(sae, x)  # (n_tok, F)
        sums = torch.zeros(last - first, f.shape[1], device=device).index_add_(0, text_of_row, f)  # (n, F)
        pooled[first:last] = (sums / counts.clamp_min(1)[:, None].to(device)).cpu().numpy()
        first = last
    return pooled


# -- probes ----------------------------------------------------------------------------


def top_k(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns of X (n, F) with the largest |mean(pos) − mean(neg)|."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))  # (F,)
    return np.argsort(-diff, kind="stable")[:k]


def fit_probe(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
              cfg: EvalConfig) -> tuple[float, float, bool]:
    """(test accuracy, test ROC AUC, converged) of an L2 logistic regression."""
    if cfg.standardize:
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    probe = LogisticRegression(C=cfg.probe_c, max_iter=cfg.max_iter)  # L2 is sklearn's default penalty
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(X_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    acc = accuracy_score(y_test, probe.predict(X_test))
    auc = roc_auc_score(y_test, probe.decision_function(X_test))
    return float(acc), float(auc), converged


def metric_keys(prefix: str, k_values: tuple[int, ...]) -> list[str]:
    """SAEBench's names: {p}_test_accuracy, {p}_top_{k}_test_accuracy, and each with _auc."""
    names = ["test"] + [f"top_{k}_test" for k in k_values]
    return [f"{prefix}_{n}_{m}" for n in names for m in ("accuracy", "auc")]


def probe_task(X: np.ndarray, task: Task, cfg: EvalConfig, prefix: str) -> dict[str, Any]:
    """Every metric of ``metric_keys(prefix)`` for one task, from per-row features X (n, F)."""
    X_train, X_test = X[task.train].astype(np.float64), X[task.test].astype(np.float64)
    out: dict[str, Any] = {}
    unconverged = 0
    full = np.flatnonzero(X_train.std(0) > 0) if cfg.standardize else np.arange(X.shape[1])
    for name, cols in [("test", full)] + [(f"top_{k}_test", top_k(X_train, task.train_y, k)) for k in cfg.k_values]:
        acc, auc, converged = fit_probe(X_train[:, cols], task.train_y, X_test[:, cols], task.test_y, cfg)
        out[f"{prefix}_{name}_accuracy"], out[f"{prefix}_{name}_auc"] = acc, auc
        unconverged += not converged
    out[f"{prefix}_probes_not_converged"] = unconverged
    return out


def mean_over(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


# -- language-model probing --------------------------------------------------------------


def _probe_settings(cfg: EvalConfig) -> dict[str, Any]:
    return {"k_values": list(cfg.k_values), "standardize": cfg.standardize, "probe_c": cfg.probe_c,
            "max_iter": cfg.max_iter}


def llm_results(acts: ProbeActivations, dataset: tasks.ProbeDataset, cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """The ``llm`` probes of every task: read from the cache folder when the probe settings
    match, else fitted and stored there (they do not depend on the SAE)."""
    path = Path(acts.folder) / LLM_RESULTS
    wanted = _probe_settings(cfg)
    try:
        stored = json.loads(path.read_text())
        if stored["settings"] == wanted and set(stored["tasks"]) == {t.name for t in dataset.tasks}:
            return stored["tasks"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    results = {t.name: probe_task(acts.pooled, t, cfg, "llm") for t in dataset.tasks}
    atomic_write_text(path, json.dumps({"settings": wanted, "tasks": results}, indent=1) + "\n")
    return results


def lm_probing(sae: DualLayerSAE, datasets: list[tasks.ProbeDataset], model_name: str, hook: str,
               cache: Path, get_model: Callable[[], LoadedModel], cfg: EvalConfig,
               progress: bool = True) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {task: llm and sae metrics}} over the built datasets."""
    results = {}
    for ds in datasets:
        wanted = probe_cache.settings(ds, model_name, hook, cfg.context_size, (cfg.train_size, cfg.test_size), cfg.seed)
        acts = probe_cache.ensure(ds, wanted, cache, get_model, hook, cfg.llm_batch_tokens, progress)
        if acts.pooled.shape[1] != sae.d:
            raise probe_cache.ProbeCacheError(f"the SAE reads d = {sae.d} activations but {hook} of {model_name} "
                                              f"has d = {acts.pooled.shape[1]}")
        llm = llm_results(acts, ds, cfg)
        X = pooled_sae_features(sae, acts, cfg.sae_batch)  # (n_texts, F)
        results[ds.name] = {t.name: {"n_train": len(t.train), "n_test": len(t.test), **llm[t.name],
                                     **probe_task(X, t, cfg, "sae")} for t in ds.tasks}
    return results


# -- the SAEBench-shaped result ----------------------------------------------------------


def summarize(results: dict[str, dict[str, dict[str, Any]]], cfg: EvalConfig) -> tuple[dict, list]:
    """(eval_result_metrics, eval_result_details): per-dataset means over tasks, then the
    mean over datasets, split into SAEBench's ``llm`` and ``sae`` sections; and a
    ``consistency`` section: the std of every AUC over all tasks (METHOD.md §7's AUC
    consistency across tasks; across seeds it needs several runs)."""
    keys = {p: metric_keys(p, cfg.k_values) for p in ("llm", "sae")}
    details = [{"dataset_name": name, **mean_over(list(per_task.values()), keys["llm"] + keys["sae"])}
               for name, per_task in results.items()]
    metrics = {p: mean_over(details, keys[p]) for p in ("llm", "sae")}
    every_task = [t for per_task in results.values() for t in per_task.values()]
    metrics["consistency"] = {f"{k}_task_std": float(np.std([t[k] for t in every_task]))
                              for p in ("llm", "sae") for k in keys[p] if k.endswith("_auc")}
    return metrics, details
