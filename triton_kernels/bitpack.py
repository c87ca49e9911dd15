"""Dense bit packing of low-bit weight codes: the one place that knows the byte layout.

Pure torch (no Triton import), so packing works on any machine and in any process.

Layout (docs/formats.md has pictures):

* Codes are unsigned, ``B`` bits each, for a weight of ``N`` rows (out_features) and ``K_pad``
  columns (in_features padded to a multiple of the group size).
* A ``B``-bit code is split into *bit planes* whose widths are powers of two, most significant
  first: 8 -> (8), 7 -> (4, 2, 1), 6 -> (4, 2), 5 -> (4, 1), 4 -> (4), 3 -> (2, 1), 2 -> (2),
  1 -> (1). Every plane packs ``8 // b`` values per byte, so no bit is wasted for any ``B`` and a
  kernel unpacks each plane with one shift and one mask (no value ever straddles a byte).
* A plane of ``b`` bits is a ``uint8`` matrix ``[K_pad * b // 8, N]`` (N contiguous, so a tile
  load along N is coalesced). Byte ``[r, n]`` holds the codes of column ``n`` at
  ``k = r * (8 // b) + j`` for ``j = 0 .. 8 // b - 1``, code ``j`` in bits ``[j*b, (j+1)*b)``
  (little end first).
* The planes are stacked along dim 0, most significant first, into one ``uint8`` tensor
  ``[K_pad * B // 8, N]``. Its size is exactly ``N * K_pad * B / 8`` bytes.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982251167297,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NormalFloat-4 levels of QLoRA (bitsandbytes' table), index = 4-bit code."""

DOUBLE_QUANT_BLOCK = 256
"""Scales per double-quantization chunk (matches torch_myqasr.formats.NF4_DOUBLE_QUANT_BLOCK)."""


def plane_bits(bits: int) -> tuple[int, ...]:
    """Widths (in bits) of the bit planes a ``bits``-bit code is stored in, most significant first."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    planes = []
    remaining = bits
    for width in (8, 4, 2, 1):
        if remaining >= width:
            planes.append(width)
            remaining -= width
    return tuple(planes)


def plane_shifts(bits: int) -> tuple[int, ...]:
    """Left shift of each plane's value inside the full code (same order as `plane_bits`)."""
    shifts, used = [], 0
    for width in plane_bits(bits):
        used += width
        shifts.append(bits - used)
    return tuple(shifts)


def packed_rows(bits: int, k_pad: int) -> int:
    """Rows of the packed ``uint8`` tensor for codes of ``bits`` bits and padded width ``k_pad``.

    Raises a ValueError when a plane would not fill whole bytes (``k_pad`` must be a multiple of
    ``8 // b`` for every plane width ``b``; any group size that is a multiple of 8 satisfies this).
    """
    rows = 0
    for width in plane_bits(bits):
        per_byte = 8 // width
        if k_pad % per_byte:
            raise ValueError(
                f"padded K={k_pad} is not a multiple of {per_byte}, so the {width}-bit plane of a "
                f"{bits}-bit code would not fill whole bytes; use a group_size that is a multiple of 8"
            )
        rows += k_pad // per_byte
    return rows


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (integer [N, K_pad], values in [0, 2**bits - 1]) into ``uint8`` [K_pad*bits/8, N].

    The result holds exactly N * K_pad * bits / 8 bytes (see the module docstring for the layout).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K_pad], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    n, k_pad = codes.shape
    packed_rows(bits, k_pad)  # validates byte alignment of every plane
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ValueError(
            f"codes out of range for {bits} bits: min {int(codes.min())}, max {int(codes.max())}, "
            f"allowed 0..{2**bits - 1}"
        )
    # int32 working copy, K first so that consecutive k of one column share a byte.
    codes_t = codes.to(torch.int32).t().contiguous()  # [K_pad, N]
    planes = []
    for width, shift in zip(plane_bits(bits), plane_shifts(bits)):
        per_byte = 8 // width
        values = (codes_t >> shift) & ((1 << width) - 1)
        values = values.view(k_pad // per_byte, per_byte, n)
        byte = torch.zeros(k_pad // per_byte, n, dtype=torch.int32, device=codes.device)
        for j in range(per_byte):
            byte |= values[:, j, :] << (j * width)
        planes.append(byte.to(torch.uint8))
    return torch.cat(planes, dim=0).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """Inverse of `pack_codes`: ``uint8`` [K_pad*bits/8, N] -> ``uint8`` codes [N, K_pad]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows = packed_rows(bits, k_pad)
    if packed.shape[0] != rows:
        raise ValueError(
            f"packed has {packed.shape[0]} rows but {bits}-bit codes of padded K={k_pad} need {rows}"
        )
    n = packed.shape[1]
    codes_t = torch.zeros(k_pad, n, dtype=torch.int32, device=packed.device)
    row = 0
    for width, shift in zip(plane_bits(bits), plane_shifts(bits)):
        per_byte = 8 // width
        plane = packed[row : row + k_pad // per_byte].to(torch.int32)
        row += k_pad // per_byte
        mask = (1 << width) - 1
        # [K_pad/per, per, N] -> [K_pad, N]: value j of byte r is k = r*per + j.
        values = torch.stack([(plane >> (j * width)) & mask for j in range(per_byte)], dim=1)
        codes_t |= values.reshape(k_pad, n) << shift
    return codes_t.t().contiguous().to(torch.uint8)


def double_quantize(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize NF4 absmax scales to 8 bits: ``scale ~= code * dq_scale[c] + dq_offset[c]``.

    ``scales`` is any-shaped and float; chunks are `DOUBLE_QUANT_BLOCK` consecutive values of its
    row-major flattening. Returns ``(codes uint8 same shape, dq_scale float32 [C], dq_offset float32
    [C])`` with ``C = ceil(numel / 256)``; min/max affine per chunk, so the error is at most half a
    step of (max - min) / 255 of that chunk.
    """
    flat = scales.reshape(-1).to(torch.float32)
    n = flat.numel()
    chunks = -(-n // DOUBLE_QUANT_BLOCK)
    padded = torch.nn.functional.pad(flat, (0, chunks * DOUBLE_QUANT_BLOCK - n))
    blocks = padded.view(chunks, DOUBLE_QUANT_BLOCK)
    # The zero padding must not widen the last chunk's range, so take min/max over real values.
    valid = (torch.arange(chunks * DOUBLE_QUANT_BLOCK, device=flat.device) < n).view_as(blocks)
    lo = torch.where(valid, blocks, torch.inf).amin(dim=1)
    hi = torch.where(valid, blocks, -torch.inf).amax(dim=1)
    step = (hi - lo) / 255.0
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant chunk: any step is exact
    codes = torch.round((blocks - lo[:, None]) / step[:, None]).clamp(0, 255)
    codes = codes.reshape(-1)[:n].to(torch.uint8).view(scales.shape)
    return codes, step.contiguous(), lo.contiguous()


def double_dequantize(codes: torch.Tensor, dq_scale: torch.Tensor, dq_offset: torch.Tensor) -> torch.Tensor:
    """Inverse of `double_quantize`: float32 scales of ``codes``' shape."""
    flat = codes.reshape(-1).to(torch.float32)
    chunk = torch.arange(flat.numel(), device=codes.device) // DOUBLE_QUANT_BLOCK
    return (flat * dq_scale[chunk] + dq_offset[chunk]).view(codes.shape)
