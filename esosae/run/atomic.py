"""Crash-safe file writes: a file or folder appears complete or not at all.

Each writer fills a temporary sibling ``.NAME.<random>.tmp``, flushes it to disk and
renames it into place; ``os.replace`` is atomic on POSIX, so an interrupted write leaves
the old version (or nothing) behind, never a torn file. A process killed mid-write leaves
its temporary sibling behind: ``remove_orphaned_temps`` clears them where no other process
writes. ``deferred_sigint`` holds Ctrl-C back while a write that must finish runs, and
``Interrupted`` is how a clean stop on Ctrl-C reaches the command line (exit code 130).
``build_lock`` lets one process at a time build a shared cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

TEMP_GLOB = ".*.*.tmp"
"""The temporary siblings the writers below create (``tempfile.mk*temp`` names)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the work cleanly: what was being written is whole or absent, and the
    message says what was kept and what to run next. The CLIs print it as one line and exit
    with 130. A KeyboardInterrupt, so that no ``except Exception`` swallows it and code that
    handles Ctrl-C handles it too."""


@contextlib.contextmanager
def deferred_sigint(deliver: bool = True) -> Iterator[None]:
    """Holds Ctrl-C back while the block runs (a write that must not be torn or abandoned),
    then, if one came, hands it once to the handler that was in place, as if it had arrived
    just then; with ``deliver=False`` it is dropped (the caller is stopping anyway). If the
    block raises, a held Ctrl-C is dropped and the exception goes on. Signals reach only
    the main thread, so elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # no Python-level handler to put back (installed from C): leave it alone
        return
    held: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if held and deliver:
        signal.raise_signal(signal.SIGINT)  # runs the restored handler before returning


def remove_orphaned_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary siblings (files or folders) that writes into ``folder`` left
    behind when their process was killed; returns what was removed. Only for a folder no
    other process is writing into, such as a run directory as its run starts."""
    removed = []
    for tmp in sorted(Path(folder).glob(TEMP_GLOB)):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # read it by setting it, then put it back
    os.umask(mask)
    return mask


UMASK = _umask()
"""The process's umask: files written atomically get the permissions a plain ``open`` would
give them (mkstemp and mkdtemp make private 0600/0700 ones)."""


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it replaces the folder ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One cache build at a time under ``root``: another process (a data-parallel rank, a
    second run of a grid) waits here, then finds the cache built instead of building it again."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
