"""Listing the cache directory and deleting what was not used (esosae/data/caches.py)."""

import os
import time

import pytest

from esosae.data import caches
from esosae.run import manifest

DAY = caches.DAY_S


def make(path, size: int, days_ago: float, now: float) -> None:
    """A cache entry of ``size`` bytes last used ``days_ago``: a folder with two files, or a
    JSON file when ``path`` ends in .json."""
    if path.suffix == ".json":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{" + b" " * (size - 2) + b"}")
    else:
        (path / "sub").mkdir(parents=True)
        (path / "a.npy").write_bytes(b"a" * (size // 2))
        (path / "sub" / "b.npy").write_bytes(b"b" * (size - size // 2))
    os.utime(path, (now - days_ago * DAY, now - days_ago * DAY))


@pytest.fixture
def root(tmp_path):
    """A cache directory: an old and a fresh activation cache, an old probing cache, a leftover
    of a killed harvest, an old CE file and a fresh model."""
    now = time.time()
    r = tmp_path / "cache"
    make(r / "activations" / "old_acts", 3000, 40, now)
    make(r / "activations" / "new_acts", 5000, 1, now)
    make(r / "activations" / ".new_acts.x1y2.tmp", 700, 50, now)
    make(r / "probing" / "old_probe", 2000, 31, now)
    make(r / "ce" / "old.json", 100, 90, now)
    make(r / "models" / "smollm2-135m", 9000, 0, now)
    return r


def names(found):
    return [e.path.name for e in found]


def test_entries_are_every_cache_with_its_size_least_recent_first(root):
    found = caches.entries(root)
    assert names(found) == ["old.json", ".new_acts.x1y2.tmp", "old_acts", "old_probe", "new_acts", "smollm2-135m"]
    assert {e.path.name: (e.kind, e.bytes) for e in found} == {
        "old.json": ("ce", 100), ".new_acts.x1y2.tmp": ("activations", 700), "old_acts": ("activations", 3000),
        "old_probe": ("probing", 2000), "new_acts": ("activations", 5000), "smollm2-135m": ("models", 9000)}
    assert [e.leftover for e in found] == [False, True, False, False, False, False]


def test_listing_deletes_nothing(root, capsys):
    before = sorted(p for p in root.rglob("*"))
    assert caches.main(["--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{root}: 6 caches, 19.8 kB"
    assert out[2].split()[:2] == ["ce", "100"] and out[2].endswith("old.json")
    assert out[3].endswith(".new_acts.x1y2.tmp  (leftover of a killed build)")
    assert sorted(p for p in root.rglob("*")) == before


def test_unused_days_lists_only_the_old_and_says_how_to_delete(root, capsys):
    assert caches.main(["--cache-dir", str(root), "--unused-days", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{root}: 4 caches not used for 30 days, 5.8 kB"
    assert [line.split()[-1] for line in out[2:6]] == ["old.json", "build)", "old_acts", "old_probe"]
    assert out[-1] == f"to delete them: {caches.PROG} --unused-days 30 --delete"
    assert (root / "activations" / "old_acts").exists()


def test_delete_removes_exactly_the_unused(root, capsys):
    assert caches.main(["--cache-dir", str(root), "--unused-days", "35", "--delete"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "deleted 3 (3.8 kB)"
    left = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert left == ["activations/new_acts", "models/smollm2-135m", "probing/old_probe"]
    assert sorted(p.name for p in (root / "activations" / "new_acts").rglob("*")) == ["a.npy", "b.npy", "sub"]


def test_a_cache_used_after_listing_is_kept(root):
    found = [e for e in caches.entries(root) if e.path.name == "old_acts"]
    os.utime(found[0].path)  # a run reused it meanwhile
    assert caches.delete_unused(found, 30, time.time()) == []
    assert found[0].path.exists()


def test_a_verified_reuse_makes_a_cache_recent(tmp_path):
    folder = tmp_path / "cache" / "activations" / "acts"
    folder.mkdir(parents=True)
    (folder / "x.npy").write_bytes(b"x" * 10)
    manifest.write(folder, {"k": 1}, ["x.npy"])
    os.utime(folder, (time.time() - 60 * DAY,) * 2)
    assert names(caches.entries(tmp_path / "cache")) == ["acts"]
    assert caches.entries(tmp_path / "cache")[0].last_used < time.time() - 59 * DAY
    assert isinstance(manifest.read(folder, {"k": 1}), dict)
    assert caches.entries(tmp_path / "cache")[0].last_used > time.time() - DAY
    assert isinstance(manifest.read(folder, {"k": 2}), str)  # refused: not a use
    os.utime(folder, (time.time() - 60 * DAY,) * 2)
    manifest.read(folder, {"k": 2})
    assert caches.entries(tmp_path / "cache")[0].last_used < time.time() - 59 * DAY


def test_default_cache_dir_is_train_pys(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "esosae" / "ce").mkdir(parents=True)
    assert caches.main([]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'esosae'}: 0 caches, 0 B"]


@pytest.mark.parametrize("argv, message", [
    (["--delete"], "--delete needs --unused-days N"),
    (["--unused-days", "-1"], "--unused-days"),
    (["--unused-days", "soon"], "--unused-days"),
    (["--cache-dir", "{missing}"], "no cache directory at"),
    (["--keep", "3"], "unrecognized arguments: --keep 3"),
])
def test_bad_flags_are_one_line_and_exit_2(root, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "nowhere") for a in argv]
    before = sorted(p for p in root.rglob("*"))
    assert caches.main(["--cache-dir", str(root), *argv] if "--cache-dir" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{caches.PROG}: error: ") and message in err
    assert sorted(p for p in root.rglob("*")) == before
