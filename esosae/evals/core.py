"""Core metrics on held-out activations (METHOD.md §7).

    FVU   = Σ_b ‖x − x̂‖² / Σ_b ‖x − mean(x)‖²       (1 − explained variance)
    MSE   = mean_b ‖x − x̂‖²                           (raw activation units)
    L0    = mean_b #{i : f_i > 0}, per layer
    dead  = % of features that fire on no held-out token; dense = % firing on > 10% of them
    |c|   = mean and max |⟨W_dec1[i], W_dec2[j]⟩| over all cross-layer pairs of unit rows
    CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean): next-token loss of the
            language model with x̂ spliced in at the hook, against the clean model (1) and
            the hook's text positions zeroed (0); see ``ce_loss_recovered``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from esosae import data
from esosae.backend import TORCH, Backend
from esosae.config import TrainConfig
from esosae.models import LoadedModel
from esosae.sae import DualLayerSAE

DENSE_FREQ = 0.1


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


def heldout_contexts(cfg: TrainConfig, tokenizer: Any, bos_id: int, keep: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The run's held-out contexts (n, context_size + 1), re-derived from esosae.data.

    The harvest (esosae.activations) puts the stream's first whole contexts into the
    held-out set while fewer than ``eval_tokens`` text positions precede them; the stream
    is a pure function of the data settings, so the same rule gives the same contexts
    without reading (or rebuilding) the activation cache.
    """
    sources = data.parse_sources(cfg.data.dataset)
    stream = data.contexts(sources, tokenizer, bos_id, cfg.data.context_size, cfg.data.data_seed)
    held, n_held = [], 0
    for batch in data.batches(stream, cfg.data.harvest_batch):  # (B, T + 1)
        for row in batch:
            if n_held >= cfg.data.eval_tokens:
                return torch.stack(held)
            held.append(row)
            n_held += int(keep(row).sum())
    if not held:
        raise data.DataError(f"--dataset {cfg.data.dataset!r} holds no context for held-out evaluation")
    return torch.stack(held)


def _ce_sums(logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> float:
    """Σ of next-token cross-entropy over the scored positions; logits (B, T, V), scored (B, T − 1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T − 1, V)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T − 1)
    return nll[scored].double().sum().item()


@torch.no_grad()
def ce_loss_recovered(lm: LoadedModel, tokens: torch.Tensor, hook: str,
                      reconstruct: Callable[[torch.Tensor], torch.Tensor], batch: int = 8,
                      on_clean: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
    """Clean, spliced and zero-ablated next-token CE on ``tokens`` (n, T), and their fraction.

        ce_loss_score = (CE_zero − CE_spliced) / (CE_zero − CE_clean)

    At ``hook`` the activations x of text positions (``lm.keep``) are replaced by
    ``reconstruct(x)`` (rows (N, d) → (N, d), raw units) or by zeros; BOS, separator and
    pad positions keep their clean activations. CE is averaged over the predictions made
    at a text position of a text token (input and target both kept), the same positions
    for all three runs. ``on_clean`` receives the clean text-position rows (N, d) of each
    batch (the core metrics reuse them).
    """
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_scored = 0
    for start in range(0, len(tokens), batch):
        toks = tokens[start:start + batch].to(lm.device)  # (b, T)
        keep = lm.keep(toks)  # (b, T)
        scored = keep[:, :-1] & keep[:, 1:]  # (b, T − 1)
        n_scored += int(scored.sum())

        def splice(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
            def hook_fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
                x = x.clone()  # (b, T, d)
                x[keep] = fn(x[keep]).to(x.dtype)
                return x
            return hook_fn

        def grab(x: torch.Tensor, hook: Any) -> torch.Tensor:
            if on_clean is not None:
                on_clean(x[keep].float())
            return x

        for name, fn in (("clean", grab), ("sae", splice(reconstruct)), ("zero", splice(torch.zeros_like))):
            logits = lm.bridge.run_with_hooks(toks, fwd_hooks=[(hook, fn)])  # (b, T, V)
            sums[name] += _ce_sums(logits, toks, scored)
    if n_scored == 0:
        raise data.DataError("the held-out contexts hold no text-token predictions to score CE loss on")
    ce = {k: v / n_scored for k, v in sums.items()}
    score = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    return {"ce_loss_without_sae": ce["clean"], "ce_loss_with_sae": ce["sae"], "ce_loss_with_ablation": ce["zero"],
            "ce_loss_score": score, "ce_tokens": n_scored}


def lm_core_metrics(sae: DualLayerSAE, lm: LoadedModel, cfg: TrainConfig, batch: int = 8) -> dict[str, float]:
    """CE loss recovered over the run's held-out contexts, and ``reconstruction_metrics`` on
    the first ``eval_tokens`` clean text-position activations of the same pass (fp32)."""
    tokens = heldout_contexts(cfg, lm.tokenizer, lm.bos_id, lm.keep)  # (n, T + 1)
    rows: list[torch.Tensor] = []
    ce = ce_loss_recovered(lm, tokens, cfg.model.hook, lambda x: sae(x * sae.scale, TORCH)["x_hat"] / sae.scale,
                           batch, on_clean=lambda x: rows.append(x.cpu()))
    x = torch.cat(rows)[:cfg.data.eval_tokens]  # (eval_tokens, d)
    return {**reconstruction_metrics(sae, x), **ce}
