"""A tiny randomly initialized Llama and a word-level tokenizer, built offline for tests.

``register_tiny(monkeypatch)`` makes ``--model tiny-llama`` load it through the same
bridge path as the real models (``esosae.data.models.LOCAL_MODELS``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(120)]
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
TINY = "tiny-llama"
D_TINY = 48
LAYERS_TINY = 3


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=D_TINY, intermediate_size=96,
                      num_hidden_layers=LAYERS_TINY, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return LlamaForCausalLM(cfg).eval()


def tiny_factory(cache: Path):
    """The registry factory: the bridge re-reads tokenizers from disk, so save it there first."""
    from transformers import AutoTokenizer

    folder = cache / "models" / TINY
    tiny_tokenizer().save_pretrained(folder)
    return tiny_llama(), AutoTokenizer.from_pretrained(folder)


def register_tiny(monkeypatch) -> None:
    from esosae.data import models

    monkeypatch.setitem(models.LOCAL_MODELS, TINY, tiny_factory)


def tiny_run(tmp_path: Path, monkeypatch, *flags: str) -> list[str]:
    """``python train.py`` flags for a short offline run of the tiny Llama on 150 lines of text
    (the model registered, the hub unreachable); ``flags`` are the test's own."""
    from esosae.data import models

    register_tiny(monkeypatch)
    monkeypatch.setattr(models, "hub_unavailable", lambda: "cannot reach huggingface.co: test")
    text = write_txt(tmp_path / "text.txt", 150)
    return ["--model", TINY, "--dataset", str(text), "--cache-dir", str(tmp_path / "cache"), "--context-size", "16",
            "--eval-tokens", "100", "--harvest-batch", "8", "--batch-size", "64", "--m1", "32", "--m2", "32",
            "--no-eval", *flags]


def word_lines(n: int, seed: int, words: list[str] = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def write_txt(path: Path, n_lines: int, seed: int = 0, words: list[str] = WORDS) -> Path:
    path.write_text("".join(line + "\n" for line in word_lines(n_lines, seed, words)))
    return path


def write_jsonl(path: Path, n_docs: int, seed: int = 0, words: list[str] = WORDS) -> Path:
    docs = [" ".join(word_lines(4, seed * 1000 + i, words)) for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def interrupt_harvest_at(monkeypatch, call: int) -> list[int]:
    """A Ctrl-C (KeyboardInterrupt) at the harvest's ``call``-th language-model forward; the
    returned list grows by one per forward."""
    from esosae.data import activations

    real, calls = activations.hooks_activations, []

    def forward(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(activations, "hooks_activations", forward)
    return calls
