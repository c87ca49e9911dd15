"""Lowering of ``convert_pt2e`` graphs to packed low-bit ``myqasr::`` ops (docs/lowering.md).

    from torch_myqasr.lowering import lower_quantized, quantized_weight_bytes
    lowered = lower_quantized(convert_pt2e(prepared))            # same outputs, packed weights
    fast = lower_quantized(convert_pt2e(p2), compute_dtype=torch.bfloat16)  # CPU deployment layout
    compiled = torch.compile(lowered)

Importing this package registers every op a lowered graph calls.
"""

from torch_myqasr.lowering.passes import (  # noqa: I001
    EMBEDDING_OP,
    LINEAR_OPS,
    LoweredLayer,
    LoweringError,
    lower_quantized,
)
from torch_myqasr.lowering.cpu_kernels import use_cpu_kernels
from torch_myqasr.lowering.size import module_bytes, quantized_weight_bytes

__all__ = [
    "EMBEDDING_OP",
    "LINEAR_OPS",
    "LoweredLayer",
    "LoweringError",
    "lower_quantized",
    "module_bytes",
    "quantized_weight_bytes",
    "use_cpu_kernels",
]
