"""``--model FOLDER``: a saved transformers model trains through the same path as the embedded one.

The folder holds a tiny random Llama (``LlamaConfig`` with tiny sizes, ``save_pretrained``)
and a word-level tokenizer saved beside it, built offline; nothing is registered, so it
loads exactly as a user's folder does (esosae.data.models, case 2). Then the bad inputs:
a folder that does not exist, a folder without a model, a hook the model does not have.
"""

import json

import pytest
from lm_helpers import LAYERS_TINY, tiny_llama, tiny_tokenizer, write_txt

from esosae import cli
from esosae.data import models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(models, "hub_unavailable", lambda: "cannot reach huggingface.co: test")
    monkeypatch.chdir(tmp_path)
    text = write_txt(tmp_path / "text.txt", 150)
    base = ["--hook", "blocks.1.hook_out", "--dataset", str(text), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "run"), "--context-size", "16", "--harvest-tokens", "300",
            "--eval-tokens", "100", "--steps", "4", "--batch-size", "64", "--m1", "32", "--m2", "32", "--no-eval"]
    return tmp_path, folder, base


def test_a_model_folder_trains_through_the_same_path(env, capsys):
    tmp_path, folder, base = env
    assert cli.main(["--model", "./models/tiny-llama"] + base) == 0
    assert "run directory:" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["model"] == str(folder.resolve())  # absolute: found again from any directory
    source = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert source["d"] == 48 and source["source"]["model"] == str(folder.resolve())


@pytest.mark.parametrize("model, hook, message", [
    ("./models/missing", "blocks.1.hook_out", "model folder ./models/missing does not exist"),
    ("{tmp}/models", "blocks.1.hook_out", "does not hold a transformers causal LM"),
    ("./models/tiny-llama", f"blocks.{LAYERS_TINY}.hook_out", f"({LAYERS_TINY} blocks, 0-{LAYERS_TINY - 1})"),
])
def test_bad_model_or_hook_is_one_line_exit_2_and_writes_nothing(env, capsys, model, hook, message):
    tmp_path, _, base = env
    (tmp_path / "models" / "notes.txt").write_text("not a model")
    rc = cli.main(base + ["--model", model.format(tmp=tmp_path), "--hook", hook])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("train.py: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()
    activations = tmp_path / "cache" / "activations"
    assert not activations.exists() or not any(activations.rglob("*"))


def _tiny(arch: str):
    """A tiny random model of ``arch`` with the tiny tokenizer's vocabulary and special ids."""
    import torch
    import transformers as tf
    from lm_helpers import SPECIALS, WORDS

    ids = dict(vocab_size=len(SPECIALS) + len(WORDS), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=LAYERS_TINY, num_attention_heads=4,
                 max_position_embeddings=256)
    cfg, cls = {
        "gpt2": (tf.GPT2Config(n_embd=48, n_layer=LAYERS_TINY, n_head=4, n_positions=256, **ids), tf.GPT2LMHeadModel),
        "pythia": (tf.GPTNeoXConfig(**sizes, **ids), tf.GPTNeoXForCausalLM),
        "gemma2": (tf.Gemma2Config(**sizes, num_key_value_heads=2, head_dim=12, **ids), tf.Gemma2ForCausalLM),
    }[arch]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return cls(cfg).eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "pythia", "gemma2"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_out", "blocks.1.mlp.hook_out"])
def test_other_architectures_train_from_a_folder(env, arch, hook):
    tmp_path, _, base = env
    folder = tmp_path / "models" / arch
    _tiny(arch).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert cli.main(base + ["--model", str(folder), "--hook", hook]) == 0
    assert (tmp_path / "run" / "sae" / "sae.safetensors").is_file()
    import torch

    from esosae.config import ModelConfig

    model = models.load_model(ModelConfig(model=str(folder)))
    tokens = torch.randint(4, 100, (2, 7))
    with torch.no_grad():
        hidden = model.bridge.original_model(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(models.hook_activations(model, tokens, "blocks.0.hook_out"), hidden[1])
