"""Harvest a language model's activations at a hook into an on-disk cache, and serve them.

One cache is a folder ``<cache>/activations/<model>__<hook>__<dataset hash>/``:

    meta.json           the manifest (esosae/run/manifest.py): the settings it was built for,
                        row counts, the scale s, the byte size and sha256 of every file
                        below, and a checksum of meta.json's own content
    train_00000.npy …   (≤ CHUNK_ROWS, d) training activations, memory-mapped when read
    heldout.npy         (eval_tokens, d) held-out activations, from contexts that give no
                        training row
    heldout_tokens.npy  (n_contexts, context_size + 1) int32: those held-out contexts

Arrays are float16, or bfloat16 stored as its uint16 bit pattern (numpy has no bfloat16).
Rows are text positions only: BOS, pad and separator positions are dropped (models.py).
The scale s = sqrt(d / mean‖x‖²) over every training row (METHOD.md §1) is stored in
meta.json, so that E‖s·x‖² = d on the cached data.

A cache is written into a temporary sibling and renamed into place when complete, so an
interrupted harvest never leaves a folder that looks finished; a lock on the parent folder
lets one process harvest while others wait for its result. Reuse needs the same
settings (model, hook, dataset files, context size, token counts, dtype, seed) and every
checksum, meta.json's own included, to match; otherwise the cache is rebuilt, with a
message saying why (an edited scale or row count is never trained on).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from esosae.config import TrainConfig
from esosae.data import text
from esosae.data.models import LoadedModel, cache_root, check_hook, hooks_activations, load_model, note
from esosae.data.sources import ArraySource
from esosae.errors import UserError
from esosae.run import manifest
from esosae.run.atomic import Interrupted, atomic_dir, build_lock

FORMAT_VERSION = 1
CHUNK_ROWS = 1 << 17
PID_FILE = "harvesting.pid"
STORAGE = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16)}


class CacheError(UserError):
    """Activations that cannot be harvested or stored; the message says what to change."""


# -- where a cache lives and what it must match ------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def cache_folder(cfg: TrainConfig) -> Path:
    """The folder of the cache for this config's model, hook, dataset list and token counts
    (caches of different sizes, e.g. a quick grid's and the default run's, live side by side)."""
    key = f"{cfg.data.dataset}|{cfg.data.harvest_tokens}|{cfg.data.eval_tokens}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    name = f"{_slug(cfg.model.model)}__{_slug(cfg.model.hook)}__{digest}"
    return cache_root(cfg.model.cache_dir) / "activations" / name


def wanted_settings(cfg: TrainConfig, sources: list[text.TextSource]) -> dict[str, Any]:
    """Everything the cached rows depend on; a cache is reused only if these are equal."""
    d = cfg.data
    return {"format": FORMAT_VERSION, "model": cfg.model.model, "hook": cfg.model.hook,
            "dataset": [s.describe() for s in sources], "context_size": d.context_size,
            "harvest_tokens": d.harvest_tokens, "eval_tokens": d.eval_tokens,
            "dtype": d.cache_dtype, "data_seed": d.data_seed, "shuffle_contexts": text.SHUFFLE_CONTEXTS}


# -- reading -----------------------------------------------------------------------------


def _as_torch(rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return t.view(dtype) if dtype == torch.bfloat16 else t


class ChunkedRows:
    """(N, d) rows spread over memory-mapped chunks; ``rows[idx]`` → tensor in the cache dtype."""

    def __init__(self, chunks: list[np.ndarray], dtype: torch.dtype):
        self.chunks, self.dtype = chunks, dtype
        self.offsets = np.cumsum([0] + [len(c) for c in chunks])  # (n_chunks + 1,)
        self.shape = (int(self.offsets[-1]), int(chunks[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        cuts = np.searchsorted(sorted_idx, self.offsets)  # rows of each chunk: [cuts[c], cuts[c+1])
        parts = [self.chunks[c][sorted_idx[cuts[c]:cuts[c + 1]] - self.offsets[c]]
                 for c in range(len(self.chunks)) if cuts[c + 1] > cuts[c]]
        rows = np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.chunks[0].dtype)
        out = np.empty_like(rows)
        out[order] = rows
        return _as_torch(out, self.dtype)


@dataclass
class ActivationCache:
    """An opened cache: memory-mapped training rows and the held-out set."""

    folder: Path
    meta: dict[str, Any]
    train: ChunkedRows
    heldout: torch.Tensor
    """(eval_tokens, d) in the cache dtype."""
    heldout_tokens: np.ndarray
    """(n_contexts, context_size + 1) int32: the held-out contexts, BOS first."""

    @property
    def scale(self) -> float:
        return float(self.meta["scale"])


def open_cache(folder: Path, meta: dict[str, Any]) -> ActivationCache:
    """Open a cache whose manifest ``meta`` was verified by ``manifest.read`` (or just written):
    meta.json is not read again, and nothing is read into memory but the held-out set."""
    dtype = STORAGE[meta["settings"]["dtype"]][1]
    chunks = [np.load(folder / name, mmap_mode="r") for name in meta["train_files"]]
    heldout = _as_torch(np.load(folder / "heldout.npy"), dtype)
    return ActivationCache(folder, meta, ChunkedRows(chunks, dtype), heldout,
                           np.load(folder / "heldout_tokens.npy"))


# -- harvesting --------------------------------------------------------------------------


class _ChunkWriter:
    """Writes exactly ``total`` rows of width d into .npy chunks of ≤ CHUNK_ROWS rows."""

    def __init__(self, folder: Path, total: int, d: int, np_dtype: Any):
        self.files = [f"train_{i:05d}.npy" for i in range(-(-total // CHUNK_ROWS))]
        self.arrays = [np.lib.format.open_memmap(folder / f, mode="w+", dtype=np_dtype,
                                                 shape=(min(CHUNK_ROWS, total - i * CHUNK_ROWS), d))
                       for i, f in enumerate(self.files)]
        self.total, self.n = total, 0

    def write(self, rows: np.ndarray) -> None:
        rows = rows[:self.total - self.n]
        while len(rows):
            c, at = divmod(self.n, CHUNK_ROWS)
            k = min(len(rows), CHUNK_ROWS - at)
            self.arrays[c][at:at + k] = rows[:k]
            rows, self.n = rows[k:], self.n + k

    def close(self) -> None:
        for a in self.arrays:
            a.flush()
        self.arrays = []


def _remove_stale_temps(folder: Path) -> None:
    """Delete temporary folders left by harvests whose process no longer exists (e.g. killed)."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            os.kill(int((tmp / PID_FILE).read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, ValueError):
            pass  # no pid yet, or another user's process: leave it


@contextlib.contextmanager
def _ctrl_c_stops_cleanly() -> Iterator[None]:
    """Ctrl-C during a harvest: atomic_dir removes the temporary folder, and the command stops
    with one line and exit code 130 (runio.Interrupted) instead of a traceback."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted("interrupted during the activation harvest; no partial cache was kept. "
                          "Run the same command again to harvest from the start") from None


def harvest(cfgs: list[TrainConfig], sources: list[text.TextSource], model: LoadedModel,
            progress: bool = True) -> list[dict[str, Any]]:
    """Run ``model`` once over the text mixture for the hooks of ``cfgs`` (one hook each, the
    same data settings), write a complete cache per hook to its ``cache_folder`` and return
    their manifests. Each cache holds what a harvest of its hook alone would: the same rows
    in the same order (one forward, stopped after the deepest hook, serves them all)."""
    d_cfg, hooks = cfgs[0].data, [c.model.hook for c in cfgs]
    for hook in hooks:
        check_hook(model, hook)
    stream = text.contexts(sources, model.tokenizer, model.bos_id, d_cfg.context_size, d_cfg.data_seed)
    np_dtype, torch_dtype = STORAGE[d_cfg.cache_dtype]
    rng = np.random.default_rng(d_cfg.data_seed)
    held: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    held_tokens = []
    n_held, n_train, t0 = 0, 0, time.perf_counter()
    sum_sq = dict.fromkeys(hooks, 0.0)
    for cfg in cfgs:
        _remove_stale_temps(cache_folder(cfg))
    with _ctrl_c_stops_cleanly(), contextlib.ExitStack() as stack:
        tmps = {h: stack.enter_context(atomic_dir(cache_folder(c))) for h, c in zip(hooks, cfgs)}
        for tmp in tmps.values():
            (tmp / PID_FILE).write_text(str(os.getpid()))
        writers = {h: _ChunkWriter(tmps[h], d_cfg.harvest_tokens, model.d_model, np_dtype) for h in hooks}
        with tqdm(total=d_cfg.eval_tokens + d_cfg.harvest_tokens, unit="tok", unit_scale=True,
                  desc="harvest", dynamic_ncols=True, mininterval=2.0, disable=not progress) as bar:
            for tokens in text.batches(stream, d_cfg.harvest_batch):  # (B, T + 1)
                keep = model.keep(tokens)  # (B, T + 1)
                counts = keep.sum(1)  # (B,)
                to_held = (counts.cumsum(0) - counts) < d_cfg.eval_tokens - n_held  # (B,) whole contexts
                n_rows = int(keep[~to_held].sum())
                order = torch.from_numpy(rng.permutation(n_rows))[:d_cfg.harvest_tokens - n_train]
                for hook, acts in hooks_activations(model, tokens, hooks).items():
                    acts = acts.to("cpu", torch_dtype)  # (B, T + 1, d)
                    if not torch.isfinite(acts).all():
                        raise CacheError(f"activations at {hook} overflow {d_cfg.cache_dtype}; "
                                         "use --cache-dtype bfloat16")
                    if to_held.any():
                        held[hook].append(acts[to_held][keep[to_held]][:d_cfg.eval_tokens - n_held])
                    rows = acts[~to_held][keep[~to_held]][order]  # (n, d) text positions of training contexts
                    sum_sq[hook] += rows.double().square().sum().item()
                    writers[hook].write(rows.view(torch.uint16).numpy() if np_dtype is np.uint16 else rows.numpy())
                if to_held.any():
                    held_tokens.append(tokens[to_held])
                    n_held += len(held[hooks[0]][-1])
                n_train += len(order)
                bar.update(int(keep.sum()))
                if n_train == d_cfg.harvest_tokens:
                    break
        if n_train < d_cfg.harvest_tokens:
            raise CacheError(f"--dataset {d_cfg.dataset!r} ran out after {n_held + n_train:,} tokens; "
                             f"--harvest-tokens {d_cfg.harvest_tokens:,} + --eval-tokens "
                             f"{d_cfg.eval_tokens:,} need more text: lower them or add text")
        seconds = time.perf_counter() - t0
        metas = []
        for hook, cfg in zip(hooks, cfgs):
            tmp, writer = tmps[hook], writers[hook]
            writer.close()
            held_rows = torch.cat(held[hook])
            np.save(tmp / "heldout.npy", held_rows.view(torch.uint16).numpy() if np_dtype is np.uint16
                    else held_rows.numpy())
            np.save(tmp / "heldout_tokens.npy", torch.cat(held_tokens).to(torch.int32).numpy())
            (tmp / PID_FILE).unlink()
            names = writer.files + ["heldout.npy", "heldout_tokens.npy"]
            metas.append(manifest.write(tmp, wanted_settings(cfg, sources), names, d=model.d_model,
                                        train_rows=writer.n, heldout_rows=len(held_rows),
                                        train_files=writer.files,
                                        scale=(model.d_model * writer.n / sum_sq[hook]) ** 0.5,
                                        bos_id=model.bos_id, harvest_seconds=seconds,
                                        tokens_per_s=(n_held + writer.n) / seconds, hooks_in_pass=len(hooks)))
    return metas


def ensure_caches(cfgs: list[TrainConfig], device: torch.device | str = "cpu",
                  progress: bool = True) -> list[ActivationCache]:
    """The caches for ``cfgs`` (one hook each, the same data settings): those that match are
    reused, the others (re)built together in one harvest pass."""
    sources = text.parse_sources(cfgs[0].data.dataset)
    folders = [cache_folder(c) for c in cfgs]

    def verified() -> list[dict[str, Any] | str]:  # each verified manifest, or why it cannot be used
        return [manifest.read(f, wanted_settings(c, sources)) for f, c in zip(folders, cfgs)]

    metas = verified()
    if any(isinstance(m, str) for m in metas):
        with build_lock(folders[0].parent):
            metas = verified()  # another process may have built them meanwhile
            todo = [i for i, m in enumerate(metas) if isinstance(m, str)]
            if todo:
                for i in todo:
                    if folders[i].exists():
                        note(f"activation cache {folders[i]}: {metas[i]}; rebuilding it")
                built = harvest([cfgs[i] for i in todo], sources, load_model(cfgs[0].model, device), progress)
                for i, meta in zip(todo, built):
                    metas[i] = meta
                return [open_cache(f, m) for f, m in zip(folders, metas)]  # type: ignore[arg-type]
    for f in folders:
        note(f"using cached activations in {f}")
    return [open_cache(f, m) for f, m in zip(folders, metas)]  # type: ignore[arg-type]


def ensure_cache(cfg: TrainConfig, device: torch.device | str = "cpu", progress: bool = True) -> ActivationCache:
    """The cache for ``cfg``: reused when it matches, otherwise (re)built."""
    return ensure_caches([cfg], device, progress)[0]


def lm_source(cfg: TrainConfig, device: torch.device | str = "cpu") -> ArraySource:
    """The trainer's source over the cached activations (built first when needed)."""
    cache = ensure_cache(cfg, device)
    info = {"kind": "lm", "model": cfg.model.model, "hook": cfg.model.hook, "dataset": cfg.data.dataset,
            "context_size": cfg.data.context_size, "heldout_rows": len(cache.heldout),
            "cache": str(cache.folder)}
    return ArraySource(cache.train, cache.heldout, seed=cfg.seed, scale=cache.scale, info=info)
