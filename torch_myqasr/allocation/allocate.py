"""`allocate_bits`: one entry point for the three strategies, with the budget checks they share."""

from __future__ import annotations

import warnings
from typing import Sequence

from torch_myqasr.allocation.layers import (
    DEFAULT_FORMATS,
    BudgetError,
    LayerInfo,
    LayerScheme,
    NothingToQuantizeWarning,
    budget_capacity,
    mib,
    sort_formats,
    validate_layers,
)
from torch_myqasr.allocation.myqasr import DEFAULT_ORDER, ORDERS, allocate_myqasr
from torch_myqasr.allocation.optimal import DEFAULT_MAX_UNITS, allocate_optimal
from torch_myqasr.allocation.uniform import allocate_uniform

STRATEGIES = ("myqasr", "optimal", "uniform")
"""Strategy names `allocate_bits` accepts."""

DEFAULT_STRATEGY = "myqasr"


def model_nbytes(layers: Sequence[LayerInfo], fmt: str, group_size: int = 64, fixed_bytes: int = 0) -> int:
    """Bytes of the whole model with every layer in ``fmt``: ``fixed_bytes`` + the layers' weights."""
    return fixed_bytes + sum(layer.nbytes(fmt, group_size) for layer in layers)


def allocate_bits(
    layers: Sequence[LayerInfo],
    budget_mb: float,
    *,
    strategy: str = DEFAULT_STRATEGY,
    formats: Sequence[str] = DEFAULT_FORMATS,
    group_size: int = 64,
    fixed_bytes: int = 0,
    order: str = DEFAULT_ORDER,
    max_units: int = DEFAULT_MAX_UNITS,
) -> dict[str, LayerScheme]:
    """Choose a format for every layer so the whole model fits ``budget_mb`` MiB.

    The model's size is ``fixed_bytes + sum(weight_nbytes(choice, layer))`` and never exceeds
    ``budget_mb * 2**20`` bytes.

    Args:
        layers: the weights to place, in model order (the result keeps this order).
        budget_mb: memory budget in MiB (2**20 bytes), counting everything.
        strategy: ``"myqasr"`` (the paper's greedy, by ``score``), ``"optimal"`` (least summed
            ``distortion``), or ``"uniform"`` (one format for all, the highest that fits).
        formats: candidate format names (`torch_myqasr.formats.FORMATS`), in any order.
        group_size: weights per scale group along K for grouped formats.
        fixed_bytes: bytes not allocated here (norms, biases, positions, layers kept in fp).
        order: for ``"myqasr"``: ``"low-score-first"`` or ``"high-score-first"``.
        max_units: for ``"optimal"``: DP table width (exact when the slack fits; see optimal.py).

    Returns:
        ``{layer name: LayerScheme}`` in the order of ``layers``. When the budget holds the whole
        model in fp32, every layer is ``"fp32"`` and a `NothingToQuantizeWarning` is issued.

    Raises:
        BudgetError: the budget is below the smallest reachable size (every layer at its smallest
            candidate); the message gives that minimum in MiB.
        ValueError: unknown strategy / order / format, duplicate layer names, or (``"optimal"``)
            a layer without a distortion estimate for some candidate format.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(fixed_bytes, int) or fixed_bytes < 0:
        raise ValueError(f"fixed_bytes must be a non-negative int (bytes), got {fixed_bytes!r}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    validate_layers(layers)
    cands = sort_formats(formats, group_size)
    capacity = budget_capacity(budget_mb)

    fp32 = model_nbytes(layers, "fp32", group_size, fixed_bytes)
    if fp32 <= capacity:
        fp16 = model_nbytes(layers, "fp16", group_size, fixed_bytes)
        warnings.warn(
            f"budget {budget_mb} MiB holds the whole model in full precision ({mib(fp32):.3f} MiB in "
            f"fp32; {mib(fp16):.3f} MiB in fp16): nothing needs quantizing, every layer is kept in fp32",
            NothingToQuantizeWarning,
            stacklevel=2,
        )
        return {layer.name: LayerScheme.for_layer(layer, "fp32", group_size) for layer in layers}

    smallest = fixed_bytes + sum(min(layer.nbytes(f, group_size) for f in cands) for layer in layers)
    if smallest > capacity:
        raise BudgetError(
            f"budget {budget_mb} MiB is below the smallest reachable size {mib(smallest):.3f} MiB "
            f"(every layer in {cands[-1]} with group size {group_size}, plus {mib(fixed_bytes):.3f} MiB "
            f"fixed); ask for at least {mib(smallest):.3f} MiB, allow fewer-bit formats, or keep fewer "
            "layers in full precision"
        )

    room = capacity - fixed_bytes
    if strategy == "uniform":
        chosen = allocate_uniform(layers, cands, group_size, room)
    elif strategy == "myqasr":
        chosen = allocate_myqasr(layers, cands, group_size, room, order=order)
    else:
        result = allocate_optimal(layers, cands, group_size, room, max_units=max_units)
        chosen = None if result is None else result[0]
    # The minimum check above guarantees a fit; failing either check below is a bug in a strategy,
    # and a scheme over budget must never leave this function.
    if chosen is None:
        raise RuntimeError(f"internal error: strategy {strategy!r} found no fit above the minimum size")
    out = {layer.name: LayerScheme.for_layer(layer, chosen[layer.name], group_size) for layer in layers}
    size = fixed_bytes + sum(s.nbytes for s in out.values())
    if size > capacity:
        raise RuntimeError(f"internal error: strategy {strategy!r} chose {size} bytes for a budget of {capacity}")
    return out
