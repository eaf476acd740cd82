"""Harvesting and the on-disk activation cache (esosae/data/activations.py)."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from lm_helpers import D_TINY, TINY, interrupt_harvest_at, register_tiny, write_txt
from test_manifest import DAMAGED_META, EDITED, flip_digit, write_meta

from esosae.data import activations

from esosae.run import manifest

from esosae.data import models
from esosae.config import DataConfig, ModelConfig, TrainConfig
from esosae.data.sources import ArraySource

ENGLISH = """The river rises in the hills north of the town and flows south through farmland.
In the spring of 1850 a bridge was built across it, and a mill was opened beside the bridge.
The mill ground wheat for the villages around it until the railway arrived thirty years later.
Today the building is a museum, and visitors can still see the wheel turning in the water.
Scientists measured the concentration of the drug in the blood of forty patients after surgery.
The results suggest that a single dose is enough to keep the level above the target for a day.
"""


@pytest.fixture
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def tiny_cfg(tmp_path, text=None, **data_kw) -> TrainConfig:
    text = text or write_txt(tmp_path / "text.txt", 150)
    kw = dict(dataset=str(text), context_size=16, harvest_tokens=400, eval_tokens=100, harvest_batch=8)
    return TrainConfig(model=ModelConfig(model=TINY, hook="blocks.1.hook_out", cache_dir=str(tmp_path / "cache")),
                       data=DataConfig(**{**kw, **data_kw}))


def build(cfg: TrainConfig) -> activations.ActivationCache:
    return activations.ensure_cache(cfg, progress=False)


def snapshot(cache: activations.ActivationCache) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.train[np.arange(len(cache.train))].clone(), cache.heldout.clone()


def leftovers(cfg: TrainConfig) -> list[str]:
    root = activations.cache_folder(cfg).parent
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def check_rows_are_text_positions(cache, model, hook, dtype):
    """Held-out rows are exactly the text positions of the held-out contexts; no row is BOS's."""
    tokens = torch.from_numpy(cache.heldout_tokens).long()
    acts = models.hook_activations(model, tokens, hook)  # (n_ctx, T + 1, d)
    expected = acts[model.keep(tokens)][:len(cache.heldout)].to(dtype)
    torch.testing.assert_close(cache.heldout, expected, rtol=0, atol=0)
    bos = models.hook_activations(model, torch.tensor([[model.bos_id]]), hook)[0, 0]  # (d,)
    rows = cache.train[np.arange(len(cache.train))].float()
    assert (rows - bos).norm(dim=1).min() > 1e-3 * bos.norm()
    assert torch.isfinite(rows).all()


def test_harvest_rows_scale_and_shapes(tmp_path, tiny):
    cfg = tiny_cfg(tmp_path)
    cache = build(cfg)
    assert cache.train.shape == (400, D_TINY) and cache.heldout.shape == (100, D_TINY)
    assert cache.heldout.dtype == torch.float16
    assert cache.heldout_tokens.shape[1] == 17 and (cache.heldout_tokens[:, 0] == 1).all()
    check_rows_are_text_positions(cache, models.load_model(cfg.model), cfg.model.hook, torch.float16)
    rows = cache.train[np.arange(400)].double()
    assert (cache.scale**2 * rows.square().sum(1).mean()).item() == pytest.approx(D_TINY, rel=1e-6)


def test_bfloat16_cache(tmp_path, tiny):
    cfg = tiny_cfg(tmp_path, cache_dtype="bfloat16")
    cache = build(cfg)
    assert cache.heldout.dtype == torch.bfloat16 and cache.train[np.arange(3)].dtype == torch.bfloat16
    check_rows_are_text_positions(cache, models.load_model(cfg.model), cfg.model.hook, torch.bfloat16)


def test_same_settings_reuse_the_cache(tmp_path, tiny, monkeypatch, capsys):
    cfg = tiny_cfg(tmp_path)
    first = snapshot(build(cfg))
    monkeypatch.setattr(activations, "harvest", lambda *a, **k: pytest.fail("harvested again"))
    again = snapshot(build(cfg))
    assert "using cached activations" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_concurrent_builds_harvest_once(tmp_path, tiny, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    real, calls = activations.harvest, []
    monkeypatch.setattr(activations, "harvest", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: snapshot(build(cfg)), range(2))
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, second))


def test_mismatch_rebuilds_with_a_message(tmp_path, tiny, capsys):
    cfg = tiny_cfg(tmp_path)
    build(cfg)
    cfg.data.context_size = 12
    build(cfg)
    assert "built for context_size=16 (now 12); rebuilding" in capsys.readouterr().err
    with open(cfg.data.dataset, "a") as fh:
        fh.write("w1 w2 w3\n")
    build(cfg)
    assert "built for other dataset; rebuilding" in capsys.readouterr().err
    assert leftovers(cfg) == [activations.cache_folder(cfg).name]


def test_a_recopied_text_file_with_the_same_bytes_keeps_its_cache(tmp_path, tiny, capsys):
    """A data folder copied again (new mtimes, same bytes) is the same text: no new harvest."""
    cfg = tiny_cfg(tmp_path)
    first = snapshot(build(cfg))
    shutil.copy(cfg.data.dataset, tmp_path / "copy.txt")
    shutil.move(tmp_path / "copy.txt", cfg.data.dataset)
    os.utime(cfg.data.dataset, ns=(1, 1))
    capsys.readouterr()
    again = snapshot(build(cfg))
    assert "using cached activations" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_caches_of_other_sizes_live_side_by_side(tmp_path, tiny, capsys):
    cfg = tiny_cfg(tmp_path)
    build(cfg)
    cfg.data.harvest_tokens = 300
    assert len(build(cfg).train) == 300
    assert len(leftovers(cfg)) == 2
    cfg.data.harvest_tokens = 400
    assert len(build(cfg).train) == 400
    assert "rebuilding" not in capsys.readouterr().err


def test_truncated_chunk_is_detected_and_rebuilt_identically(tmp_path, tiny, capsys):
    cfg = tiny_cfg(tmp_path)
    first = snapshot(build(cfg))
    chunk = activations.cache_folder(cfg) / "train_00000.npy"
    with open(chunk, "r+b") as fh:
        fh.truncate(chunk.stat().st_size - 100)
    again = snapshot(build(cfg))
    assert "train_00000.npy is missing or truncated; rebuilding" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "a harvest is deterministic"


def test_flipped_bytes_fail_the_checksum(tmp_path, tiny):
    cfg = tiny_cfg(tmp_path)
    sources = activations.text.parse_sources(cfg.data.dataset)
    build(cfg)
    folder = activations.cache_folder(cfg)
    with open(folder / "heldout.npy", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x7c\x00\x7c")
    assert manifest.read(folder, activations.wanted_settings(cfg, sources)) == "heldout.npy does not match its checksum"


def test_intact_cache_is_reused_reading_each_file_once(tmp_path, tiny, monkeypatch, capsys):
    cfg = tiny_cfg(tmp_path)
    meta = build(cfg).meta
    real_sha, hashed = manifest.file_sha256, []
    monkeypatch.setattr(manifest, "file_sha256", lambda path: (hashed.append(path.name), real_sha(path))[1])
    real_read, reads = manifest.read, []
    monkeypatch.setattr(manifest, "read", lambda *a: (reads.append(1), real_read(*a))[1])
    monkeypatch.setattr(activations, "harvest", lambda *a, **k: pytest.fail("harvested again"))
    cache = build(cfg)
    assert "using cached activations" in capsys.readouterr().err
    text_file = os.path.basename(cfg.data.dataset)  # hashed once for the settings: the text's identity
    assert len(reads) == 1 and sorted(hashed) == sorted([*meta["files"], text_file])  # each cache file hashed once
    assert cache.meta == meta and cache.scale == meta["scale"]


META_EDITS = {  # what is done to meta.json → why the cache is rebuilt
    "scale": (lambda t: flip_digit(t, "scale"), EDITED),
    "train_rows": (lambda t: flip_digit(t, "train_rows"), EDITED),
    "file checksum": (lambda t: flip_digit(t, "sha256"), EDITED),
    "setting": (lambda t: flip_digit(t, "context_size"), EDITED),
    **DAMAGED_META,
}


@pytest.mark.parametrize("edit", META_EDITS)
def test_edited_or_damaged_meta_json_is_rebuilt_never_trained_on(tmp_path, tiny, capsys, edit):
    change, reason = META_EDITS[edit]
    cfg = tiny_cfg(tmp_path)
    cache = build(cfg)
    first, scale = snapshot(cache), cache.scale
    path = activations.cache_folder(cfg) / manifest.META
    write_meta(path, change(path.read_text()))
    again = build(cfg)
    err = capsys.readouterr().err
    assert f"{reason}; rebuilding it" in err and "using cached activations" not in err
    assert again.scale == scale and all(torch.equal(a, b) for a, b in zip(first, snapshot(again)))
    assert isinstance(manifest.read(again.folder, activations.wanted_settings(
        cfg, activations.text.parse_sources(cfg.data.dataset))), dict)


def test_interrupted_harvest_leaves_no_cache(tmp_path, tiny, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    interrupt_harvest_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    assert leftovers(cfg) == []


def test_interrupted_rebuild_keeps_the_old_cache_and_stale_temps_are_removed(tmp_path, tiny, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    old = snapshot(build(cfg))
    folder = activations.cache_folder(cfg)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder.parent / f".{folder.name}.killed.tmp"
    stale.mkdir()
    (stale / activations.PID_FILE).write_text(dead.stdout.strip())
    cfg.data.context_size = 12
    monkeypatch.setattr(activations, "hooks_activations", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    assert leftovers(cfg) == [folder.name]
    cfg.data.context_size = 16
    assert all(torch.equal(a, b) for a, b in zip(old, snapshot(build(cfg))))


def test_running_out_of_text_is_an_error_and_leaves_nothing(tmp_path, tiny):
    cfg = tiny_cfg(tmp_path, text=write_txt(tmp_path / "short.txt", 40), harvest_tokens=10**6)
    with pytest.raises(activations.CacheError, match="ran out after") as e:
        build(cfg)
    assert "\n" not in str(e.value) and leftovers(cfg) == []


def test_chunked_rows_read_across_chunks(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(activations, "CHUNK_ROWS", 128)
    cache = build(tiny_cfg(tmp_path))
    assert len(cache.meta["train_files"]) == 4
    full = torch.cat([torch.from_numpy(np.array(c)) for c in cache.train.chunks])  # (400, d)
    idx = np.random.default_rng(0).permutation(400)[:200]
    assert torch.equal(cache.train[idx], full[idx]) and torch.equal(cache.train[100:300], full[100:300])


def test_lm_source_is_an_array_source(tmp_path, tiny):
    cfg = tiny_cfg(tmp_path)
    src = activations.lm_source(cfg)
    assert isinstance(src, ArraySource) and src.describe()["kind"] == "lm"
    x = src.batch(3, 64)
    assert x.shape == (64, D_TINY) and x.dtype == torch.float32
    assert src.heldout().shape == (100, D_TINY)
    assert src.norm_scale() == build(cfg).scale


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One dequantized copy of the embedded model for the whole session."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.mark.slow
def test_real_smollm2_harvest(tmp_path, smollm2_cache):
    (tmp_path / "en.txt").write_text(ENGLISH * 8)
    cfg = TrainConfig(model=ModelConfig(cache_dir=str(smollm2_cache)),
                      data=DataConfig(dataset=str(tmp_path / "en.txt"), context_size=32, harvest_tokens=320,
                                      eval_tokens=64, harvest_batch=4))
    cache = build(cfg)
    assert cache.train.shape == (320, 576) and cache.heldout.shape == (64, 576)
    first = snapshot(cache)
    model = models.load_model(cfg.model)
    assert (model.d_model, model.n_layers, model.bos_id) == (576, 30, 1)
    check_rows_are_text_positions(cache, model, cfg.model.hook, torch.float16)
    shutil.rmtree(activations.cache_folder(cfg))
    assert all(torch.equal(a, b) for a, b in zip(first, snapshot(build(cfg)))), "same result twice"
