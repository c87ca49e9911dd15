"""torch_myqasr: label-free personalised mixed-precision quantization for speech recognisers.

Importing the package is all a deployment process needs: it registers the ``myqasr::`` custom
ops (once the kernels module exists) so saved artifacts load.
"""

__version__ = "0.1.0"
