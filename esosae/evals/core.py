"""Core metrics on held-out activations (METHOD.md §7).

    FVU   = Σ_b ‖x − x̂‖² / Σ_b ‖x − mean(x)‖²       (1 − explained variance)
    MSE   = mean_b ‖x − x̂‖²                           (raw activation units)
    L0    = mean_b #{i : f_i > 0}, per layer
    dead  = % of features that fire on no held-out token; dense = % firing on > 10% of them
    |c|   = mean and max |⟨W_dec1[i], W_dec2[j]⟩| over all cross-layer pairs of unit rows
    CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean): next-token loss of the
            language model with x̂ spliced in at the hook, against the clean model (1) and
            the hook's text positions zeroed (0); see ``ce_loss_recovered``. The clean and
            zero-ablation losses do not depend on the SAE: they are cached per (model, hook,
            held-out tokens) under ``<cache>/ce/``, so each further SAE costs one forward pass
    ΔCE   = CE_sae − CE_clean, in nats per scored token
    KL    = mean over scored positions of KL(p_clean ‖ p_sae) of the next-token distributions
            (one more clean pass, batch by batch, beside the spliced one)
    PCA floor = FVU of the best rank-k linear reconstruction of the activations (k = the
            L0 compared against), 1 − Σ_{i≤k} λ_i / Σ_i λ_i with λ the covariance's eigenvalues
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esosae.config import TrainConfig
from esosae.data import text
from esosae.data.models import LoadedModel
from esosae.run.atomic import atomic_write_text
from esosae.run.manifest import mark_used
from esosae.sae.backend import TORCH, Backend
from esosae.sae.model import DualLayerSAE

DENSE_FREQ = 0.1
CE_VERSION = 1
"""Version of the CE scoring rule; stored CE baselines of another version are recomputed."""


@torch.no_grad()
def reconstruction_metrics(
    model: DualLayerSAE, x_raw: torch.Tensor, ops: Backend = TORCH, chunk: int = 4096
) -> dict[str, float]:
    """FVU, MSE, L0 and dead/dense % per layer of ``model`` on raw activations (N, d)."""
    device = next(model.parameters()).device
    sq_err, l0, fires = 0.0, [0.0, 0.0], [0, 0]
    n = x_raw.shape[0]
    for start in range(0, n, chunk):
        x = x_raw[start:start + chunk].to(device).float() * model.scale  # (b, d)
        out = model(x, ops)
        sq_err += out["sq_err"].double().sum().item() / model.scale**2  # host sync per chunk
        for i in range(model.layers):
            active = out[f"f{i + 1}"] > 0  # (b, m)
            l0[i] += active.sum().item()
            fires[i] = fires[i] + active.sum(0).cpu()
    x64 = x_raw.double()
    total_var = (x64 - x64.mean(0)).square().sum().item()
    metrics = {"fvu": sq_err / total_var, "mse": sq_err / n, "tokens": n}
    for i in range(model.layers):
        freq = fires[i].double() / n  # (m,)
        metrics[f"l0_{i + 1}"] = l0[i] / n
        metrics[f"dead_pct_{i + 1}"] = 100 * (freq == 0).double().mean().item()
        metrics[f"dense_pct_{i + 1}"] = 100 * (freq > DENSE_FREQ).double().mean().item()
    metrics["l0"] = sum(metrics[f"l0_{i + 1}"] for i in range(model.layers))
    metrics["dead_pct"] = _pooled(model, metrics, "dead_pct")
    metrics["dense_pct"] = _pooled(model, metrics, "dense_pct")
    if model.layers == 2:
        metrics.update(cross_layer_cosines(model.W_dec1, model.W_dec2))
    return metrics


def _pooled(model: DualLayerSAE, metrics: dict[str, float], key: str) -> float:
    """A per-layer percentage pooled over all features of both layers."""
    widths = [model.cfg.m1, model.cfg.m2][: model.layers]
    return sum(metrics[f"{key}_{i + 1}"] * w for i, w in enumerate(widths)) / sum(widths)


@torch.no_grad()
def cross_layer_cosines(W1: torch.Tensor, W2: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """Mean and max |cos| over all pairs of rows of W1 (m1, d) and W2 (m2, d), in chunks."""
    u1 = W1 / W1.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u2 = W2 / W2.norm(dim=1, keepdim=True).clamp_min(1e-12)
    total, peak = 0.0, 0.0
    for start in range(0, u1.shape[0], chunk):
        c = (u1[start:start + chunk] @ u2.T).abs()  # (chunk, m2)
        total += c.double().sum().item()
        peak = max(peak, c.max().item())
    return {"cos_mean": total / (u1.shape[0] * u2.shape[0]), "cos_max": peak}


# -- CE loss recovered on the language model ---------------------------------------------


def heldout_contexts(cfg: TrainConfig, tokenizer: Any, bos_id: int,
                     keep: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The run's held-out contexts (n, context_size + 1), re-derived from esosae.data.text.

    The harvest (esosae.data.activations) puts the stream's first whole contexts into the
    held-out set while fewer than ``eval_tokens`` text positions precede them; the stream
    is a pure function of the data settings, so the same rule gives the same contexts
    without reading (or rebuilding) the activation cache.
    """
    sources = text.parse_sources(cfg.data.dataset)
    stream = text.contexts(sources, tokenizer, bos_id, cfg.data.context_size, cfg.data.data_seed)
    held, n_held = [], 0
    for batch in text.batches(stream, cfg.data.harvest_batch):  # (B, T + 1)
        for row in batch:
            if n_held >= cfg.data.eval_tokens:
                return torch.stack(held)
            held.append(row)
            n_held += int(keep(row).sum())
    if not held:
        raise text.DataError(f"--dataset {cfg.data.dataset!r} holds no context for held-out evaluation")
    return torch.stack(held)


@torch.no_grad()
def pca_fvu(x: torch.Tensor, k: int) -> float:
    """FVU of projecting the rows of ``x`` (N, d) on their own top-k principal components: a
    dense linear code as wide as the SAE's L0, fit on the same rows (an optimistic floor)."""
    x64 = x.double()
    xc = x64 - x64.mean(0)  # (N, d)
    eig = torch.linalg.eigvalsh(xc.T @ xc).flip(0).clamp_min(0)  # (d,), descending
    return float(1 - eig[:min(k, len(eig))].sum() / eig.sum())


def _kl_sum(logits_p: torch.Tensor, logits_q: torch.Tensor, scored: torch.Tensor) -> float:
    """Σ over scored positions of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v); logits (B, T, V)."""
    logp = torch.log_softmax(logits_p[:, :-1].float(), dim=-1)  # (B, T − 1, V)
    logq = torch.log_softmax(logits_q[:, :-1].float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T − 1)
    return kl[scored].double().sum().item()


def _ce_sum(logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> float:
    """Σ of next-token cross-entropy over the scored positions; logits (B, T, V), scored (B, T − 1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T − 1, V)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T − 1)
    return nll[scored].double().sum().item()


def _splice(fn: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor,
            on_clean: Callable[[torch.Tensor], None] | None = None) -> Callable:
    """A hook that replaces the text positions' activations x (N, d) by fn(x)."""
    def hook_fn(x: torch.Tensor, hook: Any) -> torch.Tensor:  # x (b, T, d)
        if on_clean is not None:
            on_clean(x[keep].float())
        x = x.clone()
        x[keep] = fn(x[keep]).to(x.dtype)
        return x
    return hook_fn


@torch.no_grad()
def ce_sums(lm: LoadedModel, tokens: torch.Tensor, hook: str, passes: dict[str, Callable | None],
            batch: int = 8, on_clean: Callable[[torch.Tensor], None] | None = None,
            kl: bool = False) -> dict[str, float]:
    """Σ next-token CE per pass over the scored positions of ``tokens`` (n, T), and their count.

    ``passes`` maps a name to what replaces the text-position activations at ``hook``
    (rows (N, d) → (N, d), raw units), or None for the clean model. Scored: predictions
    made at a text position of a text token (input and target both kept by ``lm.keep``);
    BOS, separator and pad positions keep their clean activations. ``on_clean`` receives
    the clean text-position rows (N, d) of every batch, from the first replacing pass.
    With ``kl``, ``kl_<name>`` is Σ KL(clean ‖ pass) of every replacing pass, from a clean
    pass run batch by batch beside them.
    """
    sums = dict.fromkeys(passes, 0.0)
    if kl:
        sums.update({f"kl_{name}": 0.0 for name, fn in passes.items() if fn is not None})
    n_scored = 0
    for start in range(0, len(tokens), batch):
        toks = tokens[start:start + batch].to(lm.device)  # (b, T)
        keep = lm.keep(toks)  # (b, T)
        scored = keep[:, :-1] & keep[:, 1:]  # (b, T − 1)
        n_scored += int(scored.sum())
        grab = on_clean
        clean = lm.bridge.run_with_hooks(toks, fwd_hooks=[]) if kl else None  # (b, T, V)
        for name, fn in passes.items():
            hooks = [] if fn is None else [(hook, _splice(fn, keep, grab))]
            grab = None if fn is not None else grab
            logits = lm.bridge.run_with_hooks(toks, fwd_hooks=hooks)  # (b, T, V)
            sums[name] += _ce_sum(logits, toks, scored)
            if kl and fn is not None:
                sums[f"kl_{name}"] += _kl_sum(clean, logits, scored)
    if n_scored == 0:
        raise text.DataError("the held-out contexts hold no text-token predictions to score CE loss on")
    return {**sums, "n_scored": n_scored}


def ce_baselines(lm: LoadedModel, tokens: torch.Tensor, hook: str, batch: int, cache: Path | None) -> dict[str, float]:
    """Σ CE of the clean and the zero-ablated model: they do not depend on the SAE, so they
    are stored in ``cache/ce/`` per (model, hook, tokens) and computed once."""
    key = {"version": CE_VERSION, "model": lm.name, "hook": hook,
           "tokens_sha256": hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()}
    path = None
    if cache is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = cache / "ce" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', lm.name)}__{hook}__{digest}.json"
        try:
            stored = json.loads(path.read_text())
            if stored["key"] == key:
                mark_used(path)
                return stored["sums"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
    sums = ce_sums(lm, tokens, hook, {"clean": None, "zero": torch.zeros_like}, batch)
    if path is not None:
        atomic_write_text(path, json.dumps({"key": key, "sums": sums}, indent=1) + "\n")
    return sums


def ce_loss_recovered(lm: LoadedModel, tokens: torch.Tensor, hook: str,
                      reconstruct: Callable[[torch.Tensor], torch.Tensor], batch: int = 8,
                      on_clean: Callable[[torch.Tensor], None] | None = None,
                      cache: Path | None = None) -> dict[str, float]:
    """Clean, spliced and zero-ablated next-token CE on ``tokens`` (n, T), and their fraction:

        ce_loss_score = (CE_zero − CE_spliced) / (CE_zero − CE_clean)

    where the spliced run replaces the hook's text-position activations x by
    ``reconstruct(x)`` and the zero-ablated one by 0 (``ce_sums``). With ``cache``, the clean
    and zero sums are read from (or stored in) it, so only the spliced pass and the clean
    pass of the KL run. Also ΔCE = CE_sae − CE_clean and the mean KL(clean ‖ spliced), in nats.
    """
    base = ce_baselines(lm, tokens, hook, batch, cache)
    sae = ce_sums(lm, tokens, hook, {"sae": reconstruct}, batch, on_clean, kl=True)
    if sae["n_scored"] != base["n_scored"]:
        raise text.DataError("cached CE baselines were scored on other positions; delete the ce/ cache")
    ce = {"clean": base["clean"] / base["n_scored"], "zero": base["zero"] / base["n_scored"],
          "sae": sae["sae"] / sae["n_scored"]}
    return {"ce_loss_without_sae": ce["clean"], "ce_loss_with_sae": ce["sae"], "ce_loss_with_ablation": ce["zero"],
            "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), "ce_tokens": sae["n_scored"],
            "ce_delta_nats": ce["sae"] - ce["clean"], "kl_div": sae["kl_sae"] / sae["n_scored"]}


def lm_core_metrics(sae: DualLayerSAE, lm: LoadedModel, cfg: TrainConfig, batch: int = 8,
                    cache: Path | None = None) -> dict[str, float]:
    """CE loss recovered over the run's held-out contexts, and ``reconstruction_metrics`` on
    the first ``eval_tokens`` clean text-position activations of the same pass (fp32)."""
    tokens = heldout_contexts(cfg, lm.tokenizer, lm.bos_id, lm.keep)  # (n, T + 1)
    rows: list[torch.Tensor] = []
    ce = ce_loss_recovered(lm, tokens, cfg.model.hook, lambda x: sae(x * sae.scale, TORCH)["x_hat"] / sae.scale,
                           batch, on_clean=lambda x: rows.append(x.cpu()), cache=cache)
    x = torch.cat(rows)[:cfg.data.eval_tokens]  # (eval_tokens, d)
    return {**reconstruction_metrics(sae, x), **ce}
