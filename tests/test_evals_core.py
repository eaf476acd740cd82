"""Core metrics with CE loss recovered (esosae/evals/core.py) on the tiny offline Llama."""

import os

import pytest
import torch
from lm_helpers import TINY, register_tiny, write_txt

from esosae.data import activations

from esosae.data import models
from esosae.config import DataConfig, ModelConfig, SAEConfig, TrainConfig
from esosae.evals import core
from esosae.sae.model import DualLayerSAE

HOOK = "blocks.1.hook_out"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_cfg(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    text = write_txt(tmp_path / "text.txt", 150)
    return TrainConfig(model=ModelConfig(model=TINY, hook=HOOK, cache_dir=str(tmp_path / "cache")),
                       data=DataConfig(dataset=str(text), context_size=16, harvest_tokens=400, eval_tokens=100,
                                       harvest_batch=8),
                       sae=SAEConfig(m1=32, m2=32))


@pytest.fixture
def tiny(run_cfg):
    return models.load_model(run_cfg.model)


def heldout(run_cfg, tiny):
    return core.heldout_contexts(run_cfg, tiny.tokenizer, tiny.bos_id, tiny.keep)


def test_heldout_contexts_are_the_caches(run_cfg, tiny):
    tokens = heldout(run_cfg, tiny)  # (n, 17)
    cache = activations.ensure_cache(run_cfg, progress=False)
    assert torch.equal(tokens, torch.from_numpy(cache.heldout_tokens).long())
    assert int(tiny.keep(tokens[:-1]).sum()) < run_cfg.data.eval_tokens <= int(tiny.keep(tokens).sum())


def test_ce_loss_recovered_is_one_for_identity_and_zero_for_ablation(run_cfg, tiny):
    tokens = heldout(run_cfg, tiny)
    seen = []
    ident = core.ce_loss_recovered(tiny, tokens, HOOK, lambda x: x.clone(), batch=3, on_clean=seen.append)
    zero = core.ce_loss_recovered(tiny, tokens, HOOK, torch.zeros_like, batch=3)
    assert ident["ce_loss_with_sae"] == ident["ce_loss_without_sae"] and ident["ce_loss_score"] == 1.0
    assert zero["ce_loss_with_sae"] == zero["ce_loss_with_ablation"] and zero["ce_loss_score"] == 0.0
    assert abs(zero["ce_loss_with_ablation"] - zero["ce_loss_without_sae"]) > 1e-3
    keep = tiny.keep(tokens)
    assert sum(len(x) for x in seen) == int(keep.sum())  # only text positions are spliced
    assert ident["ce_tokens"] == int((keep[:, :-1] & keep[:, 1:]).sum())


def test_sae_independent_baselines_are_computed_once(run_cfg, tiny, tmp_path, monkeypatch):
    tokens = heldout(run_cfg, tiny)
    calls = []
    real = core.ce_sums
    monkeypatch.setattr(core, "ce_sums", lambda *a, **k: calls.append(list(a[3])) or real(*a, **k))
    first = core.ce_loss_recovered(tiny, tokens, HOOK, lambda x: 0.5 * x, batch=8, cache=tmp_path / "c")
    [stored] = (tmp_path / "c" / "ce").iterdir()
    os.utime(stored, (1e9, 1e9))
    second = core.ce_loss_recovered(tiny, tokens, HOOK, lambda x: 0.5 * x, batch=8, cache=tmp_path / "c")
    assert calls == [["clean", "zero"], ["sae"], ["sae"]] and first == second
    assert stored.stat().st_mtime > 1e9  # the reuse is its last use (python -m esosae.data.caches)
    assert core.ce_loss_recovered(tiny, tokens[1:], HOOK, lambda x: 0.5 * x, batch=8, cache=tmp_path / "c") != first
    assert calls[-2:] == [["clean", "zero"], ["sae"]]  # other tokens: other baselines


def test_clean_ce_is_the_models_own_loss(run_cfg, tiny):
    tokens = heldout(run_cfg, tiny)[:4]
    res = core.ce_loss_recovered(tiny, tokens, HOOK, lambda x: x, batch=4)
    keep = tiny.keep(tokens)
    with torch.no_grad():
        logits = tiny.bridge.original_model(tokens).logits  # (4, T, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    expected = nll[keep[:, :-1] & keep[:, 1:]].mean().item()
    assert res["ce_loss_without_sae"] == pytest.approx(expected, rel=1e-5)


def test_lm_core_metrics_use_the_heldout_tokens(run_cfg, tiny):
    sae = DualLayerSAE(run_cfg.sae, tiny.d_model)
    sae.init_weights(torch.Generator().manual_seed(0))
    m = core.lm_core_metrics(sae, tiny, run_cfg, batch=4)
    assert m["tokens"] == run_cfg.data.eval_tokens
    assert 0 < m["fvu"] and m["l0_1"] > 0 and {"cos_mean", "ce_loss_score", "dead_pct_2"} <= m.keys()
    assert m["ce_loss_with_sae"] != m["ce_loss_without_sae"]
