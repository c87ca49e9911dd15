"""Export Whisper for PT2E quantization and run greedy decoding through the exported modules.

- `WhisperEncoderExport`, `WhisperDecoderStep` (modules.py): wrappers whose parameter names equal
  the Hugging Face model's; the module docstring explains the explicit static KV cache.
- `export_whisper` -> `ExportedWhisper` (program.py): the two ``torch.export`` programs.
- `DecodingOptions`, `decoding_options` (options.py): prompt, eos, suppression, cap.
- `greedy_decode` (greedy.py): the batched loop over any callables with the wrappers' signatures.
"""

from torch_myqasr.export.greedy import greedy_decode, required_cache_len
from torch_myqasr.export.modules import WhisperDecoderStep, WhisperEncoderExport
from torch_myqasr.export.options import DEFAULT_MAX_NEW_TOKENS, DecodingOptions, decoding_options
from torch_myqasr.export.program import ExportedWhisper, export_whisper

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DecodingOptions",
    "ExportedWhisper",
    "WhisperDecoderStep",
    "WhisperEncoderExport",
    "decoding_options",
    "export_whisper",
    "greedy_decode",
    "required_cache_len",
]
