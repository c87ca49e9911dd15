"""Weight formats and their exact sizes: the one place that says how many bytes a format costs.

Everything that counts memory (the bit allocator, the scheme file, `QuantizedWeight.nbytes`, the
lowering's size check) calls `weight_nbytes`, so the budget the allocator honours is the memory the
packed kernels really use.

Conventions (docs/formats.md has the byte layouts):
- Weights are [N, K] (out_features, in_features), grouped along K in groups of `group_size`.
  K is padded with zeros up to a multiple of the group size; the padding is stored and counted.
- ``intB`` (B = 2..8): asymmetric, ``w = (q - zero) * scale`` with ``q`` in ``[0, 2**B - 1]`` and a
  float16 ``scale`` and float16 ``zero`` per group (the GemLite / HQQ convention; the zero point is
  a float in quantized units, so it costs 2 bytes and needs no rounding).
- ``int1``: binary, ``w = scale * (+1 or -1)`` from one sign bit, float16 ``scale`` per group.
- ``nf4``: 4-bit NormalFloat codebook index, float16 absmax ``scale`` per block (QLoRA; blocks
  of 64 by default). With ``double_quant`` the absmax scales are themselves stored as int8 codes
  with one float32 scale and one float32 offset per 256 blocks.
- ``fp16`` / ``bf16`` / ``fp32``: unquantized, for layers kept at higher precision.

Sizes are in bytes; `MIB` converts to MiB (2**20 bytes), the unit budgets are given in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 2**20
"""Bytes in one MiB. Budgets ("20MB" on the command line) are MiB: 2**20 bytes."""

NF4_DOUBLE_QUANT_BLOCK = 256
"""Number of NF4 absmax scales that share one float32 scale and offset under double quantization."""


@dataclass(frozen=True)
class WeightFormat:
    """A storage format for a weight matrix.

    Attributes:
        name: the format's name, e.g. ``"int4"``.
        bits: bits stored per weight value (16 / 32 for unquantized formats).
        grouped: whether the format has per-group metadata along K.
        metadata_bytes_per_group: bytes of scale / zero point stored per group.
    """

    name: str
    bits: int
    grouped: bool
    metadata_bytes_per_group: int


def _int_format(bits: int) -> WeightFormat:
    return WeightFormat(f"int{bits}", bits, grouped=True, metadata_bytes_per_group=4)


FORMATS: dict[str, WeightFormat] = {
    **{f"int{b}": _int_format(b) for b in (8, 7, 6, 5, 4, 3, 2)},
    "int1": WeightFormat("int1", 1, grouped=True, metadata_bytes_per_group=2),
    "nf4": WeightFormat("nf4", 4, grouped=True, metadata_bytes_per_group=2),
    "fp16": WeightFormat("fp16", 16, grouped=False, metadata_bytes_per_group=0),
    "bf16": WeightFormat("bf16", 16, grouped=False, metadata_bytes_per_group=0),
    "fp32": WeightFormat("fp32", 32, grouped=False, metadata_bytes_per_group=0),
}
"""Every format the project knows, by name."""

QUANTIZED_FORMATS = tuple(name for name, f in FORMATS.items() if f.grouped)


def get_format(name: str) -> WeightFormat:
    """Return the `WeightFormat` called ``name``; a clear error lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown weight format {name!r}; known formats: {', '.join(FORMATS)}"
        ) from None


def format_for_bits(bits: int) -> str:
    """Name of the integer format with ``bits`` bits per weight (1 -> int1, 16 -> fp16, 32 -> fp32)."""
    if bits == 16:
        return "fp16"
    if bits == 32:
        return "fp32"
    name = f"int{bits}"
    get_format(name)
    return name


def padded_k(in_features: int, group_size: int) -> int:
    """K rounded up to a multiple of ``group_size`` (the stored width of each row)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return math.ceil(in_features / group_size) * group_size


def weight_nbytes(
    fmt: str,
    out_features: int,
    in_features: int,
    group_size: int = 64,
    *,
    double_quant: bool = False,
) -> int:
    """Exact bytes a [out_features, in_features] weight takes in format ``fmt``.

    Counts the packed values (K padded to a multiple of ``group_size``), scales and zero points.
    ``double_quant`` applies to ``nf4`` only (int8 absmax codes plus float32 scale and offset per
    `NF4_DOUBLE_QUANT_BLOCK` blocks). Biases are not included: they stay in full precision and are
    counted by the caller with `float_nbytes`.
    """
    f = get_format(fmt)
    if not f.grouped:
        return out_features * in_features * f.bits // 8
    k = padded_k(in_features, group_size)
    n_groups = out_features * (k // group_size)
    data = math.ceil(out_features * k * f.bits / 8)
    if fmt == "nf4" and double_quant:
        meta = n_groups + 8 * math.ceil(n_groups / NF4_DOUBLE_QUANT_BLOCK)
    elif double_quant:
        raise ValueError(f"double_quant applies to nf4 only, not {fmt}")
    else:
        meta = n_groups * f.metadata_bytes_per_group
    return data + meta


def float_nbytes(numel: int, dtype_bits: int = 32) -> int:
    """Bytes of ``numel`` unquantized values of ``dtype_bits`` bits (biases, norms, positions)."""
    return numel * dtype_bits // 8


def bits_per_weight(fmt: str, group_size: int = 64) -> float:
    """Average storage cost of one weight in bits, scales included (large-matrix limit)."""
    f = get_format(fmt)
    if not f.grouped:
        return float(f.bits)
    return f.bits + 8 * f.metadata_bytes_per_group / group_size
