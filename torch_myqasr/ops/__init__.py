"""Low-bit weights and the ``myqasr::`` linear ops.

    from torch_myqasr.ops import quantize_weight, quantized_linear, QuantizedWeight
    qw = quantize_weight(weight, fmt="int4", group_size=64)
    y = quantized_linear(x, qw, bias)   # == F.linear(x, qw.dequantize(x.dtype), bias)

Importing this package registers ``torch.ops.myqasr.linear_affine`` / ``linear_binary`` /
``linear_nf4`` (see `torch_myqasr.ops.library`), ``embedding_packed`` (`torch_myqasr.ops.embedding`) and
the CPU-resident ``linear_int4pack`` / ``embedding_int4pack`` (`torch_myqasr.ops.int4pack`). Triton is imported only when a CUDA tensor
reaches an op.
"""

from torch_myqasr.ops.qweight import SUPPORTED_FORMATS, QuantizedWeight, quantize_weight  # noqa: I001
from torch_myqasr.ops import library  # noqa: F401  (registers the ops)
from torch_myqasr.ops.linear import quantized_linear
from torch_myqasr.ops.embedding import quantized_embedding  # registers myqasr::embedding_packed
from torch_myqasr.ops import int4pack  # noqa: F401  (registers myqasr::linear_int4pack / embedding_int4pack)

__all__ = ["QuantizedWeight", "quantize_weight", "quantized_linear", "quantized_embedding", "SUPPORTED_FORMATS", "library"]
