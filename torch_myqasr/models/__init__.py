"""Model loading: the CTranslate2 reader and Whisper conversion, offline."""

from torch_myqasr.models.ctranslate2_format import CorruptModelError, read_ctranslate2_model
from torch_myqasr.models.whisper import (
    DEFAULT_MODEL,
    PINNED_MODELS,
    ModelLoadError,
    WhisperBundle,
    load_whisper,
)

__all__ = [
    "CorruptModelError",
    "DEFAULT_MODEL",
    "ModelLoadError",
    "PINNED_MODELS",
    "WhisperBundle",
    "load_whisper",
    "read_ctranslate2_model",
]
