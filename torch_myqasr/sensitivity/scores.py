"""Label-free sensitivity scores of a layer from its full-precision calibration statistics.

``SCORES`` names every score `MyQASRQuantizer` accepts. The statistic scores read the running
|output| statistics (`LayerStatistics`); the output-distance scores (``"cosine"``, ``"kl"``) need
the layer's weight and sampled inputs and are computed by `torch_myqasr.sensitivity.distortion`.
A higher score means a more sensitive layer for every score here (larger activations, or a larger
output change when the layer alone is quantized). The allocator decides which end of the order
loses bits first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the quantizer package imports this one; avoid a cycle at run time
    from torch_myqasr.quantizer.observers import LayerStatistics

STAT_SCORES = ("median", "max", "mean", "std")
"""Scores computed from |output| statistics alone (the paper's default is ``"median"``)."""

DISTANCE_SCORES = ("cosine", "kl")
"""Scores from the output distance of the layer alone quantized at a reference format."""

SCORES = frozenset(STAT_SCORES + DISTANCE_SCORES)
"""Every score name: ``{"median", "max", "mean", "std", "cosine", "kl"}``."""


def check_score(name: str) -> str:
    """Return ``name`` if it is a known score; else a ValueError listing them."""
    if name not in SCORES:
        raise ValueError(f"unknown sensitivity score {name!r}; use one of {', '.join(STAT_SCORES + DISTANCE_SCORES)}")
    return name


def stat_score(stats: "LayerStatistics", name: str) -> float:
    """The ``name`` statistic of |output| (``"median"``, ``"max"``, ``"mean"``, ``"std"``), in the
    units of the layer's output.

    Raises:
        ValueError: unknown score, or a distance score (use `layer_distortions`).
        RuntimeError: the layer saw no calibration data.
    """
    if name not in STAT_SCORES:
        raise ValueError(f"{name!r} is not a statistic score ({', '.join(STAT_SCORES)}); "
                         "output-distance scores come from torch_myqasr.sensitivity.layer_distortions")
    if stats.count == 0:
        raise RuntimeError(
            f"layer {stats.name!r} saw no calibration data: run your clips through every graph "
            "prepared with this quantizer before the first convert_pt2e"
        )
    return {"median": stats.median_abs, "max": stats.max_abs, "mean": stats.mean_abs, "std": stats.std_abs}[name]
