"""The ``uniform`` strategy: every layer in the same format, the highest-bit one that fits."""

from __future__ import annotations

from typing import Sequence

from torch_myqasr.allocation.layers import LayerInfo


def allocate_uniform(
    layers: Sequence[LayerInfo], formats: Sequence[str], group_size: int, capacity: int
) -> dict[str, str] | None:
    """Give every layer the first format of ``formats`` (sorted most bits first) that fits.

    Args:
        layers: the layers to place.
        formats: candidate format names, most bits per weight first (`sort_formats`).
        group_size: weights per scale group along K.
        capacity: bytes available to the layers (budget minus fixed bytes).

    Returns:
        ``{layer name: format}``, or None when not even the last format fits.
    """
    for fmt in formats:
        if sum(layer.nbytes(fmt, group_size) for layer in layers) <= capacity:
            return {layer.name: fmt for layer in layers}
    return None
