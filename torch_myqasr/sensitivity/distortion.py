"""Output-distance sensitivity: how much one layer's output moves when that layer alone is
quantized, for every candidate format.

For each format the clipping ratio is searched first (the same search the quantizer uses), so the
distortion is that of the weights the quantizer would really store. The result fills
``LayerInfo.distortion`` (what the ``optimal`` strategy minimises) and the searched ratios are
reused for the final codes.
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
