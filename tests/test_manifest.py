"""The cache manifest (esosae/run/manifest.py): round trip and every reason a cache is refused."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from esosae.run import manifest

SETTINGS = {"format": 1, "model": "tiny", "context_size": 16, "dataset": [{"name": "a.txt", "weight": 1.0}],
            "sizes": (60, 24)}


def flip_digit(text: str, key: str) -> str:
    """``text`` (a meta.json) with the first digit of the first ``"key": value`` changed."""
    m = re.search(rf'"{key}": "?[^0-9]*([0-9])', text)
    assert m, f"no {key} with a digit in meta.json"
    return text[:m.start(1)] + str((int(m.group(1)) + 1) % 10) + text[m.end(1):]


EDITED = "meta.json was edited or damaged (checksum mismatch)"
DAMAGED_META = {  # how meta.json's text is damaged → the reason read() gives (the caches' tests use these too)
    "truncated": (lambda t: t[:len(t) // 2], "meta.json is damaged (not valid JSON)"),
    "not JSON": (lambda t: "\udcff\x00 not json", "meta.json is damaged (not valid JSON)"),
    "written before checksums": (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "checksum"}),
                                 "meta.json has no checksum (written by an older esosae)"),
}


def write_meta(path, text: str) -> None:
    """Write meta.json text that may hold non-UTF-8 bytes (as lone surrogates)."""
    path.write_bytes(text.encode(errors="surrogateescape"))


@pytest.fixture
def cache(tmp_path):
    """A folder with two random data files and their manifest; returns (folder, manifest)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    rng = np.random.default_rng()
    np.save(folder / "x.npy", rng.normal(size=(7, 5)).astype(np.float16))
    np.save(folder / "y.npy", rng.integers(1, 100, size=11))
    return folder, manifest.write(folder, SETTINGS, ["x.npy", "y.npy"], scale=float(rng.uniform(0.1, 9)), rows=7)


def test_round_trip(cache):
    folder, written = cache
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "x.npy", "y.npy"]  # no temporary left
    on_disk = json.loads((folder / manifest.META).read_text())
    os.utime(folder, (1e9, 1e9))
    assert manifest.read(folder, SETTINGS) == written == on_disk
    assert folder.stat().st_mtime > 1e9  # a verified reuse is the cache's last use
    assert list(on_disk) == ["settings", "scale", "rows", "files", "checksum"]
    assert on_disk["settings"]["sizes"] == [60, 24] and on_disk["rows"] == 7
    assert on_disk["files"]["x.npy"] == {"bytes": (folder / "x.npy").stat().st_size,
                                         "sha256": manifest.file_sha256(folder / "x.npy")}
    body = {k: v for k, v in on_disk.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert on_disk["checksum"] == hashlib.sha256(canonical).hexdigest()  # the docstring's formula


def test_checksum_ignores_layout_but_not_content(cache):
    folder, written = cache
    path = folder / manifest.META
    path.write_text(json.dumps(json.loads(path.read_text()), sort_keys=True))  # same content, other layout
    assert manifest.read(folder, SETTINGS) == written
    assert manifest.checksum({**written, "scale": written["scale"] * (1 + 1e-15)}) != written["checksum"]


@pytest.mark.parametrize("key", ["scale", "rows", "sha256", "bytes", "context_size", "weight"])
def test_any_edited_digit_is_a_checksum_mismatch(cache, key):
    folder, _ = cache
    path = folder / manifest.META
    path.write_text(flip_digit(path.read_text(), key))
    assert manifest.read(folder, SETTINGS) == EDITED


@pytest.mark.parametrize("change, reason", [*DAMAGED_META.values(),
                                           (lambda t: "", "meta.json is damaged (not valid JSON)"),
                                           (lambda t: "[1, 2]", "meta.json is damaged (not a JSON object)")])
def test_damaged_or_old_meta_json(cache, change, reason):
    folder, _ = cache
    path = folder / manifest.META
    write_meta(path, change(path.read_text()))
    assert manifest.read(folder, SETTINGS) == reason


def test_missing_folder_or_meta_json(cache, tmp_path):
    folder, _ = cache
    assert manifest.read(tmp_path / "absent", SETTINGS) == "no cache yet"
    (folder / manifest.META).unlink()
    assert manifest.read(folder, SETTINGS) == "meta.json is missing"


def test_a_recomputed_checksum_without_settings_or_files_is_refused(cache):
    folder, written = cache
    bad = {k: v for k, v in written.items() if k not in ("files", "checksum")}
    (folder / manifest.META).write_text(json.dumps({**bad, "checksum": manifest.checksum(bad)}))
    assert manifest.read(folder, SETTINGS) == "meta.json has no settings or file list"


def test_other_settings_name_each_difference(cache):
    folder, _ = cache
    wanted = {**SETTINGS, "context_size": 12, "dataset": [{"name": "b.txt", "weight": 1.0}], "seed": 3}
    assert manifest.read(folder, wanted) == "built for context_size=16 (now 12), other dataset, seed=None (now 3)"
    del wanted["format"]
    assert manifest.settings_diff(SETTINGS, wanted) == ("context_size=16 (now 12), other dataset, "
                                                        "seed=None (now 3), format=1 (now None)")
    assert manifest.settings_diff({"h": "a" * 64}, {"h": "b" * 64}) == "other h"  # long values are not printed


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.unlink(), "x.npy is missing or truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4]), "x.npy is missing or truncated"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "x.npy is missing or truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-2] + bytes(255 - b for b in p.read_bytes()[-2:])),
     "x.npy does not match its checksum"),
])
def test_damaged_data_file(cache, damage, reason):
    folder, _ = cache
    damage(folder / "x.npy")
    assert manifest.read(folder, SETTINGS) == reason


def test_reserved_fact_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="checksum"):
        manifest.write(tmp_path, SETTINGS, [], checksum="0")
