"""Vectorised clipping-ratio search: every (format, ratio) candidate of a layer in one pass.

The naive search quantizes the whole weight once per candidate, multiplies it by the sampled
inputs and measures the distance of the two outputs: about 15 full passes over the weight and one
[rows, out_features] output per candidate. For Whisper's 51,864 x 384 token embedding that is
seconds per format. Here instead:

- the group ranges (min / max per group) are computed ONCE per layer; only scale and zero depend
  on the candidate, and they are tiny ([candidates, N, groups]);
- the weight is walked in chunks of rows, and every candidate of every requested format is
  fake-quantized together ([candidates, rows, K]) with in-place ops, so one chunk stays in cache;
- the distance is accumulated from the OUTPUT ERROR ``e = x @ (w_q - w)^T`` chunk by chunk. Cosine
  distance and KL both decompose into sums over output features, so no [rows, N] output per
  candidate is ever materialised, and writing them in terms of ``e`` (not ``y_q``) avoids the
  catastrophic cancellation of ``1 - cos`` in float32 (int8 distortions are ~1e-5).

The fake quantization is `weight_quant.fake_quant_error`, the same arithmetic `quantize_groupwise`
uses for the stored codes, so a searched ratio reproduces its codes exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import torch_myqasr.quantizer.weight_quant as _wq

CHUNK_ELEMENTS = 1 << 22
"""Target size (float32 values, 16 MiB) of one chunk of fake-quantized candidates."""

KL_EXP_CLAMP = 60.0
"""Logit errors above this (nats) are clamped before ``exp`` in the KL objective (no overflow;
a layer that moves a logit by 60 nats is maximally distorted for any practical purpose)."""


class _CosineAcc:
    """Mean over sample rows of ``1 - cos(y, y + e)`` from running sums ``y.e`` and ``e.e``.

    ``y`` is the reference output laid out [features, rows]; sums run over the features (dim 0),
    in float64.
    """

    def __init__(self, y: torch.Tensor, n_cand: int) -> None:
        self.y = y
        self.yy = y.double().square().sum(0)  # [R]
        self.ye = torch.zeros(n_cand, y.shape[1], dtype=torch.float64)
        self.ee = torch.zeros_like(self.ye)

    def add(self, start: int, e: torch.Tensor) -> None:
        """Fold in the output error ``e`` [C, n, R] of features ``start .. start+n``."""
        y = self.y[start : start + e.shape[1]]
        self.ye += (e * y).sum(1, dtype=torch.float64)
        self.ee += e.square().sum(1, dtype=torch.float64)

    def result(self) -> torch.Tensor:
        """Distance per candidate [C] (float64, unitless, in [0, 2])."""
        ny = self.yy.sqrt()
        hh = (self.yy + 2 * self.ye + self.ee).clamp(min=0.0)
        nh = hh.sqrt()
        # |y||y_q| - y.y_q = (|e|^2 - (|y_q| - |y|)^2) / 2, with |y_q| - |y| = (2 y.e + e.e) / (|y_q| + |y|):
        # every term is small when e is small, so nothing cancels.
        d = (2 * self.ye + self.ee) / (ny + nh).clamp(min=1e-300)
        dist = (self.ee - d * d) / (2 * ny * nh).clamp(min=1e-300)
        # A zero output row (padding) has no direction: distance 1, as F.cosine_similarity's eps gives.
        dist = torch.where(ny * nh > 1e-12, dist.clamp(0.0, 2.0), torch.ones_like(dist))
        return dist.mean(-1)


class _KLAcc:
    """Mean over sample rows of ``KL(softmax(y) || softmax(y + e))`` (nats), softmax over features.

    ``KL = log E_p[exp(e)] - E_p[e] = log1p(A) - A + E_p[expm1(e) - e]`` with ``A = E_p[expm1(e)]``:
    both sums are accumulated chunk by chunk and neither cancels for small ``e``.
    """

    def __init__(self, y: torch.Tensor, n_cand: int) -> None:
        self.p = torch.softmax(y.float(), dim=0)  # [features, R]
        self.a = torch.zeros(n_cand, y.shape[1], dtype=torch.float64)
        self.b = torch.zeros_like(self.a)
        self.c = torch.zeros_like(self.a)

    def add(self, start: int, e: torch.Tensor) -> None:
        """Fold in the output error ``e`` [C, n, R] of features ``start .. start+n``."""
        p = self.p[start : start + e.shape[1]]
        ec = e.clamp(-KL_EXP_CLAMP, KL_EXP_CLAMP)
        self.b += (torch.exp(ec) * p).sum(1, dtype=torch.float64)
        em1 = torch.expm1(ec)
        self.a += (em1 * p).sum(1, dtype=torch.float64)
        self.c += (em1.sub_(e) * p).sum(1, dtype=torch.float64)

    def result(self) -> torch.Tensor:
        """Distance per candidate [C] (float64, nats, >= 0)."""
        # KL = log E_p[exp e] - E_p[e], with E_p[e] = A - C. log1p(A) is exact for small errors;
        # when the error pushes the likely tokens far down, A -> -1 and float32 rounding of p can
        # take it below -1 (NaN, seen on Whisper base's logits at int4), so there log(B) is used.
        log_mean_exp = torch.where(self.a > -0.5, torch.log1p(self.a.clamp(min=-0.5)), torch.log(self.b.clamp(min=1e-300)))
        return (log_mean_exp - (self.a - self.c)).clamp(min=0.0).mean(-1)


def _accumulator(metric: str, y: torch.Tensor, n_cand: int) -> _CosineAcc | _KLAcc:
    if metric == "cosine":
        return _CosineAcc(y, n_cand)
    if metric == "kl":
        return _KLAcc(y, n_cand)
    raise ValueError(f"unknown output distance {metric!r} for the clip search; use 'cosine' or 'kl'")


SEARCH_FEATURES = 4096
"""Output features (weight rows) the clip-ratio search looks at in a layer wider than this.

Each row's quantization error depends on that row alone (scales are per row and group), so the
best ratio of a 51,864-row token embedding is found as well on a few thousand of its rows: the
logits each sample row ranks highest (they carry the softmax mass) plus a fixed random set up to
that many (the top ones are all kept even past it). The
winning ratio's objective is then recomputed on every row when the caller needs the value."""

TOP_FEATURES = 16
"""Per sample row, the highest-output features always kept in the search subset."""


class SearchProbe:
    """A layer's weight and sampled uses, prepared once and shared by every candidate evaluated.

    Args:
        w: float weight (Linear [N, K], Conv1d [O, I, k] seen as [O, I*k], Embedding [V, D]).
        group_size: weights per group along K.
        x_sample: input rows [R, K] of the matmul use (conv: unfolded patches), or None.
        index_sample: token ids of the lookup use (embedding), or None.
        metric: ``"cosine"`` or ``"kl"``; without any sample the objective is the weight MSE.
        search_features: search on this many output features of a wider layer (see
            `SEARCH_FEATURES`); None = always every feature.
    """

    def __init__(
        self,
        w: torch.Tensor,
        group_size: int,
        *,
        x_sample: torch.Tensor | None = None,
        index_sample: torch.Tensor | None = None,
        metric: str = "cosine",
        search_features: int | None = SEARCH_FEATURES,
    ) -> None:
        if metric not in ("cosine", "kl"):
            raise ValueError(f"unknown output distance {metric!r} for the clip search; use 'cosine' or 'kl'")
        self.metric = metric
        self.group_size = group_size
        self.w2 = _wq.as_matrix(w)
        self.n, self.k = self.w2.shape
        self.w2p = _wq.pad_k(self.w2, group_size)
        self.gmin, self.gmax = _wq.group_range(self.w2p, group_size)
        self.xt: torch.Tensor | None = None  # [K_padded, R]: padded columns are 0, so padding adds nothing
        self.y: torch.Tensor | None = None  # reference output [N, R]
        if x_sample is not None and x_sample.numel():
            x = x_sample.reshape(-1, self.k).float()
            self.xt = F.pad(x, (0, self.w2p.shape[1] - self.k)).t().contiguous()
            self.y = self.w2 @ x.t()
        self.idx: torch.Tensor | None = None
        if index_sample is not None and index_sample.numel():
            self.idx = index_sample.reshape(-1).long()
        self.features: torch.Tensor | None = None  # sorted row subset for the search, or None = all
        if search_features is not None and self.n > search_features:
            self.features = self._feature_subset(search_features)

    def _feature_subset(self, m: int) -> torch.Tensor:
        keep = torch.zeros(self.n, dtype=torch.bool)
        if self.y is not None:
            top = min(TOP_FEATURES, self.n)
            keep[self.y.topk(top, dim=0).indices.flatten()] = True
        # A fixed seed: the same layer always gets the same subset (deterministic results).
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(0))
        rest = order[~keep[order]][: max(m - int(keep.sum()), 0)]
        keep[rest] = True
        return keep.nonzero().flatten()

    @property
    def has_samples(self) -> bool:
        """Whether an output objective is available (else the weight MSE is used)."""
        return self.xt is not None or self.idx is not None

    def objectives(
        self, bits: Sequence[int], ratios: Sequence[float], *, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Objective of every candidate ``(bits[i], ratios[i])``: float64 [C], lower is better.

        With both a matmul and a lookup use it is the mean of the two uses' distances (the
        distances are unitless for cosine, nats for kl); without samples, the mean squared weight
        error (squared weight units). ``features`` (sorted row indices) restricts the matmul use
        and the MSE to those output features (KL then uses the softmax over them).
        """
        c = len(bits)
        if c == 0 or c != len(ratios):
            raise ValueError(f"need one ratio per candidate, got {c} bit-widths and {len(ratios)} ratios")
        ratio_t = torch.tensor([float(r) for r in ratios], dtype=torch.float32)
        qmax_t = torch.tensor([float(2**b - 1) for b in bits], dtype=torch.float32)
        kp = self.w2p.shape[1]
        if features is None:
            w2p, gmin, gmax, y = self.w2p, self.gmin, self.gmax, self.y
        else:
            w2p, gmin, gmax = self.w2p[features], self.gmin[features], self.gmax[features]
            y = None if self.y is None else self.y[features]
        n_rows = w2p.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // (c * kp))
        uses = []
        if self.xt is not None:
            assert y is not None
            # Scale and zero of every candidate for all rows at once ([C, N, groups], small): a
            # few ops per layer instead of a few per chunk.
            sz = _wq.widened_scale_zero(gmin, gmax, ratio_t, qmax_t)
            acc = _accumulator(self.metric, y, c)
            for s in range(0, n_rows, chunk):
                rows = slice(s, s + chunk)
                e = _wq.fake_quant_error(w2p[rows], sz[0][:, rows], sz[1][:, rows], qmax_t, self.group_size)
                n = e.shape[1]
                acc.add(s, (e.view(c * n, kp) @ self.xt).view(c, n, -1))  # output error [C, n, R]
            uses.append(acc.result())
        if self.idx is not None:
            s_, z_ = _wq.widened_scale_zero(self.gmin[self.idx], self.gmax[self.idx], ratio_t, qmax_t)
            e = _wq.fake_quant_error(self.w2p[self.idx], s_, z_, qmax_t, self.group_size)[..., : self.k]
            acc = _accumulator(self.metric, self.w2[self.idx].t(), c)  # features = K, rows = ids
            acc.add(0, e.transpose(1, 2))
            uses.append(acc.result())
        if not uses:
            sq = torch.zeros(c, dtype=torch.float64)
            for s in range(0, n_rows, chunk):
                rows = slice(s, s + chunk)
                s_, z_ = _wq.widened_scale_zero(gmin[rows], gmax[rows], ratio_t, qmax_t)
                e = _wq.fake_quant_error(w2p[rows], s_, z_, qmax_t, self.group_size)[..., : self.k]
                sq += e.square().sum((1, 2), dtype=torch.float64)
            return sq / (n_rows * self.k)
        return sum(uses) / len(uses)

    def search(
        self, bits: Sequence[int], grid: Sequence[float], *, exact: bool = True
    ) -> dict[int, tuple[float, float]]:
        """Best clipping ratio of ``grid`` for each bit-width in ``bits``, all in one pass.

        Args:
            bits: bit-widths (2..8) to search.
            grid: ratios in (0, 1]; the first of equally good ratios wins (deterministic).
            exact: when the search ran on a feature subset, recompute the winners' objective on
                every feature (what a distortion estimate needs); False returns the subset's value.

        Returns:
            ``{bits: (ratio, objective)}``.
        """
        _wq.check_grid(grid)
        bits = list(dict.fromkeys(int(b) for b in bits))
        cand_bits = [b for b in bits for _ in grid]
        cand_ratios = [float(r) for _ in bits for r in grid]
        obj = self.objectives(cand_bits, cand_ratios, features=self.features).view(len(bits), len(grid))
        best = obj.argmin(1)  # argmin returns the FIRST minimum: ties keep the earlier grid entry
        ratios = [float(grid[int(i)]) for i in best]
        values = [float(obj[j, i]) for j, i in enumerate(best)]
        if exact and self.features is not None:
            values = [float(v) for v in self.objectives(bits, ratios)]
        return {b: (r, v) for b, r, v in zip(bits, ratios, values)}
