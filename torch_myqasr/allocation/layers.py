"""Layer descriptions the allocators read, the per-layer choice they return, and size bookkeeping.

Every byte count here comes from `torch_myqasr.formats.weight_nbytes`, so the budget the allocators
honour is the memory the packed kernels really use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch_myqasr.formats import MIB, bits_per_weight, get_format, weight_nbytes

DEFAULT_FORMATS: tuple[str, ...] = ("int8", "int6", "int5", "int4", "int3", "int2")
"""Candidate formats the allocators use unless told otherwise (issue 3: int8, int6..int2)."""


class BudgetError(ValueError):
    """The memory budget cannot be met (or is not a valid budget). The message says the minimum."""


class NothingToQuantizeWarning(UserWarning):
    """The budget holds the whole model in fp32, so every layer is kept in full precision."""


@dataclass(frozen=True)
class LayerInfo:
    """One weight matrix the allocator may quantize.

    Attributes:
        name: module name in the model (e.g. ``"model.encoder.layers.0.fc1"``); unique.
        out_features: N, rows of the [N, K] weight.
        in_features: K, columns of the weight (grouped along K).
        score: sensitivity score for the ``myqasr`` strategy (e.g. median |output|, unitless);
            the order of scores is all that matters.
        distortion: ``distortion[fmt]`` = estimated output error if this layer alone is stored in
            ``fmt`` (any non-negative unit, lower is better); needed by the ``optimal`` strategy.
    """

    name: str
    out_features: int
    in_features: int
    score: float
    distortion: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LayerInfo.name must be a non-empty string, got {self.name!r}")
        for attr in ("out_features", "in_features"):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"layer {self.name!r}: {attr} must be a positive int, got {v!r}")
        if not math.isfinite(float(self.score)):
            raise ValueError(
                f"layer {self.name!r}: score must be a finite number, got {self.score!r} "
                "(a NaN/inf score usually means the layer saw no calibration data)"
            )

    @property
    def numel(self) -> int:
        """Number of weight values (N * K)."""
        return self.out_features * self.in_features

    def nbytes(self, fmt: str, group_size: int) -> int:
        """Exact bytes of this layer's weight stored in ``fmt`` (scales and zero points included)."""
        return weight_nbytes(fmt, self.out_features, self.in_features, group_size)


@dataclass(frozen=True)
class LayerScheme:
    """The format chosen for one layer.

    Attributes:
        format: format name from `torch_myqasr.formats.FORMATS` (e.g. ``"int4"``, ``"fp32"``).
        bits: bits per stored weight value of that format (32 for fp32).
        group_size: weights per scale group along K; 0 for ungrouped formats (fp16/bf16/fp32).
        nbytes: exact bytes of the stored weight (`weight_nbytes`).
        out_features: N of the weight, when known (lets a loaded scheme re-check ``nbytes``).
        in_features: K of the weight, when known.
    """

    format: str
    bits: int
    group_size: int
    nbytes: int
    out_features: int | None = None
    in_features: int | None = None

    @classmethod
    def for_layer(cls, layer: LayerInfo, fmt: str, group_size: int) -> "LayerScheme":
        """The `LayerScheme` of ``layer`` stored in ``fmt`` with groups of ``group_size``."""
        f = get_format(fmt)
        gs = group_size if f.grouped else 0
        return cls(
            format=fmt,
            bits=f.bits,
            group_size=gs,
            nbytes=layer.nbytes(fmt, group_size),
            out_features=layer.out_features,
            in_features=layer.in_features,
        )


def validate_layers(layers: Sequence[LayerInfo]) -> None:
    """Check that ``layers`` are `LayerInfo`s with unique names; raise a clear ValueError if not."""
    seen: set[str] = set()
    for layer in layers:
        if not isinstance(layer, LayerInfo):
            raise TypeError(f"expected LayerInfo objects, got {type(layer).__name__}: {layer!r}")
        if layer.name in seen:
            raise ValueError(f"layer name {layer.name!r} appears twice; layer names must be unique")
        seen.add(layer.name)


def sort_formats(formats: Iterable[str], group_size: int) -> list[str]:
    """Candidate formats from most to fewest bits per weight (scales included); ties by name.

    For one layer, `weight_nbytes` grows with bits-per-weight at a fixed group size, so this is
    also the order of every layer's byte cost: index 0 is the largest, the last the smallest.
    """
    names = list(formats)
    if not names:
        raise ValueError("formats is empty; give at least one candidate format, e.g. ('int4',)")
    if len(set(names)) != len(names):
        raise ValueError(f"formats has duplicates: {names}")
    for name in names:
        get_format(name)  # clear error for unknown names
    return sorted(names, key=lambda n: (-bits_per_weight(n, group_size), n))


def total_nbytes(layers: Sequence[LayerInfo], fmt_of: dict[str, str], group_size: int, fixed_bytes: int) -> int:
    """Bytes of the whole model: ``fixed_bytes`` plus each layer in format ``fmt_of[layer.name]``."""
    return fixed_bytes + sum(layer.nbytes(fmt_of[layer.name], group_size) for layer in layers)


def budget_capacity(budget_mb: float) -> int:
    """The largest whole number of bytes within ``budget_mb`` MiB (sizes are integers, so
    ``size <= budget_mb * 2**20`` exactly when ``size <= budget_capacity(budget_mb)``)."""
    b = float(budget_mb)
    if not math.isfinite(b) or b <= 0:
        raise BudgetError(f"budget_mb must be a positive finite number of MiB, got {budget_mb!r}")
    return math.floor(b * MIB)


def mib(nbytes: int) -> float:
    """Bytes to MiB (2**20 bytes)."""
    return nbytes / MIB
