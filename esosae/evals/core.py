"""Core metrics on held-out activations (METHOD.md §7).

    FVU   = Σ_b ‖x − x̂‖² / Σ_b ‖x − mean(x)‖²       (1 − explained variance)
    MSE   = mean_b ‖x − x̂‖²                           (raw activation units)
    L0    = mean_b #{i : f_i > 0}, per layer
    dead  = % of features that fire on no held-out token; dense = % firing on > 10% of them
    |c|   = mean and max |⟨W_dec1[i], W_dec2[j]⟩| over all cross-layer pairs of unit rows
"""

from __future__ import annotations

import torch

from esosae.backend import TORCH, Backend
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
