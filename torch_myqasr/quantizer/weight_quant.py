"""Group-wise asymmetric integer weight quantization with a searched clipping ratio.

Conventions follow `torch_myqasr.formats` exactly, so `QuantizedWeight.from_codes` can pack the
codes bit-exactly:

- a weight is viewed as a matrix [N, K] (Conv1d weights [O, I, k] become [O, I*k], the layout
  ``F.unfold`` patches use), K is zero-padded up to a multiple of ``group_size``;
- ``intB``: ``w = (q - zero) * scale`` per group, ``q`` in ``[0, 2**B - 1]`` (uint8 codes),
  ``scale`` and ``zero`` float16, ``zero`` a float in quantized units.

Every group's range is widened to include 0 (so ``zero`` lies in ``[0, 2**B - 1]`` and fits
float16 with room to spare) and then shrunk by one clipping ratio per layer. The ratio is chosen
from a small grid to minimise the distance of the layer OUTPUT ``F.linear(x, w_q)`` to
``F.linear(x, w)`` on sampled input rows (the myQASR scale search), or the weight MSE when no
input sample is available. Everything is deterministic: same inputs, same codes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from torch_myqasr.formats import get_format, padded_k
from torch_myqasr.sensitivity.metrics import output_distance

DEFAULT_CLIP_GRID: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
"""Clipping ratios the scale search tries, largest first (ties keep the larger ratio)."""

FP16_TINY = float(torch.finfo(torch.float16).tiny)


class GroupwiseCodes(NamedTuple):
    """Result of `quantize_groupwise`: uint8 codes [N, K_padded], float16 scale and zero [N, groups]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def bits_of(fmt: str) -> int:
    """Bits of an integer format name (``"int4"`` -> 4); a clear error for other formats."""
    f = get_format(fmt)
    if not (fmt.startswith("int") and 2 <= f.bits <= 8):
        raise ValueError(
            f"format {fmt!r} is not an asymmetric integer format (int2..int8); this quantizer "
            "handles intB only (int1 / nf4 need their own quantizer)"
        )
    return f.bits


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a Linear [N, K], Conv1d [O, I, k] or Embedding [V, D] weight as a float32 matrix [N, K]."""
    if w.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dims, got shape {tuple(w.shape)}")
    return w.detach().reshape(w.shape[0], -1).float()


def pad_k(w2: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-pad a [N, K] matrix along K up to a multiple of ``group_size`` (no copy if aligned)."""
    k = w2.shape[1]
    kp = padded_k(k, group_size)
    return F.pad(w2, (0, kp - k)) if kp != k else w2


_pad_k = pad_k  # the older private name


def group_range(w2p: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of a padded [N, K_padded] matrix, widened to include 0: two [N, groups].

    Including 0 keeps ``zero`` inside ``[0, 2**B - 1]``, where float16 is precise.
    """
    n, kp = w2p.shape
    g = w2p.view(n, kp // group_size, group_size)
    return g.amin(-1).clamp(max=0.0), g.amax(-1).clamp(min=0.0)


def scale_zero(
    gmin: torch.Tensor, gmax: torch.Tensor, ratio: torch.Tensor, qmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 scale and zero [C, N, groups] of candidates ``(ratio[c], qmax[c])`` (float32 [C]).

    The group range [gmin, gmax] ([N, groups], weight units) is shrunk by ``ratio``; ``scale`` is
    in weight units per code step, ``zero`` in codes.
    """
    r = ratio.view(-1, 1, 1)
    wmin, wmax = gmin * r, gmax * r
    exact = (wmax - wmin) / qmax.view(-1, 1, 1)
    scale = exact.to(torch.float16)
    # A group whose step is below float16's smallest normal (range < 2**B * 6.1e-5: int8 groups of
    # |w| < ~0.016, common where Whisper has outlier input channels) keeps a SUBNORMAL scale. It is
    # rounded up to the next float16, so the top code still reaches the group's max (coarser
    # subnormal spacing must not clip). Replacing it by 1.0, as before, zeroed such groups, and with
    # the huge activations of those channels int8 came out worse than int6.
    sub = scale.float() < FP16_TINY
    up = torch.nextafter(scale, torch.full_like(scale, float("inf")))
    scale = torch.where(sub & (scale.float() < exact), up, scale)
    # An all-zero group has range 0: any positive scale reproduces it exactly (codes == zero).
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    zero = (-wmin / scale.float()).to(torch.float16)
    return scale, zero


def _codes_float(w2p: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes as float32 [C, N, groups, group_size].

    ``s`` and ``z`` are the float16 scale and zero already widened to float32 [C, N, groups, 1];
    computing with the float16-rounded values makes dequantization (which only sees those)
    reproduce the nearest grid point. In place after the first op: one buffer per call, and few
    ops, because on a shared machine every parallel op can cost a scheduler time slice.
    """
    n, kp = w2p.shape
    g = w2p.view(1, n, kp // group_size, group_size)
    q = torch.addcdiv(z, g, s).round_()  # z + g / s, rounded once each like g / s + z
    return q.clamp_(min=_ZERO, max=qmax.view(-1, 1, 1, 1))


_ZERO = torch.zeros(())


def widened_scale_zero(
    gmin: torch.Tensor, gmax: torch.Tensor, ratio: torch.Tensor, qmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scale_zero` widened to float32 [C, N, groups, 1], ready to broadcast over a group."""
    scale, zero = scale_zero(gmin, gmax, ratio, qmax)
    return scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)


def fake_quant_error(
    w2p: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qmax: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``dequantize(quantize(w)) - w`` for every candidate: float32 [C, N, K_padded].

    Args:
        w2p: padded float32 weight rows [N, K_padded].
        s, z: the candidates' scale and zero from `widened_scale_zero` [C, N, groups, 1].
        qmax: float32 [C], ``2**bits - 1`` of each candidate.
        group_size: weights per group along K.

    The codes are those `quantize_groupwise` stores, bit for bit.
    """
    q = _codes_float(w2p, s, z, qmax, group_size)
    n, kp = w2p.shape
    return q.sub_(z).mul_(s).view(-1, n, kp).sub_(w2p)


def _rtn(w2p: torch.Tensor, bits: int, group_size: int, ratio: float) -> GroupwiseCodes:
    """Round-to-nearest of a padded float32 matrix with the group range scaled by ``ratio``."""
    n, kp = w2p.shape
    gmin, gmax = group_range(w2p, group_size)
    ratio_t = torch.tensor([ratio], dtype=torch.float32)
    qmax_t = torch.tensor([float(2**bits - 1)], dtype=torch.float32)
    scale, zero = scale_zero(gmin, gmax, ratio_t, qmax_t)
    q = _codes_float(w2p, scale.float().unsqueeze(-1), zero.float().unsqueeze(-1), qmax_t, group_size)
    return GroupwiseCodes(q.to(torch.uint8).view(n, kp), scale[0], zero[0])


def check_grid(grid: Sequence[float]) -> None:
    """Raise a ValueError unless ``grid`` is a non-empty sequence of ratios in (0, 1]."""
    if not grid or any(not (0.0 < r <= 1.0) for r in grid):
        raise ValueError(f"clip grid must be non-empty ratios in (0, 1], got {tuple(grid)}")


def dequantize_groupwise(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    *,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct ``(codes - zero) * scale`` per group, drop the K padding, reshape.

    Args:
        codes: uint8 [N, K_padded].
        scale: float16 [N, K_padded / group_size].
        zero: float16 [N, K_padded / group_size], in quantized units.
        group_size: weights per group along K.
        shape: the original weight shape (e.g. [O, I, k] for a conv); default [N, K_padded].
        dtype: output dtype (arithmetic is float32).

    Returns:
        The dequantized weight, ``shape`` and ``dtype``.
    """
    n, kp = codes.shape
    if kp % group_size:
        raise ValueError(f"codes width {kp} is not a multiple of group_size {group_size}")
    g = codes.view(n, kp // group_size, group_size).float()
    w = ((g - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).view(n, kp)
    if shape is not None:
        k = 1
        for d in list(shape)[1:]:
            k *= int(d)
        # contiguous: the op's fake implementation promises a fresh dense tensor
        w = w[:, :k].contiguous().reshape(list(shape))
    return w.to(dtype)


class _Probe:
    """The sampled layer outputs a candidate weight is judged on (one entry per kind of use)."""

    def __init__(self, w2: torch.Tensor, x_sample: torch.Tensor | None, index_sample: torch.Tensor | None):
        self.x = None if x_sample is None or x_sample.numel() == 0 else x_sample.reshape(-1, w2.shape[1]).float()
        self.idx = None if index_sample is None or index_sample.numel() == 0 else index_sample.reshape(-1).long()
        self.ref = self.outputs(w2)

    def outputs(self, w2: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        if self.x is not None:
            outs.append(F.linear(self.x, w2))
        if self.idx is not None:
            outs.append(w2[self.idx])  # embedding lookup: rows of the weight
        return outs

    @property
    def has_samples(self) -> bool:
        return bool(self.ref)

    def distance(self, w2_hat: torch.Tensor, metric: str) -> float:
        outs = self.outputs(w2_hat)
        return sum(output_distance(r, o, metric) for r, o in zip(self.ref, outs)) / len(outs)


def weight_distance(
    w: torch.Tensor,
    w_hat: torch.Tensor,
    *,
    x_sample: torch.Tensor | None = None,
    index_sample: torch.Tensor | None = None,
    metric: str = "cosine",
) -> float:
    """Distance of the layer output with weight ``w_hat`` instead of ``w``.

    With ``x_sample`` (input rows [R, K]) the outputs are ``F.linear(x, w)``; with
    ``index_sample`` (token ids) they are embedding rows ``w[ids]``; with both, the mean of the two.
    Without samples, ``metric`` is applied to the weight rows themselves.
    """
    w2, w2h = as_matrix(w), as_matrix(w_hat)
    probe = _Probe(w2, x_sample, index_sample)
    if not probe.has_samples:
        return output_distance(w2, w2h, metric)
    return probe.distance(w2h, metric)


def search_clip_ratio(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    x_sample: torch.Tensor | None = None,
    index_sample: torch.Tensor | None = None,
    metric: str = "cosine",
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> tuple[float, float]:
    """Search the per-layer clipping ratio for ``bits``-bit group-wise quantization of ``w``.

    Args:
        w: the float weight (Linear [N, K], Conv1d [O, I, k], Embedding [V, D]).
        bits: 2..8.
        group_size: weights per group along K.
        x_sample: input rows [R, K] (conv: unfolded patches); the objective is then the
            ``metric`` distance of ``F.linear(x, w_q)`` to ``F.linear(x, w)``.
        index_sample: token ids for an embedding use (objective on the looked-up rows).
        metric: ``"cosine"`` or ``"kl"`` for the output objective. Without any sample the
            objective is the weight MSE, whatever ``metric`` says.
        grid: candidate ratios in (0, 1]; the first of equally good ratios wins.

    Returns:
        ``(ratio, distance)``: the best ratio and its objective value (unitless for cosine, nats
        for kl, squared weight units for MSE).
    """
    from torch_myqasr.quantizer.clip_search import SearchProbe  # imports this module

    check_grid(grid)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    probe = SearchProbe(w, group_size, x_sample=x_sample, index_sample=index_sample, metric=metric)
    return probe.search([bits], grid)[bits]


def quantize_groupwise(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    x_sample: torch.Tensor | None = None,
    index_sample: torch.Tensor | None = None,
    clip_ratio: float | None = None,
    metric: str = "cosine",
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> GroupwiseCodes:
    """Quantize ``w`` to ``bits``-bit group-wise asymmetric codes.

    Args:
        w: float weight; Conv1d [O, I, k] is treated as [O, I*k].
        bits: 2..8 (``q`` in ``[0, 2**bits - 1]``).
        group_size: weights per group along K (K is zero-padded to a multiple of it).
        x_sample / index_sample / metric / grid: see `search_clip_ratio`; used only when
            ``clip_ratio`` is None.
        clip_ratio: use this ratio instead of searching (what a saved scheme replays).

    Returns:
        `GroupwiseCodes`: uint8 codes [N, K_padded], float16 scale and zero [N, K_padded/group_size].
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if clip_ratio is None:
        clip_ratio, _ = search_clip_ratio(
            w, bits, group_size, x_sample=x_sample, index_sample=index_sample, metric=metric, grid=grid
        )
    elif not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
    return _rtn(_pad_k(as_matrix(w), group_size), bits, group_size, float(clip_ratio))
