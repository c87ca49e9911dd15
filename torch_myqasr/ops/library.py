"""The ``myqasr::`` custom ops, one per format family, with fake (meta) implementations.

* ``myqasr::linear_affine(x, packed, scale, zero, bits, group_size, n, k, bias, cpu_packed, cpu_scales_zeros)``
  intB, B = 2..8: ``w = (q - zero) * scale``.
* ``myqasr::linear_binary(x, packed, scale, group_size, n, k, bias, cpu_packed, cpu_scales_zeros)``
  int1: ``w = scale * (2 * bit - 1)``.
* ``myqasr::linear_nf4(x, packed, scale, group_size, n, k, bias, dq_scale, dq_offset)``
  nf4: ``w = NF4[q] * absmax`` (absmax double-quantized when dq_scale / dq_offset are given).

Tensors follow `QuantizedWeight` (``scale`` / ``zero`` are its ``[n_groups, N]`` ``scale_t`` /
``zero_t``); ``k`` is the unpadded in_features, ``n`` the out_features. All return ``x.dtype [..., n]``.
``cpu_packed`` / ``cpu_scales_zeros`` are the optional aten int4 weight-pack operands that
`QuantizedWeight.prepare_cpu` caches; CUDA calls ignore them.

How each op is registered (why two ways): CUDA tensors must reach Triton through
``torch.library.triton_op`` + ``wrap_triton`` so inductor can see and fuse around the kernel, but
torch.compile of a ``triton_op`` fails on a machine without a GPU, even for CPU tensors (checked
on torch 2.13). So the op is a ``triton_op`` when CUDA is available and a plain
``torch.library.custom_op`` otherwise (both dispatch on ``x.device``: CUDA -> Triton, CPU -> the
aten int4 weight-pack kernel or the dequantize fallback, see `torch_myqasr.ops.cpu`). The schema
and name are identical, so exported programs load either way. Force a choice with the environment
variable ``MYQASR_OP_KIND=triton_op|custom_op`` (read once, at import).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from torch_myqasr.ops import cpu

_kind_env = os.environ.get("MYQASR_OP_KIND", "").strip()
if _kind_env not in ("", "triton_op", "custom_op"):
    raise ValueError(f"MYQASR_OP_KIND must be 'triton_op' or 'custom_op', got {_kind_env!r}")
OP_KIND = _kind_env or ("triton_op" if torch.cuda.is_available() else "custom_op")
"""How the ops were registered in this process: ``"triton_op"`` or ``"custom_op"``."""


def _wrap() -> Callable:
    if OP_KIND == "triton_op":
        return torch.library.wrap_triton
    return lambda kernel: kernel


def _check_common(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, n: int, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight expects k={k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != n:
        raise ValueError(f"packed must be uint8 [rows, n={n}], got {packed.dtype} {list(packed.shape)}")
    if scale.dim() != 2 or scale.shape[1] != n or scale.shape[0] * group_size < k:
        raise ValueError(f"scale must be [ceil(k / group_size), n] = [{-(-k // group_size)}, {n}], got {list(scale.shape)}")
    for t in (packed, scale):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but the weight is on {t.device}; move one with .to()")


def _triton(x, packed, scale, zero, fmt, group_size, n, k, bias, dq_scale=None, dq_offset=None):
    from triton_kernels.dequant_matmul import dequant_matmul  # imports triton: CUDA path only

    return dequant_matmul(
        x, packed, scale, zero, fmt=fmt, group_size=group_size, n=n, k=k, bias=bias,
        dq_scale=dq_scale, dq_offset=dq_offset, wrap=_wrap(),
    )


def _linear_affine(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
    group_size: int, n: int, k: int, bias: Optional[torch.Tensor] = None,
    cpu_packed: Optional[torch.Tensor] = None, cpu_scales_zeros: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _check_common(x, packed, scale, group_size, n, k)
    if not 2 <= bits <= 8:
        raise ValueError(f"linear_affine takes bits 2..8, got {bits} (int1 is myqasr::linear_binary)")
    if x.is_cuda:
        return _triton(x, packed, scale, zero, f"int{bits}", group_size, n, k, bias)
    if cpu_packed is not None and x.dtype in cpu.INT4PACK_DTYPES:
        return cpu.int4pack_linear(x, cpu_packed, cpu_scales_zeros, group_size, n, k, bias)
    return cpu.fallback_linear(x, f"int{bits}", packed, scale, zero, None, None, group_size, n, k, bias)


def _linear_binary(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, n: int, k: int,
    bias: Optional[torch.Tensor] = None, cpu_packed: Optional[torch.Tensor] = None,
    cpu_scales_zeros: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _check_common(x, packed, scale, group_size, n, k)
    if x.is_cuda:
        return _triton(x, packed, scale, None, "int1", group_size, n, k, bias)
    if cpu_packed is not None and x.dtype in cpu.INT4PACK_DTYPES:
        return cpu.int4pack_linear(x, cpu_packed, cpu_scales_zeros, group_size, n, k, bias)
    return cpu.fallback_linear(x, "int1", packed, scale, None, None, None, group_size, n, k, bias)


def _linear_nf4(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, n: int, k: int,
    bias: Optional[torch.Tensor] = None, dq_scale: Optional[torch.Tensor] = None,
    dq_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _check_common(x, packed, scale, group_size, n, k)
    if (dq_scale is None) != (dq_offset is None):
        raise ValueError("nf4 double quantization needs both dq_scale and dq_offset")
    if x.is_cuda:
        return _triton(x, packed, scale, None, "nf4", group_size, n, k, bias, dq_scale, dq_offset)
    return cpu.fallback_linear(x, "nf4", packed, scale, None, dq_scale, dq_offset, group_size, n, k, bias)


def _fake(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _fake_affine(x, packed, scale, zero, bits, group_size, n, k, bias=None, cpu_packed=None, cpu_scales_zeros=None):
    _check_common(x, packed, scale, group_size, n, k)
    return _fake(x, n)


def _fake_binary(x, packed, scale, group_size, n, k, bias=None, cpu_packed=None, cpu_scales_zeros=None):
    _check_common(x, packed, scale, group_size, n, k)
    return _fake(x, n)


def _fake_nf4(x, packed, scale, group_size, n, k, bias=None, dq_scale=None, dq_offset=None):
    _check_common(x, packed, scale, group_size, n, k)
    return _fake(x, n)


# Autograd: gradients flow to x and bias (the packed weight is frozen), which is what training
# adapters on top of a quantized model (PQM's LoRA on NF4) needs. The backward dequantizes the
# weight once per call: correct everywhere, not a fast path.
_FMT_OF = {"linear_binary": "int1", "linear_nf4": "nf4"}


def _make_autograd(name: str, n_inputs: int):
    def setup_context(ctx, inputs, output):
        x, packed, scale = inputs[0], inputs[1], inputs[2]
        if name == "linear_affine":
            zero, bits, group_size, n, k, bias = inputs[3:9]
            ctx.fmt, dq = f"int{bits}", (None, None)
        else:
            group_size, n, k, bias = inputs[3:7]
            zero = None
            ctx.fmt = _FMT_OF[name]
            dq = tuple(inputs[7:9]) if name == "linear_nf4" else (None, None)
        ctx.meta = (group_size, n, k)
        ctx.bias_index = 8 if name == "linear_affine" else 6
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, packed, scale, zero, *dq)

    def backward(ctx, grad):
        x, packed, scale, zero, dq_scale, dq_offset = ctx.saved_tensors
        group_size, n, k = ctx.meta
        grads: list = [None] * n_inputs
        if ctx.needs_input_grad[0]:
            w = cpu.dequantize_packed(ctx.fmt, packed, scale, zero, dq_scale, dq_offset, group_size, n, k)
            grads[0] = (grad @ w.to(grad.dtype)).to(x.dtype)
        if ctx.has_bias and ctx.needs_input_grad[ctx.bias_index]:
            grads[ctx.bias_index] = grad.reshape(-1, n).sum(0)
        return tuple(grads)

    return setup_context, backward


def _register(name: str, fn: Callable, fake: Callable, n_inputs: int):
    qualname = f"myqasr::{name}"
    if OP_KIND == "triton_op":
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    else:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    setup_context, backward = _make_autograd(name, n_inputs)
    op.register_autograd(backward, setup_context=setup_context)
    return op


linear_affine = _register("linear_affine", _linear_affine, _fake_affine, 11)
linear_binary = _register("linear_binary", _linear_binary, _fake_binary, 9)
linear_nf4 = _register("linear_nf4", _linear_nf4, _fake_nf4, 9)
