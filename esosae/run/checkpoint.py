"""The run's checkpoints: written whole, checksummed, and trusted only when they check out.

Files: ``RUN_DIR/checkpoints/step_XXXXXXXX.pt`` (the last ``keep_checkpoints`` of them).

Format. A checkpoint is what ``torch.save`` writes for

    {"step": int, "model": the SAE's state_dict, "optim": Adam's state_dict,
     "scale": float (input normalization s), "config": TrainConfig.to_dict(),
     "rng": torch's CPU generator state, "data": the data position (streamed sources only)}

(a zip archive, which ``torch.load`` reads as it is), with a trailer in the zip's own
comment field, the free text the format allows after its end-of-central-directory record:

    b"esosae-checkpoint sha256:" + 64 hex digits

the sha256 of every byte before the comment with the comment-length field (the record's
last two bytes) read as zero, i.e. of exactly the bytes ``torch.save`` wrote. Zip readers,
``torch.load`` among them, ignore the comment. A file torn by a crash has no trailer, and a
flipped or lost byte anywhere changes the digest: both are found by reading the bytes,
before ``torch.load`` is given the file (``verify``).

Every random draw of training is a pure function of (seed, step), and a cached source's
batch of the step; the generator state is stored and restored all the same, and a streamed
source's position (esosae/data/stream.py) is stored because the step alone does not give it.

Resuming (``resume_checkpoint``) takes the newest checkpoint that verifies; newer ones
that do not are renamed ``*.pt.corrupt`` with a message, and if none verifies the run stops
with one line naming each. The checkpoint must then belong to this run: its stored config
must equal the run's (config.json) in every field that changes the result, that is every
field except ``RUN_ONLY_FIELDS``, and its tensors must have the model's shapes; otherwise
one line names the fields and values, or the tensors and shapes. Temporary files of writes
killed mid-way (``runio``'s ``.NAME.*.tmp``) are removed from the run directory.

Writing (``save_checkpoint``) goes through ``runio.atomic_file`` with Ctrl-C held back until
the file is whole and in place; a full disk (ENOSPC, EDQUOT, or the RuntimeError that
``torch.save`` wraps them in) is one line naming disk space and the folder, and the
previous checkpoint is left as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esosae.config import TrainConfig
from esosae.errors import UserError
from esosae.run.atomic import atomic_file, deferred_sigint, remove_orphaned_temps
from esosae.run.layout import CHECKPOINT_DIR

TRAILER_PREFIX = b"esosae-checkpoint sha256:"
TRAILER_LEN = len(TRAILER_PREFIX) + 64
EOCD_SIGNATURE = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes, then the comment
EOCD_LEN = 22
KEYS = ("step", "model", "optim", "scale", "config")
CORRUPT_SUFFIX = ".corrupt"

RUN_ONLY_FIELDS = frozenset({
    "out_dir", "eval", "profile", "log", "log_every", "checkpoint_every", "keep_checkpoints",
    "device", "backend", "model.cache_dir", "data.harvest_batch",
})
"""Config fields that may differ between a checkpoint and the run resuming it: where the run
lives and what it reports (out_dir, eval, profile, log, log_every), how often and how many
checkpoints it keeps, where its activation cache lives and how many contexts each harvest
pass takes (the cached rows do not depend on it), and which device and kernel backend run
the step (the same math, held to the same float64 reference). Every other field changes the
trained weights and must be equal."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written or resumed from; the message names it and what to do."""


class Damaged(Exception):
    """A checkpoint file that fails verification; the message says how, in a few words."""


# -- names ----------------------------------------------------------------------------


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (verified or not)."""
    return sorted((run_dir / CHECKPOINT_DIR).glob("step_*.pt"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


# -- writing --------------------------------------------------------------------------


class _HashingFile:
    """The file object ``torch.save`` writes into: passes the bytes on, hashes them, keeps the
    last EOCD_LEN of them, and remembers the OSError of a failed write (torch re-raises it as
    a RuntimeError that does not say what happened)."""

    def __init__(self, fh: Any):
        self.fh, self.sha, self.tail, self.error = fh, hashlib.sha256(), b"", None

    def write(self, data: Any) -> int:  # bytes or a memoryview (not copied)
        try:
            n = self.fh.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(data)
        self.tail = (self.tail + bytes(data[-EOCD_LEN:]))[-EOCD_LEN:]
        return n

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as e:
            self.error = e
            raise


def _write(state: dict[str, Any], path: Path) -> None:
    """torch.save ``state`` to ``path`` atomically, with the checksum trailer (see the module)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        out = _HashingFile(fh)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        if not (out.tail.startswith(EOCD_SIGNATURE) and out.tail.endswith(b"\0\0")):
            raise RuntimeError("torch.save did not end with a zip end-of-central-directory record "
                               "without a comment; esosae.run.checkpoint needs updating for this torch")
        fh.seek(-2, os.SEEK_END)
        fh.write(struct.pack("<H", TRAILER_LEN) + TRAILER_PREFIX + out.sha.hexdigest().encode())


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, or what it wraps), if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_failure(e: OSError, path: Path, previous: Path | None) -> str:
    folder = path.parent
    kept = (f"{previous.name} is intact; free some space and resume from it"
            if previous is not None else "no checkpoint was written; free some space and start again")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
        except OSError:
            free = "free space unknown"
        what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no disk space left"
        return f"{what} writing checkpoint {path.name} in {folder} ({free}); {kept}"
    return f"cannot write checkpoint {path.name} in {folder}: {e.strerror or e}; {kept}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    cfg: TrainConfig, keep: int, deliver_sigint: bool = True,
                    data: dict[str, int] | None = None) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep``.

    Ctrl-C is held back until the file is whole and in place; it is then handed on (a first
    Ctrl-C asks the loop to stop) unless ``deliver_sigint`` is False, for the checkpoint the
    run writes as it stops anyway. A write that fails leaves the earlier checkpoints as they
    were and raises a one-line CheckpointError. ``data``: the source's data position, if any.
    """
    path = checkpoint_path(run_dir, step)
    previous = latest_checkpoint(run_dir)
    state = {"step": step, "model": model.state_dict(), "optim": opt.state_dict(),
             "scale": model.scale, "config": cfg.to_dict(), "rng": torch.get_rng_state()}
    if data is not None:
        state["data"] = data
    try:
        with deferred_sigint(deliver=deliver_sigint):
            _write(state, path)
            for old in checkpoints(run_dir)[:-keep]:
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:
        err = _os_error(e)
        if err is None:
            raise
        raise CheckpointError(_write_failure(err, path, previous)) from None
    return path


# -- reading --------------------------------------------------------------------------


def verify(path: Path) -> None:
    """Raises Damaged unless ``path`` ends with a checksum trailer that matches its bytes."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < EOCD_LEN + TRAILER_LEN:
                raise Damaged(f"only {size} bytes")
            body = size - TRAILER_LEN - 2  # everything before the comment-length field
            fh.seek(body)
            end = fh.read(2 + TRAILER_LEN)
            digest = end[2 + len(TRAILER_PREFIX):]
            if end[:2] != struct.pack("<H", TRAILER_LEN) or not end[2:].startswith(TRAILER_PREFIX):
                raise Damaged("no checksum: torn, truncated or not written by esosae")
            sha, left = hashlib.sha256(), body
            fh.seek(0)
            while left:
                block = fh.read(min(left, 1 << 24))
                if not block:
                    raise Damaged("shorter than it says")
                sha.update(block)
                left -= len(block)
            sha.update(b"\0\0")
    except OSError as e:
        raise Damaged(f"unreadable: {e.strerror or e}") from None
    if sha.hexdigest().encode() != digest:
        raise Damaged("checksum mismatch: its bytes changed after it was written")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The verified contents of one checkpoint file; Damaged if it does not verify."""
    verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in KEYS if k not in state]
        step = int(state["step"]) if "step" in state else None
    except Exception as e:  # it verified, so this is a file esosae did not write this way
        raise Damaged(f"checksum matches but torch.load fails ({type(e).__name__})") from None
    if missing:
        raise Damaged(f"no {', '.join(missing)} in it")
    state["step"] = step
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``read_checkpoint`` with a damaged file as a one-line CheckpointError."""
    try:
        return read_checkpoint(path)
    except Damaged as e:
        raise CheckpointError(f"checkpoint {path} is corrupt ({e}); delete it to resume from an "
                              "earlier one") from None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, stored value, run's value) for every field outside RUN_ONLY_FIELDS that differs;
    a field only one side has (added or removed since the checkpoint) is not compared."""
    a, b = _flat(stored), _flat(cfg.to_dict())
    return [(k, a[k], b[k]) for k in b if k in a and k not in RUN_ONLY_FIELDS and a[k] != b[k]]


def _check_config(path: Path, state: dict[str, Any], cfg: TrainConfig) -> None:
    diff = config_differences(state["config"], cfg)
    if diff:
        fields = ", ".join(f"{k.rsplit('.', 1)[-1]} {json.dumps(x)} (config.json: {json.dumps(y)})"
                           for k, x, y in diff)
        raise CheckpointError(f"checkpoint {path} was written by a run with other settings: {fields}; "
                              "resume it with the config.json it was written with, or start afresh "
                              "with --overwrite")


def _load_into(path: Path, state: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Model and optimizer state from ``state``, or one line naming what does not fit."""
    want, have = model.state_dict(), state["model"]
    problems = [f"{k} {tuple(have[k].shape)} (this run: {tuple(v.shape)})" for k, v in want.items()
                if k in have and tuple(have[k].shape) != tuple(v.shape)]
    problems += [f"{k} missing" for k in want if k not in have]
    problems += [f"{k} unexpected" for k in have if k not in want]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {path} does not fit this run's model: {', '.join(problems[:3])}{more}; "
                              "it was written for other widths; resume it with its own config.json, "
                              "or start afresh with --overwrite")
    try:
        model.load_state_dict(have)
        opt.load_state_dict(state["optim"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this run's model or optimizer ({first}); "
                              "start afresh with --overwrite") from None
    model.scale = state["scale"]
    if "rng" in state:
        torch.set_rng_state(state["rng"])


def resume_checkpoint(run_dir: Path, cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
                      say: Callable[[str], None] | None) -> tuple[int, dict[str, int] | None]:
    """Load the run's newest intact checkpoint into ``model`` and ``opt``; returns its step
    (0 when the run has no checkpoint yet) and its data position (None when it has none).

    ``say`` is given to the one process that owns the run directory (rank 0): it renames
    damaged newer checkpoints to ``*.pt.corrupt`` (so they are neither resumed nor counted
    among the kept ones), removes orphaned temporary files, and reports through ``say``.
    The other ranks pass None and only read. Nothing is changed on disk when this raises.
    """
    damaged: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(run_dir)):
        try:
            state = read_checkpoint(path)
            break
        except Damaged as e:
            damaged.append((path, str(e)))
    else:
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {run_dir / CHECKPOINT_DIR}: "
                                  + "; ".join(f"{p.name} is corrupt ({why})" for p, why in damaged)
                                  + f"; restore one or start afresh with --out-dir {run_dir} --overwrite")
        state = None
    if state is not None:
        _check_config(path, state, cfg)
        _load_into(path, state, model, opt)
    if say is not None:
        for p, why in damaged:
            os.replace(p, p.with_name(p.name + CORRUPT_SUFFIX))
        if damaged:
            say(f"corrupt checkpoint{'s' * (len(damaged) > 1)} in {run_dir / CHECKPOINT_DIR}: "
                + "; ".join(f"{p.name} ({why})" for p, why in damaged)
                + f"; set aside as *.pt{CORRUPT_SUFFIX}, resuming from {path.name} (step {state['step']})")
        if run_dir.is_dir():
            for folder in [run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[0] != ".")]:
                remove_orphaned_temps(folder)
    return (0, None) if state is None else (state["step"], state.get("data"))
