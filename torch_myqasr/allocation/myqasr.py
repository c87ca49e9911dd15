"""The ``myqasr`` strategy: the paper's greedy sweep, at most one level of spread between layers.

All layers start at the highest candidate format. Layers are ranked by score; in rank order, one
layer at a time drops to the next lower candidate until the model fits. When every layer has
dropped a level and the model still does not fit, the sweep repeats one level lower. At every step
the layers sit on at most two adjacent levels, so the spread is at most one candidate step (one bit
with the default int8/6/5/4/3/2 candidates except between int8 and int6, which are adjacent
candidates two bits apart).
"""

from __future__ import annotations

from typing import Sequence

from torch_myqasr.allocation.layers import LayerInfo

ORDERS = ("low-score-first", "high-score-first")
"""Which end of the score ranking loses bits first (docs/allocation.md discusses both)."""

DEFAULT_ORDER = "high-score-first"
"""Default order: layers with the LARGEST score (e.g. median |output|) lose bits first. Measured on
real Whisper tiny.en at 3.5 bits/weight (benchmarks/results/wer_vs_budget_tiny-en_cpu2.md): the
other order collapses (WER > 100%) where this one stays near uniform int4; docs/allocation.md."""


def rank_layers(layers: Sequence[LayerInfo], order: str) -> list[LayerInfo]:
    """Layers in the order they lose bits: by score (ascending for ``"low-score-first"``,
    descending for ``"high-score-first"``), ties broken by name so the result is deterministic."""
    if order == "low-score-first":
        return sorted(layers, key=lambda l: (float(l.score), l.name))
    if order == "high-score-first":
        return sorted(layers, key=lambda l: (-float(l.score), l.name))
    raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")


def allocate_myqasr(
    layers: Sequence[LayerInfo],
    formats: Sequence[str],
    group_size: int,
    capacity: int,
    order: str = DEFAULT_ORDER,
) -> dict[str, str] | None:
    """The paper's greedy allocation.

    Args:
        layers: the layers to place (``score`` is read).
        formats: candidate format names, most bits per weight first (`sort_formats`).
        group_size: weights per scale group along K.
        capacity: bytes available to the layers (budget minus fixed bytes).
        order: ``"low-score-first"`` or ``"high-score-first"``: which end of the ranking drops first.

    Returns:
        ``{layer name: format}`` in the order of ``layers``, or None when even every layer at the
        lowest candidate does not fit. Stops at the first step that fits, so the result keeps as
        many bits as the sweep allows.
    """
    ranked = rank_layers(layers, order)
    level = {layer.name: 0 for layer in layers}
    total = sum(layer.nbytes(formats[0], group_size) for layer in layers)
    if total <= capacity:
        return {layer.name: formats[0] for layer in layers}
    for lvl in range(len(formats) - 1):
        hi, lo = formats[lvl], formats[lvl + 1]
        for layer in ranked:
            total += layer.nbytes(lo, group_size) - layer.nbytes(hi, group_size)
            level[layer.name] = lvl + 1
            if total <= capacity:
                return {layer.name: formats[level[layer.name]] for layer in layers}
    return None
