"""Output-distance sensitivity: how much one layer's output moves when that layer alone is
quantized, for every candidate format.

For each format the clipping ratio is searched first (the same search the quantizer uses), so the
distortion is that of the weights the quantizer would really store. The result fills
``LayerInfo.distortion`` (what the ``optimal`` strategy minimises) and the searched ratios are
reused for the final codes.

For the ``optimal`` strategy the quantizer puts every layer's distortion in ONE unit, nats of KL of
the model's output token distribution, so that summing them means something: the logits layer is
measured by that KL directly (`output_layer_distortions`), and an inner layer's cosine distance is
multiplied by `output_kl_scale` (the logits layer's Fisher information per unit relative error of
its input, `logits_fisher_scale`, divided by the residual branches that dilute an inner error).
"""

from __future__ import annotations

from typing import Sequence

import torch

# A module import (not `from ... import`): the quantizer package imports this package too, and
# the names are only needed at call time.
import torch_myqasr.quantizer.clip_search as _cs
import torch_myqasr.quantizer.weight_quant as _wq


def layer_distortions(
    w: torch.Tensor,
    formats: Sequence[str],
    group_size: int,
    *,
    x_sample: torch.Tensor | None = None,
    index_sample: torch.Tensor | None = None,
    metric: str = "cosine",
    grid: Sequence[float] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Distortion and searched clipping ratio of ``w`` for every integer format in ``formats``.

    Args:
        w: the layer's float weight (Linear / Conv1d / Embedding).
        formats: candidate formats (``"int2"`` .. ``"int8"``).
        group_size: weights per group along K.
        x_sample: sampled input rows [R, K] (conv: unfolded patches).
        index_sample: sampled token ids (embedding use).
        metric: ``"cosine"`` (unitless) or ``"kl"`` (nats, between softmaxed outputs). Without any
            sample the weight MSE is used for both the search and the distortion.
        grid: clipping ratios tried (default `DEFAULT_CLIP_GRID` of the weight quantizer).

    Returns:
        ``(distortion, clip_ratio)``, both ``{format: value}``.
    """
    grid = _wq.DEFAULT_CLIP_GRID if grid is None else grid
    bits = {fmt: _wq.bits_of(fmt) for fmt in formats}
    # One probe (reference outputs, group ranges) and ONE vectorised pass over the weight for
    # every (format, ratio) candidate; see torch_myqasr.quantizer.clip_search.
    probe = _cs.SearchProbe(w, group_size, x_sample=x_sample, index_sample=index_sample, metric=metric)
    best = probe.search(list(bits.values()), grid)
    dist: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for fmt, b in bits.items():
        r, d = best[b]
        dist[fmt], ratio[fmt] = max(d, 0.0), r
    return dist, ratio


def logits_fisher_scale(w: torch.Tensor, x_sample: torch.Tensor, *, chunk_rows: int = 64) -> float:
    """Nats of output KL per unit cosine distance of the logits layer's INPUT (label-free).

    The logits are ``z = W x`` (``w`` [V, D], ``x_sample`` [R, D], the final hidden states seen on
    the calibration clips). An error ``n`` in ``x`` that is isotropic with cosine distance ``delta``
    (``|n|^2 = 2 delta |x|^2``) changes the token distribution by, to second order,
    ``KL(p || p') = n^T F n / 2`` with the Fisher matrix ``F = W^T (diag p - p p^T) W``; averaged over
    directions that is ``delta * |x|^2 * tr(F) / D``, and ``tr(F) = sum_v p_v |w_v|^2 - |sum_v p_v w_v|^2``
    (the variance of the output embeddings under the model's own prediction). Returns that factor
    averaged over the sample rows, in nats per unit cosine distance (no labels: ``p`` is the model's
    own distribution).
    """
    w2 = w.detach().reshape(w.shape[0], -1).float()
    x = x_sample.reshape(-1, w2.shape[1]).float()
    if x.shape[0] == 0:
        raise ValueError("logits_fisher_scale needs at least one sampled input row")
    norms = w2.square().sum(1)  # [V]
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, x.shape[0], chunk_rows):
        xc = x[s : s + chunk_rows]
        p = torch.softmax(xc @ w2.t(), dim=-1)  # [r, V]
        trace_f = (p @ norms) - (p @ w2).square().sum(-1)  # [r]
        total += (xc.square().sum(-1) * trace_f.clamp(min=0.0)).sum(dtype=torch.float64)
    return float(total) / (x.shape[0] * w2.shape[1])


def output_layer_distortions(
    w: torch.Tensor,
    formats: Sequence[str],
    group_size: int,
    *,
    x_sample: torch.Tensor,
    index_sample: torch.Tensor | None,
    lookup_scale: float,
    grid: Sequence[float] | None = None,
    search_features: int | None = _cs.SEARCH_FEATURES,
) -> tuple[dict[str, float], dict[str, float]]:
    """Distortion (nats) and searched clipping ratio of the layer that produces the logits.

    The matmul use is measured by the KL of the token distribution (the model's output itself).
    A tied token embedding's lookup use is an inner use: its cosine distance is added times
    ``lookup_scale`` (nats per unit cosine distance, `output_kl_scale`). The clipping ratio of each
    format minimises that sum, so the stored codes are those the distortion describes.

    Returns:
        ``(distortion, clip_ratio)``, both ``{format: value}``; distortions in nats.
    """
    grid = _wq.DEFAULT_CLIP_GRID if grid is None else grid
    _wq.check_grid(grid)
    bits = list(dict.fromkeys(_wq.bits_of(f) for f in formats))
    kl = _cs.SearchProbe(w, group_size, x_sample=x_sample, metric="kl", search_features=search_features)
    look = None
    if index_sample is not None and index_sample.numel():
        look = _cs.SearchProbe(w, group_size, index_sample=index_sample, metric="cosine", search_features=None)
    cand_bits = [b for b in bits for _ in grid]
    cand_ratios = [float(r) for _ in bits for r in grid]
    obj = kl.objectives(cand_bits, cand_ratios, features=kl.features)
    if look is not None:
        obj = obj + lookup_scale * look.objectives(cand_bits, cand_ratios)
    best = obj.view(len(bits), len(grid)).argmin(1)  # first minimum: ties keep the larger ratio
    ratios = [float(grid[int(i)]) for i in best]
    # The search may have run on a subset of the logits; the distortion is measured on all of them.
    value = kl.objectives(bits, ratios)
    if look is not None:
        value = value + lookup_scale * look.objectives(bits, ratios)
    by_bits = {b: (r, max(float(v), 0.0)) for b, r, v in zip(bits, ratios, value)}
    dist = {f: by_bits[_wq.bits_of(f)][1] for f in formats}
    ratio = {f: by_bits[_wq.bits_of(f)][0] for f in formats}
    return dist, ratio


def output_kl_scale(fisher_scale: float, branches: int) -> float:
    """Nats of output KL per unit cosine distance of an INNER layer's output.

    An inner layer writes one of ``branches`` roughly equal parts of the residual stream that the
    logits layer finally reads, so a relative error ``delta`` (cosine distance) in it is about
    ``delta / branches`` in the stream; ``fisher_scale`` (`logits_fisher_scale`) turns that into
    nats. ``branches`` is counted per program as its normalisation layers (pre-LN transformer: one
    per residual branch plus the final one; Whisper tiny: 9 in the encoder, 13 in the decoder).
    """
    if branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
    return float(fisher_scale) / branches
