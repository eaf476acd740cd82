"""A cache's manifest: what the cache was built for, its own facts, and every data file's
size and sha256, in one JSON file that carries a checksum of itself.

Used by the activation cache (activations.py) and the probing cache (evals/probe_cache.py).
The file ``<folder>/meta.json`` is one JSON object:

    {"settings": {...},                      what the data depend on; reuse needs equality
     "<fact>": ...,                          the cache's own facts: scale, row counts, ...
     "files": {"<name>": {"bytes": n, "sha256": "<hex>"}, ...},
     "checksum": "<hex>"}

    checksum = sha256(canonical(manifest without "checksum"))
    canonical(m) = json.dumps(m, sort_keys=True, separators=(",", ":")) as UTF-8 bytes

so an edit to any field (a digit of the scale, a row count, a file's checksum, a setting)
or a torn file is caught before anything is trusted; JSON floats round-trip exactly, so the
checksum of a value read back equals the one written. ``read`` checks, in order: the file
parses, its checksum, the settings, then every file's size and sha256, and returns the
manifest (and marks the folder used, ``mark_used``) or a one-phrase reason the caller turns
into "...: <reason>; rebuilding it". A meta.json written before manifests carried a checksum
is a reason too (the cache is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from esosae.run.atomic import atomic_write_text

META = "meta.json"
RESERVED = ("settings", "files", "checksum")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """What a source file holds, for a cache's settings: its name, size and sha256. Not its
    path or mtime, so a cache survives a moved or re-copied data folder whose files are
    unchanged, and is rebuilt when a byte of them changes."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, its own "checksum" field left out."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write(folder: Path, settings: dict[str, Any], files: list[str], **facts: Any) -> dict[str, Any]:
    """Record ``files`` (names in ``folder``) with ``settings`` and ``facts`` into
    ``folder/meta.json``, atomically; returns the manifest as ``read`` would."""
    if clash := set(facts) & set(RESERVED):
        raise ValueError(f"manifest facts may not be named {sorted(clash)}")
    manifest = json.loads(json.dumps({"settings": settings, **facts, "files": {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in files}}))
    manifest["checksum"] = checksum(manifest)
    atomic_write_text(folder / META, json.dumps(manifest, indent=1) + "\n")
    return manifest


def settings_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    """"context_size=16 (now 12), other dataset": each differing key, by value when short."""
    def short(v: Any) -> bool:
        return isinstance(v, (str, int, float, bool, type(None))) and len(str(v)) <= 24

    keys = [k for k in wanted | stored if stored.get(k) != wanted.get(k)]
    return ", ".join(f"{k}={stored.get(k)} (now {wanted.get(k)})" if short(stored.get(k)) and short(wanted.get(k))
                     else f"other {k}" for k in keys)


def read(folder: Path, wanted: dict[str, Any]) -> dict[str, Any] | str:
    """The manifest of the cache in ``folder`` if it is intact and built for ``wanted``;
    otherwise why not, in one phrase."""
    path = folder / META
    if not path.is_file():
        return "no cache yet" if not folder.exists() else f"{META} is missing"
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        return f"{META} cannot be read ({e.strerror})"
    except ValueError:  # not UTF-8 or not JSON, e.g. truncated
        return f"{META} is damaged (not valid JSON)"
    if not isinstance(manifest, dict):
        return f"{META} is damaged (not a JSON object)"
    if "checksum" not in manifest:
        return f"{META} has no checksum (written by an older esosae)"
    if manifest["checksum"] != checksum(manifest):
        return f"{META} was edited or damaged (checksum mismatch)"
    stored, files = manifest.get("settings"), manifest.get("files")
    if not isinstance(stored, dict) or not isinstance(files, dict):
        return f"{META} has no settings or file list"
    wanted = json.loads(json.dumps(wanted))  # tuples → lists, as they come back from JSON
    if stored != wanted:
        return "built for " + settings_diff(stored, wanted)
    for name, rec in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != rec["bytes"]:
            return f"{name} is missing or truncated"
        if file_sha256(file) != rec["sha256"]:
            return f"{name} does not match its checksum"
    mark_used(folder)
    return manifest


def mark_used(path: Path) -> None:
    """Record a cache's reuse as its modification time, the last use that
    ``python -m esosae.data.caches`` lists and prunes by (a build sets it too)."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache is still usable; it only looks older than it is
