"""torch_myqasr: label-free personalised mixed-precision quantization for speech recognisers.

Importing the package is all a deployment process needs: it registers the ``myqasr::`` custom
ops (once the kernels module exists) so saved artifacts load.
"""

import os as _os

# torchao (imported by transformers and by PT2E) tries to load CUDA-only extensions and prints two
# "Failed to load" lines on CPU machines; they are harmless, so keep them quiet unless asked.
_os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

__version__ = "0.1.0"
