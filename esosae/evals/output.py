"""Evaluation results in SAEBench's output shape, written atomically into ``RUN_DIR/eval/``.

Every file is one JSON object:

    eval_type_id              "core" | "sparse_probing" | "curriculum"
    eval_config               the settings that produced it
    eval_id                   a fresh uuid4 per evaluation
    datetime_epoch_millis     when it finished
    eval_result_metrics       {category: {metric: value}}: the headline numbers
    eval_result_details       [{...}]: per dataset (probing), per layer (core), curves (curriculum)
    eval_result_unstructured  anything finer (per task, per feature), or null
    sae_bench_commit_hash, sae_lens_id, sae_lens_release_id, sae_lens_version
                              SAEBench's provenance keys: null, the run directory's name,
                              "esosae", null
    sae_cfg_dict              the SAE: architecture, d_in, d_sae, hook, model, and the full SAEConfig
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from esosae.config import TrainConfig
from esosae.data.models import stop_layer
from esosae.run.atomic import atomic_write_text
from esosae.run.layout import EVAL_DIR


def sae_cfg_dict(cfg: TrainConfig, d_in: int) -> dict[str, Any]:
    """SAEBench's ``sae_cfg_dict``, in SAELens' key names where one exists."""
    sae = cfg.sae
    lm = cfg.data.source == "lm"
    layer = stop_layer(cfg.model.hook) if lm else None
    return {"architecture": sae.arch, "d_in": d_in, "d_sae": sae.m1 + sae.m2, "m1": sae.m1, "m2": sae.m2,
            "model_name": cfg.model.model if lm else None, "hook_name": cfg.model.hook if lm else None,
            "hook_layer": layer - 1 if layer is not None else None, "dtype": "float32",
            "context_size": cfg.data.context_size if lm else None,
            "dataset_path": cfg.data.dataset if lm else f"synthetic:{cfg.data.synthetic}",
            "normalize_activations": cfg.data.normalize, "esosae": dataclasses.asdict(sae)}


def envelope(eval_type_id: str, eval_config: dict[str, Any], metrics: dict[str, dict[str, Any]],
             details: list[dict[str, Any]], unstructured: Any, run_dir: Path,
             sae_cfg: dict[str, Any]) -> dict[str, Any]:
    return {"eval_type_id": eval_type_id, "eval_config": eval_config, "eval_id": str(uuid.uuid4()),
            "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
            "eval_result_details": details, "eval_result_unstructured": unstructured,
            "sae_bench_commit_hash": None, "sae_lens_id": run_dir.resolve().name,
            "sae_lens_release_id": "esosae", "sae_lens_version": None, "sae_cfg_dict": sae_cfg}


def _finite(obj: Any) -> Any:
    """NaN and ±inf become null: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write(run_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/eval/<name>.json`` atomically; returns its path."""
    path = run_dir / EVAL_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
    return path
