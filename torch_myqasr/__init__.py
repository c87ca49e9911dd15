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
from torch_myqasr import ops as _ops  # noqa: E402,F401
from torch_myqasr.quantizer import dequant_op as _dequant_op  # noqa: E402,F401
