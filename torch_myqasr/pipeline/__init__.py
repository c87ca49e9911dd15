"""The personalise-and-quantize job, end to end, as library calls the CLI wraps."""

from torch_myqasr.pipeline.deploy import DeployedWhisper, artifact_dir, deploy_quantized, load_deployed
from torch_myqasr.pipeline.personalize import (
    KEEP_FULL_PRECISION_DEFAULT,
    MAX_CACHE_LEN,
    QuantizedWhisper,
    calibration_summary,
    exported_decoder,
    is_quantized_dir,
    layer_inventory,
    load_quantized,
    quantize_whisper,
    save_lowered_artifact,
    save_quantized,
)

__all__ = [
    "DeployedWhisper",
    "artifact_dir",
    "deploy_quantized",
    "load_deployed",
    "KEEP_FULL_PRECISION_DEFAULT",
    "MAX_CACHE_LEN",
    "QuantizedWhisper",
    "calibration_summary",
    "exported_decoder",
    "is_quantized_dir",
    "layer_inventory",
    "load_quantized",
    "quantize_whisper",
    "save_lowered_artifact",
    "save_quantized",
]
