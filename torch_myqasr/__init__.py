"""torch_myqasr: label-free personalised mixed-precision quantization for speech recognisers.

Importing the package is all a deployment process needs: it registers the ``myqasr::`` custom
ops so saved artifacts and converted programs load.
"""

import os as _os

# torchao (imported by transformers and by PT2E) tries to load CUDA-only extensions and prints two
# "Failed to load" lines on CPU machines; they are harmless, so keep them quiet unless asked.
_os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

__version__ = "0.1.0"

# Register the myqasr:: custom ops (packed linears, packed lookup, group-wise dequantize) so that a
# saved artifact or converted program loads in a process that only imported torch_myqasr.
import logging as _logging  # noqa: E402

# torchao's import logs a note about the skipped extensions and torch warns about its own pytree
# registrations; neither is actionable for our users, so they are silenced for this import only.
_noisy = [_logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
_levels = [logger.level for logger in _noisy]
for _logger in _noisy:
    _logger.setLevel(_logging.ERROR)
try:
    from torch_myqasr import ops as _ops  # noqa: E402,F401
    from torch_myqasr.quantizer import dequant_op as _dequant_op  # noqa: E402,F401
finally:
    for _logger, _level in zip(_noisy, _levels):
        _logger.setLevel(_level)
