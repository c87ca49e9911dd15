"""``myqasr::embedding_packed``: a token-embedding lookup on packed low-bit weights.

An embedding table ``[V, D]`` is stored like any other `QuantizedWeight`: N = V rows (tokens), K = D
columns, packed as uint8 bit planes ``[K_pad * B / 8, V]`` with per-group ``scale_t`` / ``zero_t``
``[n_groups, V]``. Row ``v`` of the table is therefore **column** ``v`` of every packed tensor, so a
lookup gathers the columns of the requested ids (``index_select`` along dim 1), unpacks only those
and dequantizes them: the cost is ``O(len(ids) * D)``, never the whole table.

This is what lets Whisper's tied ``embed_tokens`` / ``proj_out`` weight exist once in memory after
lowering: the output projection runs ``myqasr::linear_affine`` and the lookup runs this op, both on
the same ``packed`` / ``scale_t`` / ``zero_t`` buffers.

The op is a plain ``torch.library.custom_op`` with a fake implementation; its body is ordinary
torch code, so the same implementation runs on CPU and CUDA tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from torch_myqasr.formats import padded_k
from torch_myqasr.ops.cpu import dequantize_packed
from torch_myqasr.ops.qweight import QuantizedWeight, format_bits
from triton_kernels import bitpack


def _check(
    indices: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
    fmt: str, group_size: int, n: int, k: int,
) -> None:
    bits = format_bits(fmt)  # raises a clear error for an unknown / unquantized format
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding indices must be int64 or int32, got {indices.dtype}")
    k_pad = padded_k(k, group_size)
    rows = bitpack.packed_rows(bits, k_pad)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, n):
        raise ValueError(
            f"packed must be uint8 [{rows}, {n}] for a {fmt} table of {n} rows x {k} columns "
            f"(group_size={group_size}), got {packed.dtype} {list(packed.shape)}"
        )
    n_groups = k_pad // group_size
    if scale.dtype != torch.float16 or tuple(scale.shape) != (n_groups, n):
        raise ValueError(
            f"scale must be float16 [{n_groups}, {n}] (QuantizedWeight.scale_t); double-quantized nf4 "
            f"tables are not supported by the lookup, got {scale.dtype} {list(scale.shape)}"
        )
    needs_zero = fmt.startswith("int") and fmt != "int1"
    if needs_zero and (zero is None or tuple(zero.shape) != (n_groups, n)):
        raise ValueError(f"format {fmt} needs zero float16 [{n_groups}, {n}] (QuantizedWeight.zero_t)")
    if not needs_zero and zero is not None:
        raise ValueError(f"format {fmt} has no zero point; pass zero=None")
    for t in (packed, scale):
        if t.device != indices.device:
            raise ValueError(f"indices are on {indices.device} but the table is on {t.device}; move one with .to()")


@torch.library.custom_op("myqasr::embedding_packed", mutates_args=())
def embedding_packed(
    indices: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    fmt: str,
    group_size: int,
    n: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``indices`` of a packed ``[n, k]`` table, dequantized: ``dtype [*indices.shape, k]``.

    Equal to ``F.embedding(indices, qw.dequantize(dtype))`` (dequantization in float32, then cast).

    Args:
        indices: int64 / int32 token ids, any shape, values in ``[0, n)``.
        packed: `QuantizedWeight.packed`, uint8 ``[K_pad * B / 8, n]``.
        scale: `QuantizedWeight.scale_t`, float16 ``[n_groups, n]``.
        zero: `QuantizedWeight.zero_t`, float16 ``[n_groups, n]`` for int2..int8, None for int1 / nf4.
        fmt: the table's format (``"int4"``, ...; not double-quantized nf4).
        group_size: weights per group along the embedding dimension.
        n: rows of the table (vocabulary size); k: embedding width (unpadded).
        dtype: dtype of the returned rows.
    """
    _check(indices, packed, scale, zero, fmt, group_size, n, k)
    flat = indices.reshape(-1).long()
    # Row v of the table is column v of each packed tensor: gather only the requested columns.
    sub_packed = packed.index_select(1, flat)
    sub_scale = scale.index_select(1, flat)
    sub_zero = None if zero is None else zero.index_select(1, flat)
    rows = dequantize_packed(fmt, sub_packed, sub_scale, sub_zero, None, None, group_size, flat.numel(), k)
    return rows.to(dtype).reshape(*indices.shape, k)


@embedding_packed.register_fake
def _(indices, packed, scale, zero, fmt, group_size, n, k, dtype):
    _check(indices, packed, scale, zero, fmt, group_size, n, k)
    return indices.new_empty((*indices.shape, k), dtype=dtype)


def quantized_embedding(
    indices: torch.Tensor, qw: QuantizedWeight, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``F.embedding(indices, qw.dequantize(dtype))`` without dequantizing the whole table.

    Args:
        indices: int64 / int32 ids, any shape.
        qw: the table as a `QuantizedWeight` [vocab, dim] (not double-quantized nf4).
        dtype: dtype of the returned rows.
    Returns:
        ``dtype [*indices.shape, dim]``.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    if qw.double_quant:
        raise ValueError("the packed lookup does not support double-quantized nf4 tables; quantize without double_quant")
    n, k = qw.shape
    return embedding_packed(indices, qw.packed, qw.scale_t, qw.zero_t, qw.fmt, qw.group_size, n, k, dtype)


__all__ = ["embedding_packed", "quantized_embedding"]
