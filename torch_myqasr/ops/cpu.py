"""CPU implementations of the ``myqasr::linear_*`` ops.

Paths (docs/formats.md has the table):

* intB (B = 1..8) with bfloat16 / float16 activations, N a multiple of 16 and a group size that
  is a multiple of 32: aten's int4 weight-pack kernel ``_weight_int4pack_mm_for_cpu``, which
  computes ``x @ ((q - 8) * s + z)^T`` per group for q in 0..15. Our codes map onto it exactly:
    - B <= 4: one call on ``q + c``, ``s' = s``, ``z' = (8 - c - zero) * s``;
    - int1:   one call on ``bit + 8``, ``s' = 2 s``, ``z' = -s``  (``(2 bit - 1) s``);
    - B = 5..8: two calls, high and low nibble:
      ``(hi + c - 8)(16 s) + (lo - 8) s + (136 - 16 c - zero) s``;
    with ``c`` a per-group integer that keeps ``|z'|`` small (bf16 precision) and codes in 0..15.
  The packed operands are built once per weight (`build_int4pack`, cached on the QuantizedWeight).
* Everything else (float32 activations, where aten's int4 kernel is 10-30x slower than a float32
  F.linear; nf4 and shapes the kernel does not take): dequantize + ``F.linear``, exact but it
  re-expands the whole weight on every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from triton_kernels import bitpack

if TYPE_CHECKING:
    from torch_myqasr.ops.qweight import QuantizedWeight

INT4PACK_DTYPES = (torch.bfloat16, torch.float16)
"""Activation dtypes for which the aten int4 weight-pack kernel is faster than float32 F.linear."""

_ATEN_GROUPS = (256, 128, 64, 32)


def _aten_group(group_size: int) -> Optional[int]:
    """Largest group size aten's int4 kernel accepts that divides ``group_size`` (scales repeat)."""
    for g in _ATEN_GROUPS:
        if group_size % g == 0:
            return g
    return None


def int4pack_eligible(qw: "QuantizedWeight") -> bool:
    """Whether ``qw`` can run on aten's int4 weight-pack CPU kernel (intB, N % 16 == 0, group % 32 == 0)."""
    return qw.fmt != "nf4" and qw.shape[0] % 16 == 0 and _aten_group(qw.group_size) is not None


def build_int4pack(qw: "QuantizedWeight") -> tuple[torch.Tensor, torch.Tensor]:
    """Operands of aten's int4 kernel for ``qw``: (packed uint8 [P, N, K_pad/2], scales_and_zeros
    float32 [P, K_pad / aten_group, N, 2]) with P = 1 call (B <= 4) or 2 (B = 5..8)."""
    g_aten = _aten_group(qw.group_size)
    if not int4pack_eligible(qw) or g_aten is None:
        raise ValueError(f"{qw} does not fit aten's int4 weight-pack kernel")
    repeat = qw.group_size // g_aten
    codes = qw.codes().to(torch.int32)  # [N, K_pad]
    scale = qw.scale_t.float().repeat_interleave(repeat, dim=0)  # [K_pad / g_aten, N]
    # The kernel adds z' = the float zero per group to (q' - 8) * s'. A large |z'| loses precision
    # when it is rounded to bf16/fp16 (it cancels against the other term), so every code is shifted
    # by a per-group integer c chosen to make |z'| small (<= s/2 for int2/int3, <= 8 s otherwise).
    per_k = lambda t: t.t().repeat_interleave(g_aten, dim=1)  # noqa: E731  [groups, N] -> [N, K_pad]
    if qw.fmt == "int1":
        # (2 bit - 1) s = (bit + 8 - 8) * 2s - s
        parts = [(codes + 8, 2.0 * scale, -scale)]
    else:
        zero = qw.zero_t.float().repeat_interleave(repeat, dim=0)
        if qw.bits <= 4:
            # (q - z) s = (q + c - 8) s + (8 - c - z) s,  0 <= q + c <= 15
            c = torch.round(8.0 - zero).clamp(0, 16 - 2**qw.bits)
            parts = [(codes + per_k(c).to(torch.int32), scale, (8.0 - c - zero) * scale)]
        else:
            # (16 hi + lo - z) s = (hi + c - 8) 16s + (lo - 8) s + (136 - 16 c - z) s
            c = torch.round((136.0 - zero) / 16.0).clamp(0, 16 - 2 ** (qw.bits - 4))
            parts = [
                ((codes >> 4) + per_k(c).to(torch.int32), 16.0 * scale, torch.zeros_like(scale)),
                (codes & 15, scale, (136.0 - 16.0 * c - zero) * scale),
            ]
    packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1) for c, _, _ in parts])
    scales_zeros = torch.stack([torch.stack([s, z], dim=-1) for _, s, z in parts]).contiguous()
    return packed, scales_zeros


def int4pack_linear(
    x: torch.Tensor,
    cpu_packed: torch.Tensor,
    cpu_scales_zeros: torch.Tensor,
    group_size: int,
    n: int,
    k: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x [..., k] @ W^T (+ bias)`` on aten's int4 weight-pack kernel; returns x.dtype [..., n]."""
    g_aten = _aten_group(group_size)
    k_pad = cpu_packed.shape[-1] * 2
    x2 = x.reshape(-1, k)
    if k_pad != k:  # the kernel reads K_pad columns; the padding weights meet zero activations
        x2 = F.pad(x2, (0, k_pad - k))
    x2 = x2.contiguous()
    y = None
    for i in range(cpu_packed.shape[0]):
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, cpu_packed[i], g_aten, cpu_scales_zeros[i].to(x.dtype)
        )
        y = part if y is None else y + part
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


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
