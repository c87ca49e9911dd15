"""`quantized_linear`: ``F.linear(x, qw.dequantize(x.dtype), bias)`` on packed low-bit weights."""

from __future__ import annotations

from typing import Optional

import torch

from torch_myqasr.ops import library
from torch_myqasr.ops.qweight import QuantizedWeight

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantized_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., K] @ W^T + bias`` for a `QuantizedWeight` W [N, K]; returns x.dtype [..., N].

    Equal (to the precision of x.dtype) to ``F.linear(x, qw.dequantize(x.dtype), bias)``. Calls
    the ``myqasr::linear_*`` op of the weight's family: Triton on CUDA, aten's int4 weight-pack
    kernel on CPU for intB with bfloat16/float16 activations (operands cached on ``qw`` at the
    first eager call or by ``qw.prepare_cpu()``), otherwise dequantize + F.linear.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (see quantize_weight), got {type(qw).__name__}")
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features (shape {list(x.shape)}) but the weight is [{n}, {k}]")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}; cast it with x.to(torch.bfloat16)")
    if x.device != qw.device:
        raise ValueError(f"x is on {x.device} but the weight is on {qw.device}; use qw.to({str(x.device)!r})")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be [{n}] on {x.device}, got {list(bias.shape)} on {bias.device}")
    if x.device.type == "cpu" and qw._cpu_packed is None and not torch.compiler.is_compiling():
        # Built once per weight, eagerly; a compiled graph reads the cached tensors as inputs.
        qw.prepare_cpu()
    if qw.fmt == "nf4":
        return library.linear_nf4(x, qw.packed, qw.scale_t, qw.group_size, n, k, bias, qw.dq_scale, qw.dq_offset)
    if qw.fmt == "int1":
        return library.linear_binary(
            x, qw.packed, qw.scale_t, qw.group_size, n, k, bias, qw._cpu_packed, qw._cpu_scales_zeros
        )
    return library.linear_affine(
        x, qw.packed, qw.scale_t, qw.zero_t, qw.bits, qw.group_size, n, k, bias, qw._cpu_packed, qw._cpu_scales_zeros
    )
