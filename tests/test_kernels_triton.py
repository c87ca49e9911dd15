"""The Triton dequant-matmul kernel under TRITON_INTERPRET=1, against a float64 reference.

Why a subprocess: TRITON_INTERPRET must be set before a kernel is decorated, and triton reads it
through its knobs when ``@triton.jit`` runs. In a shared pytest process triton may already have
been imported (torch's custom-op machinery and inductor import it) and other test modules must
not inherit an interpreter-mode environment. So, unless this process is the child, this module
is one test that re-runs this same file in a fresh interpreter with TRITON_INTERPRET=1 (one extra
Python start, about 5 s), and the child runs the parametrised cases below. Run the cases directly
with: ``TRITON_INTERPRET=1 MYQASR_TRITON_CHILD=1 python -m pytest tests/test_kernels_triton.py``.
"""

import os
import subprocess
import sys

_CHILD = os.environ.get("MYQASR_TRITON_CHILD") == "1"
if _CHILD:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported below

import pytest  # noqa: E402
import torch  # noqa: E402

if not _CHILD:

    def test_triton_kernels_under_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", "MYQASR_TRITON_CHILD": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], proc.stdout[-2000:]

else:
    import triton  # noqa: F401

    from torch_myqasr.ops import quantize_weight
    from triton_kernels import dequant_matmul as dm

    FORMATS = ["int8", "int7", "int6", "int5", "int4", "int3", "int2", "int1", "nf4"]
    # Relative to max |reference|: output rounding of each dtype (bf16 has 8 mantissa bits).
    TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def _run(qw, x, bias=None, config=None):
        return dm.dequant_matmul(
            x, qw.packed, qw.scale_t, qw.zero_t, fmt=qw.fmt, group_size=qw.group_size, n=qw.shape[0],
            k=qw.shape[1], bias=bias, dq_scale=qw.dq_scale, dq_offset=qw.dq_offset, config=config,
        )

    def _check(y, qw, x, bias):
        ref = x.double() @ qw.dequantize(torch.float64).T
        if bias is not None:
            ref = ref + bias.double()
        assert y.dtype == x.dtype and y.shape == ref.shape
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < TOL[x.dtype], f"relative error {err:.3g}"

    def test_kernel_is_interpreted():
        assert dm.interpreting()
        assert type(dm._dequant_mm_kernel).__name__ == "InterpretedFunction"

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 16, 96), (17, 40, 64)])
    def test_matches_float64_reference(fmt, dtype, m, n, k):
        g = torch.Generator().manual_seed(m * 7 + n * 13 + k)
        w = torch.randn(n, k, generator=g)
        qw = quantize_weight(w, fmt, group_size=64)
        x = (torch.randn(m, k, generator=g) + 0.1).to(dtype)
        bias = torch.randn(n, generator=g) if m != 3 else None
        _check(_run(qw, x, bias), qw, x, bias)

    CONFIGS = {
        "gemv_split_k": dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3, USE_DOT=False),
        "gemv_dot_m16": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, USE_DOT=True),
        "gemm_gathered_scales": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, USE_DOT=True),
        "gemm_small_k_block": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1, USE_DOT=True),
    }

    @pytest.mark.parametrize("name", list(CONFIGS))
    @pytest.mark.parametrize("fmt", ["int5", "int3", "int1", "nf4"])
    def test_launch_paths(name, fmt):
        # Split-K atomics, K blocks wider than a group (scales gathered per k) and narrower ones.
        cfg = CONFIGS[name]
        m = 1 if cfg["BLOCK_M"] == 1 else 5
        g = torch.Generator().manual_seed(3)
        qw = quantize_weight(torch.randn(24, 200, generator=g), fmt, group_size=32)
        x = torch.randn(m, 200, generator=g).to(torch.float16)
        bias = torch.randn(24, generator=g)
        _check(_run(qw, x, bias, cfg), qw, x, bias)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_nf4_double_quant_and_batched_input(dtype):
        g = torch.Generator().manual_seed(5)
        qw = quantize_weight(torch.randn(40, 320, generator=g), "nf4", group_size=64, double_quant=True)
        x = torch.randn(2, 3, 320, generator=g).to(dtype)  # [..., K] input, M = 6
        y = _run(qw, x)
        assert y.shape == (2, 3, 40)
        _check(y.reshape(6, 40), qw, x.reshape(6, 320), None)

    def test_group_128_and_bias_dtype():
        g = torch.Generator().manual_seed(9)
        qw = quantize_weight(torch.randn(16, 256, generator=g), "int4", group_size=128)
        x = torch.randn(20, 256, generator=g)
        bias = torch.randn(16, generator=g).half()
        _check(_run(qw, x, bias), qw, x, bias.float())

    def test_rejects_integer_activations():
        qw = quantize_weight(torch.randn(16, 64), "int4", 64)
        with pytest.raises(TypeError, match="activations must be"):
            _run(qw, torch.ones(1, 64, dtype=torch.int32))
