"""`QuantizedWeight`: a weight matrix stored in one of the low-bit formats, and `quantize_weight`.

The packed tensors follow triton_kernels/bitpack.py and docs/formats.md; their size is exactly
`torch_myqasr.formats.weight_nbytes` (tested). Quantization conventions come from
torch_myqasr/formats.py:

* ``intB`` (B = 2..8): ``w = (q - zero) * scale``, ``q`` in ``[0, 2**B - 1]``, float16 scale and
  float16 zero (in quantized units) per group of ``group_size`` along K.
* ``int1``: ``w = scale * (+1 if bit else -1)``, float16 scale per group.
* ``nf4``: ``w = NF4_CODEBOOK[q] * absmax``, float16 absmax per block; with ``double_quant`` the
  absmax values are uint8 codes with a float32 scale and offset per 256 blocks.

Internally scales / zeros are stored transposed, ``[n_groups, N]`` (N contiguous, what the
kernels load); the public accessors and `from_codes` use ``[N, n_groups]``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from torch_myqasr.formats import QUANTIZED_FORMATS, get_format, padded_k, weight_nbytes
from triton_kernels import bitpack

SUPPORTED_FORMATS = tuple(f for f in QUANTIZED_FORMATS)
"""Formats `quantize_weight` and `QuantizedWeight` accept: int8 .. int1 and nf4."""

_FP16_MAX = 65504.0


def _check_format(fmt: str) -> None:
    if fmt not in SUPPORTED_FORMATS:
        get_format(fmt)  # unknown name: raises the formats module's error listing every name
        raise ValueError(
            f"format {fmt!r} is unquantized; QuantizedWeight holds one of {', '.join(SUPPORTED_FORMATS)}"
        )


def format_bits(fmt: str) -> int:
    """Bits per stored code of quantized format ``fmt`` (nf4 -> 4)."""
    _check_format(fmt)
    return get_format(fmt).bits


def _check_fp16_range(t: torch.Tensor, what: str) -> None:
    if t.numel() and float(t.abs().max()) > _FP16_MAX:
        raise ValueError(
            f"{what} exceed the float16 range ({float(t.abs().max()):.3g} > {_FP16_MAX}); the format "
            f"stores them in float16: rescale the weight or keep this layer in full precision"
        )


class QuantizedWeight:
    """A [N, K] weight in a low-bit format: packed codes plus per-group scales (and zero points).

    Build one with `quantize_weight` (round to nearest) or `QuantizedWeight.from_codes` (codes and
    scales chosen elsewhere, e.g. by the PT2E quantizer). Attributes (read-only by convention):

    * ``fmt`` (str), ``group_size`` (int, weights per group along K), ``shape`` ((N, K), the
      unpadded shape), ``k_pad`` (K rounded up to a multiple of group_size), ``bits``.
    * ``packed``: uint8 [k_pad * bits / 8, N] (bitpack layout).
    * ``scale_t``: float16 [n_groups, N] (nf4 with double quant: uint8 codes of the absmax).
    * ``zero_t``: float16 [n_groups, N] for intB (B >= 2), else None.
    * ``dq_scale`` / ``dq_offset``: float32 [ceil(N * n_groups / 256)] (nf4 double quant), else None.
    """

    def __init__(
        self,
        *,
        fmt: str,
        group_size: int,
        shape: tuple[int, int],
        packed: torch.Tensor,
        scale_t: torch.Tensor,
        zero_t: Optional[torch.Tensor] = None,
        dq_scale: Optional[torch.Tensor] = None,
        dq_offset: Optional[torch.Tensor] = None,
    ) -> None:
        _check_format(fmt)
        n, k = int(shape[0]), int(shape[1])
        self.fmt = fmt
        self.group_size = int(group_size)
        self.shape = (n, k)
        self.k_pad = padded_k(k, self.group_size)
        self.bits = get_format(fmt).bits
        n_groups = self.k_pad // self.group_size
        rows = bitpack.packed_rows(self.bits, self.k_pad)
        _expect(packed, (rows, n), torch.uint8, "packed")
        self.double_quant = dq_scale is not None
        _expect(scale_t, (n_groups, n), torch.uint8 if self.double_quant else torch.float16, "scale_t")
        if fmt.startswith("int") and fmt != "int1":
            if zero_t is None:
                raise ValueError(f"format {fmt} is asymmetric and needs a zero point tensor")
            _expect(zero_t, (n_groups, n), torch.float16, "zero_t")
        elif zero_t is not None:
            raise ValueError(f"format {fmt} has no zero point; pass zero=None")
        if self.double_quant:
            if fmt != "nf4" or dq_offset is None:
                raise ValueError("double quantization applies to nf4 only and needs dq_scale and dq_offset")
            chunks = math.ceil(n * n_groups / bitpack.DOUBLE_QUANT_BLOCK)
            _expect(dq_scale, (chunks,), torch.float32, "dq_scale")
            _expect(dq_offset, (chunks,), torch.float32, "dq_offset")
        self.packed = packed.contiguous()
        self.scale_t = scale_t.contiguous()
        self.zero_t = None if zero_t is None else zero_t.contiguous()
        self.dq_scale = dq_scale
        self.dq_offset = dq_offset
        # CPU kernel operands (aten int4 weight-pack layout), built once by `prepare_cpu`.
        self._cpu_packed: Optional[torch.Tensor] = None
        self._cpu_scales_zeros: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: Optional[torch.Tensor] = None,
        *,
        fmt: str,
        group_size: int,
        in_features: Optional[int] = None,
        double_quant: bool = False,
    ) -> "QuantizedWeight":
        """Pack codes and scales chosen elsewhere, bit-exactly.

        Args:
            codes: integer [N, K_pad] in the format's range (intB: 0..2**B-1; int1: 0/1 bits, 1 = +1;
                nf4: codebook indices 0..15). K_pad must be a multiple of ``group_size``.
            scale: float [N, K_pad // group_size] (stored as float16).
            zero: float [N, K_pad // group_size] zero points in quantized units for intB, None for
                int1 / nf4 (stored as float16).
            fmt, group_size: the format and the group width along K (weights).
            in_features: the unpadded K (default K_pad); columns beyond it are padding.
            double_quant: nf4 only: store the absmax scales as 8-bit codes (lossy on the scales).
        """
        _check_format(fmt)
        if codes.dim() != 2:
            raise ValueError(f"codes must be [N, K_pad], got shape {tuple(codes.shape)}")
        n, k_pad = codes.shape
        if k_pad % group_size:
            raise ValueError(f"codes width {k_pad} is not a multiple of group_size={group_size}; pad K with zeros")
        k = k_pad if in_features is None else int(in_features)
        if padded_k(k, group_size) != k_pad:
            raise ValueError(
                f"in_features={k} pads to {padded_k(k, group_size)} with group_size={group_size}, "
                f"but codes are {k_pad} wide"
            )
        n_groups = k_pad // group_size
        if tuple(scale.shape) != (n, n_groups):
            raise ValueError(f"scale must be [N, K_pad // group_size] = {[n, n_groups]}, got {list(scale.shape)}")
        _check_fp16_range(scale, "scales")
        bits = get_format(fmt).bits
        packed = bitpack.pack_codes(codes, bits)
        scale_t = scale.t().to(torch.float16).contiguous()
        zero_t = None
        if zero is not None:
            if tuple(zero.shape) != (n, n_groups):
                raise ValueError(f"zero must be [N, K_pad // group_size] = {[n, n_groups]}, got {list(zero.shape)}")
            _check_fp16_range(zero, "zero points")
            zero_t = zero.t().to(torch.float16).contiguous()
        dq_scale = dq_offset = None
        if double_quant:
            if fmt != "nf4":
                raise ValueError(f"double_quant applies to nf4 only, not {fmt}")
            scale_t, dq_scale, dq_offset = bitpack.double_quantize(scale_t.float())
        return cls(
            fmt=fmt, group_size=group_size, shape=(n, k), packed=packed, scale_t=scale_t,
            zero_t=zero_t, dq_scale=dq_scale, dq_offset=dq_offset,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors plus ``fmt`` (str), ``group_size`` (int) and ``shape`` ([N, K]).

        Tensors: ``packed``, ``scale_t``, and where present ``zero_t``, ``dq_scale``, ``dq_offset``
        (store the non-tensor entries as safetensors metadata). CPU caches are not included.
        """
        d: dict[str, Any] = {"fmt": self.fmt, "group_size": self.group_size, "shape": list(self.shape)}
        for name in ("packed", "scale_t", "zero_t", "dq_scale", "dq_offset"):
            t = getattr(self, name)
            if t is not None:
                d[name] = t
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "QuantizedWeight":
        """Rebuild from `state_dict` output (``group_size`` / ``shape`` may be ints or strings)."""
        shape = d["shape"]
        if isinstance(shape, str):
            shape = [int(v) for v in shape.strip("[]()").split(",")]
        return cls(
            fmt=str(d["fmt"]), group_size=int(d["group_size"]), shape=(int(shape[0]), int(shape[1])),
            packed=d["packed"], scale_t=d["scale_t"], zero_t=d.get("zero_t"),
            dq_scale=d.get("dq_scale"), dq_offset=d.get("dq_offset"),
        )

    # ------------------------------------------------------------------ views
    @property
    def device(self) -> torch.device:
        """Device of the packed tensors."""
        return self.packed.device

    @property
    def n_groups(self) -> int:
        """Groups per row (K_pad // group_size)."""
        return self.k_pad // self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes of the stored format: packed codes + scales + zero points (+ double-quant data)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.packed, self.scale_t, self.zero_t, self.dq_scale, self.dq_offset)
            if t is not None
        )

    def expected_nbytes(self) -> int:
        """`torch_myqasr.formats.weight_nbytes` for this weight (equals `nbytes`)."""
        n, k = self.shape
        return weight_nbytes(self.fmt, n, k, self.group_size, double_quant=self.double_quant)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 [N, K_pad] (the inverse of `from_codes`' packing)."""
        return bitpack.unpack_codes(self.packed, self.bits, self.k_pad)

    def scales(self) -> torch.Tensor:
        """Per-group scales as float32 [N, n_groups] (nf4 double quant: dequantized absmax)."""
        if self.double_quant:
            return bitpack.double_dequantize(self.scale_t, self.dq_scale, self.dq_offset).t().contiguous()
        return self.scale_t.float().t().contiguous()

    def zeros(self) -> Optional[torch.Tensor]:
        """Per-group zero points (quantized units) as float32 [N, n_groups], None for int1 / nf4."""
        return None if self.zero_t is None else self.zero_t.float().t().contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in floating point, [N, K] (padding dropped), computed in float32 then cast."""
        from torch_myqasr.ops.cpu import dequantize_packed

        n, k = self.shape
        return dequantize_packed(
            self.fmt, self.packed, self.scale_t, self.zero_t, self.dq_scale, self.dq_offset,
            self.group_size, n, k,
        ).to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """A copy on ``device`` (CPU kernel caches are rebuilt on demand there)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(
            fmt=self.fmt, group_size=self.group_size, shape=self.shape, packed=move(self.packed),
            scale_t=move(self.scale_t), zero_t=move(self.zero_t), dq_scale=move(self.dq_scale),
            dq_offset=move(self.dq_offset),
        )

    # ------------------------------------------------------------------ CPU kernel cache
    def prepare_cpu(self) -> bool:
        """Build (once) the aten int4 weight-pack operands used on CPU; True if this weight has them.

        Call it before ``torch.compile`` so the compiled graph reads the cached tensors (otherwise
        `quantized_linear` builds them at the first eager call). Memory: N * K_pad / 2 bytes more.
        """
        from torch_myqasr.ops import cpu

        if self._cpu_packed is None and self.device.type == "cpu" and cpu.int4pack_eligible(self):
            self._cpu_packed, self._cpu_scales_zeros = cpu.build_int4pack(self)
        return self._cpu_packed is not None

    def drop_cpu_cache(self) -> None:
        """Free the CPU kernel operands built by `prepare_cpu`."""
        self._cpu_packed = self._cpu_scales_zeros = None

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedWeight(fmt={self.fmt}, shape={self.shape}, group_size={self.group_size}{dq}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )


def _expect(t: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")


def quantize_weight(
    weight: torch.Tensor, fmt: str = "int4", group_size: int = 64, *, double_quant: bool = False
) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] float weight into ``fmt`` (groups of ``group_size``).

    * intB: per group ``lo = min(w.min(), 0)``, ``hi = max(w.max(), 0)``, ``scale = (hi - lo) /
      (2**B - 1)``, ``zero = -lo / scale`` (so zero lies in [0, 2**B - 1] and float16 never
      overflows), ``q = clamp(round(w / scale + zero))``, computed with the float16-rounded scale
      and zero that are stored.
    * int1: ``scale = mean(|w|)`` over the group (the L1-optimal binary scale), bit = ``w >= 0``.
    * nf4: ``absmax = max(|w|)`` per block, code = nearest codebook level of ``w / absmax``.

    K is zero-padded to a multiple of ``group_size``. Returns a `QuantizedWeight` on the weight's
    device.
    """
    _check_format(fmt)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"weight must be a floating-point [out_features, in_features] tensor, got "
            f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}"
        )
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    n, k = weight.shape
    k_pad = padded_k(k, group_size)
    w = torch.nn.functional.pad(weight.detach().float(), (0, k_pad - k))
    groups = w.view(n, k_pad // group_size, group_size)
    bits = get_format(fmt).bits
    zero = None
    if fmt == "nf4":
        scale = groups.abs().amax(dim=-1)
        _check_fp16_range(scale, "block absmax scales")
        scale16 = scale.half().float()
        normed = groups / torch.where(scale16 > 0, scale16, 1.0)[..., None]
        table = torch.tensor(bitpack.NF4_CODEBOOK, dtype=torch.float32, device=w.device)
        codes = (normed[..., None] - table).abs().argmin(dim=-1)
    elif fmt == "int1":
        scale = groups.abs().mean(dim=-1)
        codes = (groups >= 0).to(torch.int32)
    else:
        qmax = 2**bits - 1
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
        _check_fp16_range(scale, "scales")
        scale = scale.clamp(min=2.0**-24)  # smallest float16 subnormal: a stored scale is never 0
        scale = scale.half().float()
        zero = (-lo / scale).clamp(0, qmax).half().float()
        codes = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, qmax)
    codes = codes.reshape(n, k_pad).to(torch.uint8)
    return QuantizedWeight.from_codes(
        codes, scale, zero, fmt=fmt, group_size=group_size, in_features=k, double_quant=double_quant
    )
