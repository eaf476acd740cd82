"""The language model's activations on a probing dataset's texts, cached on disk per
(model, hook, dataset files, sizes, seed, context), so a second SAE costs only its own encoding.

SAE features are nonlinear in the activations, so their per-text mean needs every token:
the cache keeps each text's per-token activations (text positions only, BOS and pad
dropped), compactly. One folder ``<cache>/probing/<model>__<hook>__<dataset>__<digest>/``:

    meta.json     the manifest (esosae/run/manifest.py): settings, the texts' sha256, row
                  counts, the byte size and sha256 of every file below, and a checksum of
                  meta.json's own content (all checked on every reuse, as the harvest cache is)
    rows.npy      (n_tokens, d) float16: text i's tokens are rows[offsets[i]:offsets[i + 1]]
    offsets.npy   (n_texts + 1,) int64
    pooled.npy    (n_texts, d) float32: each text's mean row (the ``llm`` probes' inputs),
                  taken over the float16 rows so that both probe families see the same data;
                  zero for a text made only of special tokens (it has no rows)

Texts are tokenized as [BOS, ≤ context_size text tokens], right-padded, and run up to the
hook only (``stop_at_layer``) longest first, in batches of at most ``batch_tokens`` padded
tokens, so short texts share large batches and long ones waste little padding. The folder
is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from esosae.data.models import LoadedModel, hook_activations, note
from esosae.errors import UserError
from esosae.evals.tasks import ProbeDataset
from esosae.run import manifest
from esosae.run.atomic import atomic_dir, build_lock

FORMAT_VERSION = 1
FILES = ("rows.npy", "offsets.npy", "pooled.npy")


class ProbeCacheError(UserError):
    """Probing activations that cannot be computed or stored; the message says what to change."""


@dataclass
class ProbeActivations:
    """An opened cache; ``rows`` stays memory-mapped."""

    folder: Path
    rows: np.ndarray
    """(n_tokens, d) float16, memory-mapped."""
    offsets: np.ndarray
    """(n_texts + 1,) int64."""
    pooled: np.ndarray
    """(n_texts, d) float32."""


def texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def settings(dataset: ProbeDataset, model: str, hook: str, context_size: int, sizes: tuple[int, int],
             seed: int) -> dict[str, Any]:
    """Everything the cached arrays depend on; reuse needs equality."""
    return {"format": FORMAT_VERSION, "model": model, "hook": hook, "dataset": dataset.source,
            "context_size": context_size, "train_size": sizes[0], "test_size": sizes[1], "seed": seed,
            "texts_sha256": texts_sha256(dataset.texts), "n_texts": len(dataset.texts)}


def cache_folder(root: Path, wanted: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:10]
    slug = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(wanted[k])).strip("-")
                     for k in ("model", "hook")) + "__" + re.sub(r"[^A-Za-z0-9._-]+", "-", wanted["dataset"]["name"])
    return root / "probing" / f"{slug}__{digest}"


def open_cache(folder: Path) -> ProbeActivations:
    return ProbeActivations(folder, np.load(folder / "rows.npy", mmap_mode="r"),
                            np.load(folder / "offsets.npy"), np.load(folder / "pooled.npy"))


def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Text indices longest first, cut into batches of at most ``batch_tokens`` padded
    tokens (BOS included; a longer text goes alone)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, batch_tokens // (int(lengths[order[start]]) + 1))  # the first is the longest
        batches.append(order[start:start + size])
        start += size
    return batches


def harvest(model: LoadedModel, texts: list[str], hook: str, context_size: int, batch_tokens: int, folder: Path,
            wanted: dict[str, Any], progress: bool) -> None:
    """Run ``model`` over ``texts`` to ``hook`` and write a complete cache to ``folder``."""
    ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    special = set(model.special_ids.tolist())
    lengths = np.array([sum(t not in special for t in row[:context_size]) for row in ids])  # (n_texts,)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n_texts + 1,)
    padded = np.array([len(row[:context_size]) for row in ids])  # (n_texts,) tokens run, special or not
    with atomic_dir(folder) as tmp:
        rows = np.lib.format.open_memmap(tmp / "rows.npy", mode="w+", dtype=np.float16,
                                         shape=(int(offsets[-1]), model.d_model))
        pooled = np.zeros((len(texts), model.d_model), np.float32)
        bar = tqdm(total=int(offsets[-1]), unit="tok", unit_scale=True, desc="probing activations",
                   dynamic_ncols=True, mininterval=2.0, disable=not progress)
        for part in length_batches(padded, batch_tokens):
            tokens, keep = model.encode([texts[i] for i in part], context_size)  # (B, 1 + T) each
            acts = hook_activations(model, tokens, hook).to("cpu", torch.float16)  # (B, 1 + T, d)
            if not torch.isfinite(acts).all():
                raise ProbeCacheError(f"activations at {hook} overflow float16 on probing texts; "
                                      "probe an earlier hook")
            for b, i in enumerate(part):
                text_rows = acts[b][keep[b]].numpy()  # (lengths[i], d)
                rows[offsets[i]:offsets[i + 1]] = text_rows
                if len(text_rows):
                    pooled[i] = text_rows.astype(np.float32).mean(0)
            bar.update(int(keep.sum()))
        bar.close()
        rows.flush()
        del rows
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "pooled.npy", pooled)
        manifest.write(tmp, wanted, list(FILES), d=model.d_model, n_tokens=int(offsets[-1]))


def ensure(dataset: ProbeDataset, wanted: dict[str, Any], root: Path, get_model: Callable[[], LoadedModel],
           hook: str, batch_tokens: int, progress: bool = True) -> ProbeActivations:
    """The cache for ``dataset``: reused when it matches, otherwise computed (the model is
    loaded through ``get_model`` only then), one process at a time (``build_lock``)."""
    folder = cache_folder(root, wanted)
    found = manifest.read(folder, wanted)  # the verified manifest, or why the cache cannot be used
    if isinstance(found, str):
        with build_lock(folder.parent):
            found = manifest.read(folder, wanted)  # another process may have built it meanwhile
            if isinstance(found, str):
                if folder.exists():
                    note(f"probing cache {folder}: {found}; rebuilding it")
                note(f"caching {wanted['model']} activations at {hook} on {len(dataset.texts):,} "
                     f"{dataset.name} texts in {folder}")
                harvest(get_model(), dataset.texts, hook, wanted["context_size"], batch_tokens, folder, wanted,
                        progress)
    return open_cache(folder)
