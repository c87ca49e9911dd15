"""Bit allocation under a memory budget, and the scheme file that records the result.

Pure algorithms on layer descriptions (`LayerInfo`): no model code. Budgets are MiB (2**20
bytes); sizes come only from `torch_myqasr.formats.weight_nbytes`. See docs/allocation.md.
"""

from torch_myqasr.allocation.allocate import DEFAULT_STRATEGY, STRATEGIES, allocate_bits, model_nbytes
from torch_myqasr.allocation.layers import (
    DEFAULT_FORMATS,
    BudgetError,
    LayerInfo,
    LayerScheme,
    NothingToQuantizeWarning,
)
from torch_myqasr.allocation.myqasr import DEFAULT_ORDER, ORDERS
from torch_myqasr.allocation.optimal import MCKPSolution, allocate_optimal, solve_mckp
from torch_myqasr.allocation.plot import plot_scheme
from torch_myqasr.allocation.scheme import (
    SCHEME_FORMAT_VERSION,
    Scheme,
    SchemeError,
    bit_histogram,
    budget_for_bits,
    format_scheme_summary,
    uniform_size_mb,
    load_scheme,
    save_scheme,
)

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_ORDER",
    "DEFAULT_STRATEGY",
    "ORDERS",
    "SCHEME_FORMAT_VERSION",
    "STRATEGIES",
    "BudgetError",
    "LayerInfo",
    "LayerScheme",
    "MCKPSolution",
    "NothingToQuantizeWarning",
    "Scheme",
    "SchemeError",
    "allocate_bits",
    "allocate_optimal",
    "bit_histogram",
    "budget_for_bits",
    "format_scheme_summary",
    "uniform_size_mb",
    "load_scheme",
    "model_nbytes",
    "plot_scheme",
    "save_scheme",
    "solve_mckp",
]
