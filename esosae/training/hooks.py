"""Several hooks in one pass (``--hook blocks.4.hook_out,blocks.6.hook_out``): one SAE per hook,
every language-model forward shared, stopped after the deepest hook.

    OUT/config.json          the settings as given (all hooks)
    OUT/<hook>/              a whole run directory per hook: its config.json (that hook
                             alone), metrics, checkpoints, sae/, evaluations

- cache mode: the hooks' caches are built in one harvest pass (a cache per hook, each the
  same as its hook's own harvest would give, so single-hook runs reuse them), then the
  SAEs train one after another, each reading its cache;
- stream mode: one producer thread feeds every hook's source (esosae/data/stream.py) and
  the SAEs train side by side, a thread each, in step with the shared windows; under
  torchrun each thread's collectives use a process group of its own.

``--resume OUT`` resumes each hook's run from its own checkpoint (a hook whose run had not
started starts). A Ctrl-C stops every hook's run after its current step, each with a
checkpoint. With one hook none of this applies: OUT is that hook's run directory.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from esosae.config import TrainConfig
from esosae.data.activations import ensure_caches
from esosae.data.stream import StreamSource, open_streams
from esosae.run.atomic import Interrupted
from esosae.run.checkpoint import latest_checkpoint
from esosae.run.layout import CONFIG_FILE, Claim
from esosae.sae.backend import resolve_device
from esosae.training.distributed import Dist
from esosae.training.loop import SigintGuard, Trained, run


def hook_dir(run_dir: Path, hook: str) -> Path:
    """The run directory of one hook of several."""
    return run_dir / re.sub(r"[^A-Za-z0-9._-]+", "-", hook)


def hook_configs(cfg: TrainConfig, run_dir: Path) -> list[tuple[TrainConfig, Path]]:
    """(config of one hook, its run directory) for every hook of ``cfg``."""
    out = []
    for hook in cfg.model.hooks:
        folder = hook_dir(run_dir, hook)
        d = cfg.to_dict()
        d["model"]["hook"], d["out_dir"] = hook, str(folder)
        out.append((TrainConfig.from_dict(d), folder))
    return out


def train_hooks(cfg: TrainConfig, run_dir: Path, resume: bool, dist: Dist | None) -> list[Trained]:
    """Train one SAE per hook of ``cfg`` into ``run_dir``/<hook>/; returns the trained runs
    (none on ranks other than 0). Every hook is checked against the model (while the caches
    are built or the stream opens) before ``run_dir`` is touched."""
    runs = hook_configs(cfg, run_dir)
    is_main = dist is None or dist.is_main
    device = dist.device if dist is not None else resolve_device(cfg.device)
    if cfg.data.activations == "stream":
        if not is_main:
            dist.barrier()  # rank 0 loads the model first (the embedded one is dequantized once)
        sources = open_streams(cfg, device)
        if dist is not None and is_main:
            dist.barrier()
        dists = [dist.subgroup() if dist is not None else None for _ in runs]  # a group per thread
    elif is_main:  # the other ranks wait for the caches in the first run's barrier
        ensure_caches([one for one, _ in runs], device)
    claim = Claim(run_dir) if not resume and is_main else None
    try:
        if claim is not None:
            claim.begin()
            cfg.to_json(run_dir / CONFIG_FILE)
        if cfg.data.activations == "stream":
            trained = _side_by_side(runs, sources, dists)
        else:
            trained = [run(one, folder, resume=_resuming(folder), dist=dist) for one, folder in runs]
    except BaseException:
        if claim is not None:
            if any(latest_checkpoint(folder) is not None for _, folder in runs):
                claim.commit()  # a hook's new run stands on its own: keep it, drop the old run
            else:
                claim.abort()
        raise
    if claim is not None:
        claim.commit()
    return [t for t in trained if t is not None]


def _resuming(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def _side_by_side(runs: list[tuple[TrainConfig, Path]], sources: dict[str, StreamSource],
                  dists: list[Dist | None]) -> list[Trained | None]:
    """The hooks' runs in a thread each, reading one stream (under torchrun each with its
    own process group); the first error is raised."""
    results: list[Trained | None] = [None] * len(runs)
    errors: list[BaseException] = []

    def train(i: int, one: TrainConfig, folder: Path) -> None:
        try:
            results[i] = run(one, folder, resume=_resuming(folder), dist=dists[i], progress=i == 0,
                             source=sources[one.model.hook])
        except BaseException as e:  # noqa: BLE001 - handed to the main thread; the other hooks stop at their next step
            errors.append(e)
            sources[one.model.hook].close()
            SigintGuard.stop_all.set()

    with SigintGuard():  # a Ctrl-C here asks every hook's loop to stop after its step
        threads = [threading.Thread(target=train, args=(i, one, folder), daemon=True, name=f"esosae-{one.model.hook}")
                   for i, (one, folder) in enumerate(runs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a timed join lets the main thread take its signals
    if errors:
        failures = [e for e in errors if not isinstance(e, Interrupted)]
        raise (failures or errors)[0]
    return results
