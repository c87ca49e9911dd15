"""The myQASR PT2E quantizer: observers, group-wise weight quantization and `MyQASRQuantizer`.

Importing this package registers the ``myqasr::dequantize_groupwise`` op that converted graphs use.
"""

from torch_myqasr.quantizer.dequant_op import dequantize_groupwise_op
from torch_myqasr.quantizer.observers import (
    LayerInputObserver,
    LayerOutputObserver,
    LayerStatistics,
    LayerWeightObserver,
    ReservoirSampler,
)
from torch_myqasr.quantizer.quantizer import MyQASRQuantizer
from torch_myqasr.quantizer.weight_quant import (
    DEFAULT_CLIP_GRID,
    GroupwiseCodes,
    dequantize_groupwise,
    quantize_groupwise,
    search_clip_ratio,
)

__all__ = [
    "DEFAULT_CLIP_GRID",
    "GroupwiseCodes",
    "LayerInputObserver",
    "LayerOutputObserver",
    "LayerStatistics",
    "LayerWeightObserver",
    "MyQASRQuantizer",
    "ReservoirSampler",
    "dequantize_groupwise",
    "dequantize_groupwise_op",
    "quantize_groupwise",
    "search_clip_ratio",
]
