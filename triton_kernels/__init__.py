"""Low-bit weight formats: dense bit packing (`bitpack`, pure torch) and Triton dequant-matmul
kernels (`dequant_matmul`, imports triton; only loaded when a CUDA tensor or a test needs it)."""
