"""Loading models as TransformerBridges, hooks, the BOS convention (esosae/data/models.py)."""

import json
import os

import pytest
import torch
from lm_helpers import D_TINY, LAYERS_TINY, TINY, register_tiny

from esosae.data import models
from esosae.config import ModelConfig


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    register_tiny(monkeypatch)
    return models.load_model(ModelConfig(model=TINY, cache_dir=str(tmp_path)))


def test_tiny_llama_goes_through_the_bridge(tiny):
    assert type(tiny.bridge).__name__ == "TransformerBridge"
    assert (tiny.d_model, tiny.n_layers, tiny.bos_id, tiny.pad_id) == (D_TINY, LAYERS_TINY, 1, 3)


@pytest.mark.parametrize("layer", [0, LAYERS_TINY - 2])  # HF's last hidden state is after the final norm
def test_hook_out_is_the_residual_after_the_block(tiny, layer):
    tokens = torch.randint(4, 100, (3, 9))
    tokens[:, 0] = tiny.bos_id
    acts = models.hook_activations(tiny, tokens, f"blocks.{layer}.hook_out")  # (3, 9, d)
    with torch.no_grad():
        hidden = tiny.bridge.original_model(tokens, output_hidden_states=True).hidden_states
    assert acts.shape == (3, 9, D_TINY)
    torch.testing.assert_close(acts, hidden[layer + 1])


def test_blocks_after_the_hook_never_run(tiny):
    ran = []
    blocks = tiny.bridge.original_model.model.layers
    handles = [b.register_forward_hook(lambda *a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        models.hook_activations(tiny, torch.randint(4, 100, (2, 5)), "blocks.0.hook_out")
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]


def test_encode_prepends_bos_and_masks_bos_and_pad(tiny):
    tokens, keep = tiny.encode(["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"], max_tokens=4)
    assert tokens.tolist()[:2] == [[1, 5, 6, 7, 3], [1, 8, 3, 3, 3]]
    assert tokens.shape == (3, 5) and (tokens[:, 0] == tiny.bos_id).all()
    assert keep.tolist() == [[False, True, True, True, False], [False, True, False, False, False],
                             [False, True, True, True, True]]
    assert not tiny.keep(tokens)[:, 0].any()


def test_unknown_model_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "hub_unavailable", lambda: "cannot reach huggingface.co: test")
    with pytest.raises(models.ModelError) as e:
        models.load_model(ModelConfig(model="smollm2", cache_dir=str(tmp_path)))
    msg = str(e.value)
    assert "unknown model 'smollm2'" in msg and "did you mean smollm2-135m" in msg and "\n" not in msg


def test_missing_hook_lists_close_matches(tiny):
    models.check_hook(tiny, "blocks.1.hook_out")
    with pytest.raises(models.ModelError) as e:
        models.check_hook(tiny, "blocks.1.hook_outt")
    msg = str(e.value)
    assert "does not exist" in msg and "blocks.1.hook_out" in msg.split("close matches:")[1] and "\n" not in msg


def test_stop_layer():
    assert models.stop_layer("blocks.6.hook_out") == 7
    assert models.stop_layer("blocks.0.attn.hook_out") == 1
    assert models.stop_layer("ln_final.hook_out") is None


def test_cache_root(monkeypatch, tmp_path):
    assert models.cache_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root(None) == tmp_path / "xdg" / "esosae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root(None) == tmp_path / ".cache" / "esosae"


def test_weight_cache_checksums_catch_damage(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / models.MANIFEST).write_text(json.dumps(models._manifest(folder)))
    os.utime(folder, (1e9, 1e9))
    assert models._cache_problem(folder) is None
    assert folder.stat().st_mtime > 1e9  # a reuse is its last use (python -m esosae.data.caches)
    (folder / "model.safetensors").write_bytes(b"x" * 999)
    assert "checksums" in models._cache_problem(folder)
    (folder / models.MANIFEST).unlink()
    assert "manifest" in models._cache_problem(folder)
    assert models._cache_problem(tmp_path / "absent") == "no complete copy"
