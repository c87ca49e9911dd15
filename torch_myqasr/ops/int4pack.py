"""``myqasr::linear_int4pack`` / ``myqasr::embedding_int4pack``: ops on the CPU-resident weight layout.

A lowered module deployed on CPU (`torch_myqasr.lowering.use_cpu_kernels`) holds each eligible
weight in aten's int4 weight-pack layout *instead of* the portable bit planes (`cpu.build_int4pack`:
``packed`` uint8 ``[P, N16, K_pad / 2]``, ``scales_zeros`` ``[K_pad / g, N16, 2]`` in the compute
dtype). These two ops read that layout:

* ``linear_int4pack(x, packed, scales_zeros, group_size, n, k, bias)``: ``x @ W^T + bias`` computed in
  ``scales_zeros.dtype`` (bfloat16: aten's fast CPU kernel) and returned in ``x.dtype``, so the
  float32 graph around it stays as it was exported;
* ``embedding_int4pack(indices, packed, scales_zeros, group_size, n, k, dtype)``: the rows of the same
  table, so a tied embedding / output projection is held once.

Both are defined as ``CompositeImplicitAutograd``: their bodies are plain aten calls, so
``torch.compile`` traces *into* them and inductor calls ``_weight_int4pack_mm_for_cpu`` directly,
fused with the casts and bias around it. A ``custom_op`` stays an opaque Python call instead, and on
Whisper's 384-wide layers that call costs several times the matmul itself (benchmarks/bench_e2e.py
measures the deployed model, compiled and eager). They are CPU-only: the layout is aten's
CPU one. No artifact stores them: a program in this layout is only ever built at load time, or
compiled into an AOTInductor package where the composite is already decomposed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from torch_myqasr.ops import cpu

KERNEL_MAX_ROWS = 64
"""Rows of x (tokens x batch) up to which ``linear_int4pack`` runs aten's int4 kernel.

Above it the weight is dequantized once per call to x's dtype and multiplied with ``F.linear``:
aten's bfloat16 int4 kernel is memory-bound-fast for decoding (a few rows) but much slower than
float32 GEMM for the encoder's 1500 rows (crossover near 64-256 rows on the 2-core AMD EPYC of
this workplace, 1536 x 384 weight, int4 and int8). The dequantized weight is transient, one layer at a time.
"""


def _check(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, n: int, k: int, device: torch.device) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[1] < n or packed.shape[1] % 16:
        raise ValueError(f"packed must be uint8 [P, N16 >= n={n}, K_pad / 2] from build_int4pack, got {packed.dtype} {list(packed.shape)}")
    if packed.shape[2] * 2 < k:
        raise ValueError(f"packed holds {packed.shape[2] * 2} input features but k={k}")
    if scales_zeros.dim() != 3 or scales_zeros.shape[1:] != (packed.shape[1], 2):
        raise ValueError(f"scales_zeros must be [groups, {packed.shape[1]}, 2], got {list(scales_zeros.shape)}")
    if cpu._aten_group(group_size) is None:
        raise ValueError(f"group_size {group_size} is not a multiple of 32 (aten's int4 CPU kernel)")
    if device.type != "cpu" and device.type != "meta":
        raise ValueError(f"the int4pack ops run on CPU only, got tensors on {device}; load the portable artifact on GPUs")


_lib = torch.library.Library("myqasr", "FRAGMENT")
_lib.define("linear_int4pack(Tensor x, Tensor packed, Tensor scales_zeros, int group_size, int n, int k, Tensor? bias=None) -> Tensor")
_lib.define("embedding_int4pack(Tensor indices, Tensor packed, Tensor scales_zeros, int group_size, int n, int k, ScalarType dtype) -> Tensor")


def linear_int4pack(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, n: int, k: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x [..., k] @ W^T (+ bias)`` for W held as `cpu.build_int4pack` operands; returns ``x.dtype [..., n]``.

    Up to `KERNEL_MAX_ROWS` rows the matmul runs on aten's int4 kernel with activations in
    ``scales_zeros.dtype`` (bfloat16 or float16); above it on the dequantized weight in ``x.dtype``.
    """
    _check(packed, scales_zeros, group_size, n, k, x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight expects k={k}")
    if x.numel() > KERNEL_MAX_ROWS * k:
        w = int4pack_dequantize(packed, scales_zeros, group_size, n, k)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    y = cpu.int4pack_linear(x.to(scales_zeros.dtype), packed, scales_zeros, group_size, n, k, bias)
    return y.to(x.dtype)


def embedding_int4pack(
    indices: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, n: int, k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``indices`` of the ``[n, k]`` table held as `cpu.build_int4pack` operands: ``dtype [*indices.shape, k]``.

    Reads only the requested rows' bytes (`cpu.int4pack_rows`); cost grows with ``indices.numel()``.
    """
    _check(packed, scales_zeros, group_size, n, k, indices.device)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding indices must be int64 or int32, got {indices.dtype}")
    flat = indices.reshape(-1)
    rows = cpu.int4pack_rows(packed, scales_zeros, flat, group_size, k)
    return rows.to(dtype).reshape(*indices.shape, k)


@torch.library.custom_op("myqasr::int4pack_dequantize", mutates_args=())
def int4pack_dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, n: int, k: int) -> torch.Tensor:
    """The float32 ``[n, k]`` weight of `cpu.build_int4pack` operands (`cpu.int4pack_dequantize`).

    An opaque op on purpose: traced into, inductor fuses the unpacking into a GEMM of its own that
    is slower than the MKL ``F.linear`` this feeds (the encoder went 3x slower compiled than eager).
    """
    _check(packed, scales_zeros, group_size, n, k, packed.device)
    return cpu.int4pack_dequantize(packed, scales_zeros, group_size, n, k)


@int4pack_dequantize.register_fake
def _(packed, scales_zeros, group_size, n, k):
    _check(packed, scales_zeros, group_size, n, k, torch.device("meta"))
    return packed.new_empty((n, k), dtype=torch.float32)


_lib.impl("linear_int4pack", linear_int4pack, "CompositeImplicitAutograd")
_lib.impl("embedding_int4pack", embedding_int4pack, "CompositeImplicitAutograd")


__all__ = ["KERNEL_MAX_ROWS", "embedding_int4pack", "int4pack_dequantize", "linear_int4pack"]
