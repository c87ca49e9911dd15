"""CPU implementations of the ``myqasr::linear_*`` ops.

Paths (docs/formats.md has the table):

* intB (B = 1..8) with bfloat16 / float16 activations and a group size that is a multiple of 32
  (N is padded to a multiple of 16 with zero rows): aten's int4 weight-pack kernel ``_weight_int4pack_mm_for_cpu``, which
  computes ``x @ ((q - 8) * s + z)^T`` per group for q in 0..15. Our codes map onto it exactly:
    - B <= 4: one call on ``q + c``, ``s' = s``, ``z' = (8 - c - zero) * s``;
    - int1:   one call on ``bit + 8``, ``s' = 2 s``, ``z' = -s``  (``(2 bit - 1) s``);
    - B = 5..8: two calls, high and low nibble:
      ``(hi + c - 8)(16 s) + (lo - 8) s + (136 - 16 c - zero) s``;
    with ``c`` a per-group integer that keeps ``|z'|`` small (bf16 precision) and codes in 0..15.
  The packed operands are built once per weight (`build_int4pack`): cached on the QuantizedWeight
  for `quantized_linear`, or held *instead of* the bit planes by a lowered module on CPU
  (`torch_myqasr.lowering.use_cpu_kernels`, ops ``myqasr::linear_int4pack`` / ``embedding_int4pack``).
* Everything else (float32 activations, where aten's int4 kernel is 10-30x slower than a float32
  F.linear; nf4 and shapes the kernel does not take): dequantize + ``F.linear``, exact but it
  re-expands the whole weight on every call.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from triton_kernels import bitpack

if TYPE_CHECKING:
    from torch_myqasr.ops.qweight import QuantizedWeight

INT4PACK_DTYPES = (torch.bfloat16, torch.float16)
"""Activation dtypes for which the aten int4 weight-pack kernel is faster than float32 F.linear."""

_ATEN_GROUPS = (256, 128, 64, 32)
_N_ALIGN = 16  # aten's int4 weight-pack kernel takes N % 16 == 0


def _aten_group(group_size: int) -> Optional[int]:
    """Largest group size aten's int4 kernel accepts that divides ``group_size`` (scales repeat)."""
    for g in _ATEN_GROUPS:
        if group_size % g == 0:
            return g
    return None


def int4pack_eligible(qw: "QuantizedWeight") -> bool:
    """Whether ``qw`` can run on aten's int4 weight-pack CPU kernel (intB or int1, group % 32 == 0).

    Any N works: `build_int4pack` pads N to a multiple of 16 (the kernel's requirement) with zero rows.
    """
    return qw.fmt != "nf4" and _aten_group(qw.group_size) is not None


def int4pack_parts(fmt: str) -> int:
    """Nibble planes aten's kernel needs for ``fmt``: 1 (int1..int4) or 2 (int5..int8, high and low nibble)."""
    return 2 if fmt != "int1" and int(fmt[3:]) > 4 else 1


def build_int4pack(qw: "QuantizedWeight", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands of aten's int4 kernel for ``qw``: ``(packed, scales_zeros)``.

    ``packed`` is uint8 ``[P, N16, K_pad / 2]`` in aten's own layout (P = `int4pack_parts`, N16 = N
    rounded up to a multiple of 16, the extra rows zero); ``scales_zeros`` is ``dtype [K_pad /
    aten_group, N16, 2]``, the (scale, zero) of the last plane. With P = 2 the high plane's are
    (16 * scale, 0), derived per call, so an int8 weight costs exactly its portable bytes in bfloat16.
    """
    g_aten = _aten_group(qw.group_size)
    if not int4pack_eligible(qw) or g_aten is None:
        raise ValueError(f"{qw} does not fit aten's int4 weight-pack kernel (nf4, or a group size that is not a multiple of 32)")
    n = qw.shape[0]
    n16 = -(-n // _N_ALIGN) * _N_ALIGN
    repeat = qw.group_size // g_aten
    pad_rows = lambda t: F.pad(t, (0, n16 - n))  # noqa: E731  [.., N] -> [.., N16], zero codes and scales
    codes = F.pad(qw.codes().to(torch.int32), (0, 0, 0, n16 - n))  # [N16, K_pad]
    scale = pad_rows(qw.scale_t.float()).repeat_interleave(repeat, dim=0)  # [K_pad / g_aten, N16]
    # The kernel adds z' = the float zero per group to (q' - 8) * s'. A large |z'| loses precision
    # when it is rounded to bf16/fp16 (it cancels against the other term), so every code is shifted
    # by a per-group integer c chosen to make |z'| small (<= s/2 for int2/int3, <= 8 s otherwise).
    per_k = lambda t: t.t().repeat_interleave(g_aten, dim=1).to(torch.int32)  # noqa: E731  [groups, N] -> [N, K_pad]
    if qw.fmt == "int1":
        # (2 bit - 1) s = (bit + 8 - 8) * 2s - s
        planes, s, z = [codes + 8], 2.0 * scale, -scale
    else:
        zero = pad_rows(qw.zero_t.float()).repeat_interleave(repeat, dim=0)
        if qw.bits <= 4:
            # (q - z) s = (q + c - 8) s + (8 - c - z) s,  0 <= q + c <= 15
            c = torch.round(8.0 - zero).clamp(0, 16 - 2**qw.bits)
            planes, s, z = [codes + per_k(c)], scale, (8.0 - c - zero) * scale
        else:
            # (16 hi + lo - z) s = (hi + c - 8) 16s + (lo - 8) s + (136 - 16 c - z) s
            c = torch.round((136.0 - zero) / 16.0).clamp(0, 16 - 2 ** (qw.bits - 4))
            planes, s, z = [(codes >> 4) + per_k(c), codes & 15], scale, (136.0 - 16.0 * c - zero) * scale
    packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(p, 1) for p in planes])
    return packed, torch.stack([s, z], dim=-1).to(dtype).contiguous()


def _plane_scales_zeros(scales_zeros: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """(scale, zero) per plane: the stored pair for the last; (16 * scale, 0) for the high nibble."""
    if parts == 1:
        return [scales_zeros]
    high = torch.stack([16.0 * scales_zeros[..., 0], torch.zeros_like(scales_zeros[..., 1])], dim=-1)
    return [high, scales_zeros]


def int4pack_linear(
    x: torch.Tensor,
    cpu_packed: torch.Tensor,
    cpu_scales_zeros: torch.Tensor,
    group_size: int,
    n: int,
    k: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x [..., k] @ W^T (+ bias)`` on aten's int4 weight-pack kernel; returns x.dtype [..., n].

    ``x`` must be bfloat16 or float16 (aten's kernel is slow for float32); the operands come from
    `build_int4pack`.
    """
    g_aten = _aten_group(group_size)
    k_pad = cpu_packed.shape[-1] * 2
    x2 = x.reshape(-1, k)
    if k_pad != k:  # the kernel reads K_pad columns; the padding weights meet zero activations
        x2 = F.pad(x2, (0, k_pad - k))
    x2 = x2.contiguous()
    y = None
    for plane, sz in zip(cpu_packed, _plane_scales_zeros(cpu_scales_zeros, cpu_packed.shape[0])):
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, plane, g_aten, sz.to(x.dtype))
        y = part if y is None else y + part
    if y.shape[-1] != n:  # rows padded to a multiple of 16
        y = y[:, :n].contiguous()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


_BLOCK_N = 32  # aten's CPU int4 layout: blocks of 32 output rows (a last block may hold 16)


def int4pack_rows(
    cpu_packed: torch.Tensor, cpu_scales_zeros: torch.Tensor, indices: torch.Tensor, group_size: int, k: int
) -> torch.Tensor:
    """Rows ``indices`` (1-D) of the float32 weight held as `build_int4pack` operands: ``[len, k]``.

    Reads only the requested rows' bytes. aten's layout (``_convert_weight_to_int4pack_for_cpu``,
    innerKTiles=1, torch 2.11-2.13): rows in blocks of 32; for each k a block holds 16 bytes, byte j
    = (row j low nibble, row j + 16 high nibble); a last block of 16 rows holds 8 bytes per k, byte j
    = (row 2j, row 2j + 1). `check_int4pack_layout` verifies this against the running torch.
    """
    parts, n16, half = cpu_packed.shape
    g_aten = _aten_group(group_size)
    ids = indices.long()
    b0 = torch.div(ids, _BLOCK_N, rounding_mode="floor") * _BLOCK_N
    j = ids - b0
    full = (n16 - b0) >= _BLOCK_N
    stride = torch.where(full, 16, 8)
    col = torch.where(full, j % 16, j // 2)
    shift = 4 * torch.where(full, j // 16, j % 2)
    kk = torch.arange(2 * half, device=ids.device)
    offset = (b0 * half + col)[:, None] + kk[None, :] * stride[:, None]  # [L, K_pad] byte positions
    codes = (cpu_packed.reshape(parts, -1)[:, offset] >> shift[None, :, None]) & 15  # [P, L, K_pad]
    return _weight_of_codes(codes, cpu_scales_zeros[:, ids], g_aten, k)


def int4pack_dequantize(cpu_packed: torch.Tensor, cpu_scales_zeros: torch.Tensor, group_size: int, n: int, k: int) -> torch.Tensor:
    """The whole float32 ``[n, k]`` weight held as `build_int4pack` operands (aten's layout, see `int4pack_rows`)."""
    parts, n16, half = cpu_packed.shape
    k_pad, g_aten = 2 * half, _aten_group(group_size)
    flat = cpu_packed.reshape(parts, -1)
    n_full = n16 // _BLOCK_N * _BLOCK_N
    # full blocks: [block, k, byte j] with byte j = (row j, row j + 16)
    full = flat[:, : n_full * half].reshape(parts, n_full // _BLOCK_N, k_pad, 16)
    codes = torch.stack([full & 15, full >> 4], dim=2)  # [P, block, nibble, k, j]: row = 16 * nibble + j
    codes = codes.permute(0, 1, 2, 4, 3).reshape(parts, n_full, k_pad)
    if n16 > n_full:  # a last block of 16 rows: [k, byte j] with byte j = (row 2j, row 2j + 1)
        tail = flat[:, n_full * half :].reshape(parts, k_pad, 8)
        tail = torch.stack([tail & 15, tail >> 4], dim=-1).reshape(parts, k_pad, 16).transpose(1, 2)
        codes = torch.cat([codes, tail], dim=1)
    return _weight_of_codes(codes[:, :n], cpu_scales_zeros[:, :n], g_aten, k)


def _weight_of_codes(codes: torch.Tensor, scales_zeros: torch.Tensor, g_aten: int, k: int) -> torch.Tensor:
    """float32 ``[R, k]`` rows from nibble codes ``[P, R, K_pad]`` and their ``[groups, R, 2]`` (scale, zero)."""
    w = None
    for plane, sz in zip(codes, _plane_scales_zeros(scales_zeros.float(), codes.shape[0])):
        s = sz[..., 0].t().repeat_interleave(g_aten, dim=1)  # [R, K_pad]
        z = sz[..., 1].t().repeat_interleave(g_aten, dim=1)
        part = (plane.float() - 8.0) * s + z
        w = part if w is None else w + part
    return w[:, :k].contiguous()


@functools.lru_cache(maxsize=None)
def check_int4pack_layout() -> bool:
    """Whether `int4pack_rows` and `int4pack_dequantize` read this torch's int4 CPU layout correctly.

    A 48-row probe (a full block of 32 and a last block of 16), once per process.
    """
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 64), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)[None]
    ones = torch.stack([torch.ones(2, 48), torch.full((2, 48), 8.0)], dim=-1)  # w = (q - 8) + 8 = q
    rows = int4pack_rows(packed, ones, torch.arange(48), 32, 64)
    whole = int4pack_dequantize(packed, ones, 32, 48, 64)
    return torch.equal(rows, codes.float()) and torch.equal(whole, codes.float())


def dequantize_packed(
    fmt: str,
    packed: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: Optional[torch.Tensor],
    dq_scale: Optional[torch.Tensor],
    dq_offset: Optional[torch.Tensor],
    group_size: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """The float32 [n, k] weight of packed tensors in format ``fmt`` (reference semantics)."""
    bits = 4 if fmt == "nf4" else int(fmt[3:])
    k_pad = scale_t.shape[0] * group_size
    q = bitpack.unpack_codes(packed, bits, k_pad).float()
    if dq_scale is not None:
        scale = bitpack.double_dequantize(scale_t, dq_scale, dq_offset)
    else:
        scale = scale_t.float()
    scale = scale.t().repeat_interleave(group_size, dim=1)
    if fmt == "nf4":
        table = torch.tensor(bitpack.NF4_CODEBOOK, dtype=torch.float32, device=q.device)
        w = table[q.long()] * scale
    elif fmt == "int1":
        w = (2.0 * q - 1.0) * scale
    else:
        w = (q - zero_t.float().t().repeat_interleave(group_size, dim=1)) * scale
    return w[:, :k].contiguous()


def fallback_linear(
    x: torch.Tensor, fmt: str, packed: torch.Tensor, scale_t: torch.Tensor, zero_t: Optional[torch.Tensor],
    dq_scale: Optional[torch.Tensor], dq_offset: Optional[torch.Tensor], group_size: int, n: int, k: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Dequantize the whole weight, then ``F.linear`` in x.dtype (any device; exact, not fast)."""
    w = dequantize_packed(fmt, packed, scale_t, zero_t, dq_scale, dq_offset, group_size, n, k)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
