"""Distances between a layer's full-precision output and a perturbed (quantized) output.

Pure tensor functions with no dependency on the rest of the package, so both the weight
quantizer's scale search and the sensitivity scores can use them without import cycles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("cosine", "kl", "mse")
"""Names `output_distance` accepts."""


def cosine_distance(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Mean over rows of ``1 - cos(y_row, y_hat_row)`` (unitless, 0 = same direction, at most 2).

    Args:
        y: reference outputs, [..., D]; every leading index is one row (one token / frame).
        y_hat: perturbed outputs, same shape.
    """
    a = y.reshape(-1, y.shape[-1]).float()
    b = y_hat.reshape(-1, y_hat.shape[-1]).float()
    # eps keeps all-zero rows (padding) at distance 1 instead of NaN.
    return float((1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean())


def kl_distance(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Mean over rows of ``KL(softmax(y) || softmax(y_hat))`` in nats (0 = identical)."""
    a = y.reshape(-1, y.shape[-1]).float()
    b = y_hat.reshape(-1, y_hat.shape[-1]).float()
    logp = F.log_softmax(a, dim=-1)
    logq = F.log_softmax(b, dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def mse_distance(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Mean squared difference (units of the values squared)."""
    return float((y.float() - y_hat.float()).pow(2).mean())


def output_distance(y: torch.Tensor, y_hat: torch.Tensor, metric: str = "cosine") -> float:
    """Distance between ``y`` and ``y_hat`` under ``metric`` (one of `METRICS`)."""
    if metric == "cosine":
        return cosine_distance(y, y_hat)
    if metric == "kl":
        return kl_distance(y, y_hat)
    if metric == "mse":
        return mse_distance(y, y_hat)
    raise ValueError(f"unknown distance metric {metric!r}; use one of {', '.join(METRICS)}")
