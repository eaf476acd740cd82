"""What the cache directory holds, and deleting what has not been used for a while:

    python -m esosae.data.caches                                 every cache: kind, size, last use
    python -m esosae.data.caches --unused-days 30                those not used for 30 days
    python -m esosae.data.caches --unused-days 30 --delete       ... deleted

The cache directory (``--cache-dir``, default as train.py's: ``$XDG_CACHE_HOME/esosae``, else
``~/.cache/esosae``) has one folder per kind (``models/``, ``activations/``, ``probing/``,
``ce/``) and in it one entry per cache: a folder, or a JSON file for ``ce/``. Caches of
settings no longer used (another token count, other probing sizes) are never removed by
the commands that build them; this is how to find and reclaim them.

An entry's last use is its modification time: building a cache sets it and every verified
reuse refreshes it (``manifest.mark_used``). Leftovers of a build that was killed
(``.<name>.<random>.tmp`` folders) are listed as ``leftover``; a build in progress keeps
its leftover's time recent (each chunk it writes is a new file), so the same age rule
applies to them. Deleting holds the kind's ``build_lock`` and reads the time again under it,
so a cache that a build or a reuse is verifying meanwhile is kept.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from esosae.args import OneLineParser, add_fields
from esosae.config import ConfigError, Range
from esosae.data.models import cache_root
from esosae.errors import UserError
from esosae.run.atomic import build_lock

PROG = "python -m esosae.data.caches"
EXIT_USAGE = 2
DAY_S = 86_400.0


@dataclass(frozen=True)
class CacheFlags:
    """The flags of ``python -m esosae.data.caches`` (esosae.args builds the parser from these)."""

    cache_dir: str | None = None
    """The cache directory (default: $XDG_CACHE_HOME/esosae, else ~/.cache/esosae)."""
    unused_days: Annotated[float, Range(ge=0)] | None = None
    """Only the caches not used for at least this many days."""
    delete: bool = False
    """Delete the caches listed (needs --unused-days)."""


@dataclass(frozen=True)
class Entry:
    """One cache (or leftover of a killed build) in a kind's folder."""

    kind: str
    path: Path
    bytes: int
    last_used: float
    """Unix time of the last build or verified reuse (the entry's modification time)."""

    @property
    def leftover(self) -> bool:
        return self.path.name.startswith(".")


def _size(path: Path) -> int:
    """Bytes of a file, or of every file below a folder (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def entries(root: Path) -> list[Entry]:
    """Every entry of every kind under ``root``, least recently used first."""
    found = []
    for kind in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in kind.iterdir():
            try:
                found.append(Entry(kind.name, path, _size(path), path.lstat().st_mtime))
            except FileNotFoundError:
                continue  # renamed into place or deleted while we looked
    return sorted(found, key=lambda e: (e.last_used, e.kind, e.path.name))


def _human(n: float) -> str:
    """1234567 → '1.2 MB'."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def table(found: list[Entry], now: float) -> list[str]:
    """One line per entry: kind, size, last use (and days ago), name."""
    lines = [f"{'kind':<12} {'size':>9}  {'last used':<16} {'days':>6}  name"]
    for e in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        name = e.path.name + ("  (leftover of a killed build)" if e.leftover else "")
        lines.append(f"{e.kind:<12} {_human(e.bytes):>9}  {when:<16} {(now - e.last_used) / DAY_S:>6.1f}  {name}")
    return lines


def delete_unused(found: list[Entry], unused_days: float, now: float) -> list[Entry]:
    """Delete each entry still unused for ``unused_days`` when checked again under its kind's
    build lock; returns those deleted."""
    deleted = []
    for e in found:
        with build_lock(e.path.parent):
            try:
                if now - e.path.lstat().st_mtime < unused_days * DAY_S:
                    continue  # used since it was listed
            except FileNotFoundError:
                continue
            if e.path.is_dir() and not e.path.is_symlink():
                shutil.rmtree(e.path)
            else:
                e.path.unlink()
            deleted.append(e)
    return deleted


def main(argv: list[str] | None = None) -> int:
    """List the caches (those unused for --unused-days), and with --delete delete them."""
    p = OneLineParser(prog=PROG, description="List the caches, and delete those not used for a while.")
    add_fields(p, CacheFlags, defaults=True)
    try:
        ns = p.parse_args(sys.argv[1:] if argv is None else argv)
        if ns.delete and ns.unused_days is None:
            raise ConfigError("--delete needs --unused-days N: it deletes the caches not used for N days")
        root = cache_root(ns.cache_dir)
        if not root.is_dir():
            raise ConfigError(f"no cache directory at {root}; give the one train.py used with --cache-dir")
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    now = time.time()
    found = [e for e in entries(root)
             if ns.unused_days is None or now - e.last_used >= ns.unused_days * DAY_S]
    which = "" if ns.unused_days is None else f" not used for {ns.unused_days:g} day{'s' * (ns.unused_days != 1)}"
    print(f"{root}: {len(found)} caches{which}, {_human(sum(e.bytes for e in found))}")
    if found:
        print("\n".join(table(found, now)))
    if ns.delete:
        gone = delete_unused(found, ns.unused_days, now)
        print(f"deleted {len(gone)} ({_human(sum(e.bytes for e in gone))})"
              + (f"; kept {len(found) - len(gone)} used meanwhile" if len(gone) < len(found) else ""))
    elif found and ns.unused_days is not None:
        print(f"to delete them: {PROG} --unused-days {ns.unused_days:g} --delete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
