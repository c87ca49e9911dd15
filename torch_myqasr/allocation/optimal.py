"""The ``optimal`` strategy: minimise the summed per-layer distortion under the byte budget.

This is a multiple-choice knapsack problem (one format per layer; cost = exact bytes, value =
distortion). It is solved by dynamic programming over the bytes spent above the all-smallest
choice:

1. Subtract each layer's smallest cost, so only the *extra* bytes of a choice matter, and divide
   every extra cost by their greatest common divisor ``g`` (Whisper's shapes make ``g`` a multiple
   of 64 bytes or more). When the remaining slack is at most ``max_units`` units of ``g`` the DP is
   **exact**: it returns a true optimum.
2. Otherwise costs are counted in coarser units of ``u = g * ceil(slack / (g * max_units))`` bytes,
   each cost rounded **up**, so every DP answer truly fits (the budget is never exceeded). Rounding
   can cost at most ``n_layers * u`` bytes of budget, i.e. the answer is at least as good as the
   true optimum at a budget that much smaller.
3. The DP answer is then improved greedily with the bytes that rounding left unused, and compared
   with the Lagrangian (convex-hull greedy) solution; the better one is returned.

The linear-programming relaxation (the best Lagrangian bound) is computed as well and returned as
``lower_bound``: no assignment that fits can have less distortion, so ``gap = distortion -
lower_bound`` is a certificate of how far from optimal the answer can be (0 when exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

from torch_myqasr.allocation.layers import LayerInfo

DEFAULT_MAX_UNITS = 1 << 15
"""Largest DP table width (cost units). 200 layers x 8 formats x 2**15 runs in about 0.1 s."""


@dataclass(frozen=True)
class MCKPSolution:
    """A solution of the multiple-choice knapsack.

    Attributes:
        choice: index of the chosen option for each item.
        cost: total cost of the choice (bytes).
        distortion: total distortion of the choice.
        lower_bound: LP-relaxation bound: no feasible choice has smaller total distortion.
        unit: DP cost unit in bytes; equal to the gcd of the extra costs when the DP was exact.
        exact: True when the choice is provably optimal (exact DP, or zero gap to the bound).
    """

    choice: tuple[int, ...]
    cost: int
    distortion: float
    lower_bound: float
    unit: int
    exact: bool

    @property
    def gap(self) -> float:
        """Upper bound on how much more distortion this choice has than the true optimum."""
        return max(0.0, self.distortion - self.lower_bound)


def _lp_bound_and_greedy(extra: np.ndarray, dist: np.ndarray, slack: int) -> tuple[float, np.ndarray]:
    """LP-relaxation bound and the integer convex-hull greedy choice.

    Each item's options are reduced to the lower-left convex hull of (extra cost, distortion);
    hull segments from all items are taken in order of distortion saved per byte. The first
    segment that does not fit is taken fractionally for the bound (the LP optimum of the
    multiple-choice knapsack, Sinha & Zoltners 1979) and skipped by the integer greedy, which goes
    on with later segments of other items that still fit.
    """
    n, _ = extra.shape
    start = np.empty(n, dtype=np.int64)
    segments: list[tuple[float, int, int, int, int, float]] = []  # (-eff, item, step, to, dc, dd)
    for i in range(n):
        # Options sorted by cost, then distortion; keep only those that lower the distortion.
        idx = sorted(range(extra.shape[1]), key=lambda f: (extra[i, f], dist[i, f], f))
        pts: list[int] = []
        for f in idx:
            if pts and dist[i, f] >= dist[i, pts[-1]]:
                continue  # dominated: costs at least as much, no better
            if pts and extra[i, f] == extra[i, pts[-1]]:
                continue
            # Pop points that lie on or above the segment from the one before them to f.
            while len(pts) >= 2:
                a, b = pts[-2], pts[-1]
                # slope(a->b) must be steeper (more negative) than slope(b->f) for b to stay.
                lhs = (dist[i, b] - dist[i, a]) * (extra[i, f] - extra[i, b])
                rhs = (dist[i, f] - dist[i, b]) * (extra[i, b] - extra[i, a])
                if lhs < rhs:
                    break
                pts.pop()
            pts.append(f)
        start[i] = pts[0]
        for step, (a, b) in enumerate(zip(pts, pts[1:])):
            dc = int(extra[i, b] - extra[i, a])
            dd = float(dist[i, a] - dist[i, b])
            segments.append((-dd / dc, i, step, b, dc, dd))
    segments.sort()
    choice = start.copy()
    bound = float(dist[np.arange(n), start].sum())
    left = slack
    fractional_done = False
    next_step = np.zeros(n, dtype=np.int64)
    for _neg_eff, i, step, to, dc, dd in segments:
        if step != next_step[i]:
            continue  # an earlier segment of this item was skipped; later ones cannot follow
        if dc <= left:
            left -= dc
            choice[i] = to
            next_step[i] += 1
            if not fractional_done:
                bound -= dd
        else:
            if not fractional_done:
                bound -= dd * left / dc
                fractional_done = True
            next_step[i] = -1  # the integer greedy stops this item here
    return bound, choice


def _improve(choice: np.ndarray, extra: np.ndarray, dist: np.ndarray, slack: int) -> np.ndarray:
    """Spend unused bytes: repeatedly apply the single-item change that fits and saves the most
    distortion (ties: lowest item, then lowest option index). Never leaves the budget."""
    choice = choice.copy()
    rows = np.arange(extra.shape[0])
    while True:
        used = int(extra[rows, choice].sum())
        dcost = extra - extra[rows, choice][:, None]
        ddist = dist - dist[rows, choice][:, None]
        ok = (dcost <= slack - used) & (ddist < 0)
        if not ok.any():
            return choice
        flat = np.where(ok, ddist, np.inf).argmin()  # first minimum: deterministic
        i, f = divmod(int(flat), extra.shape[1])
        choice[i] = f


def solve_mckp(
    costs: Sequence[Sequence[int]],
    distortions: Sequence[Sequence[float]],
    capacity: int,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
) -> MCKPSolution | None:
    """Choose one option per item minimising total distortion with total cost <= ``capacity``.

    Args:
        costs: ``costs[i][f]`` = bytes of option f of item i (non-negative ints); every item has
            the same number of options.
        distortions: ``distortions[i][f]`` = finite distortion of that option.
        capacity: bytes available.
        max_units: width of the DP table; the DP is exact whenever the slack fits in this many
            gcd units, and otherwise rounds costs up (see the module docstring).

    Returns:
        The best choice found with its certificate, or None when even the cheapest option of every
        item does not fit. Ties between equally good options go to the lower option index.
    """
    c = np.asarray(costs, dtype=np.int64)
    d = np.asarray(distortions, dtype=np.float64)
    if c.ndim != 2 or c.shape != d.shape:
        raise ValueError(f"costs and distortions must be equal [items, options] tables, got {c.shape} and {d.shape}")
    n, n_opt = c.shape
    if n == 0:
        return MCKPSolution((), 0, 0.0, 0.0, 1, True) if capacity >= 0 else None
    if not np.isfinite(d).all():
        raise ValueError("distortions must be finite numbers")
    if (c < 0).any():
        raise ValueError("costs must be non-negative")
    base = c.min(axis=1)
    slack = int(capacity - base.sum())
    if slack < 0:
        return None
    extra = c - base[:, None]
    g = reduce(math.gcd, (int(x) for x in np.unique(extra) if x > 0), 0) or 1
    units = slack // g
    scale = max(1, math.ceil(units / max_units))
    unit = g * scale
    width = slack // unit  # DP capacity in units; floor keeps every DP answer within the budget
    w = -(-extra // unit)  # ceil: rounding costs up is what keeps the budget safe

    # dp[j]: least distortion of the items so far with rounded extra cost <= j units.
    dp = np.zeros(width + 1, dtype=np.float64)
    picks = np.empty((n, width + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(width + 1, np.inf)
        pick = np.full(width + 1, -1, dtype=np.int16)
        for f in range(n_opt):
            wf = int(w[i, f])
            if wf > width:
                continue
            cand = dp[: width + 1 - wf] + d[i, f]
            better = cand < new[wf:]  # strict: the lower option index wins ties
            new[wf:][better] = cand[better]
            pick[wf:][better] = f
        dp, picks[i] = new, pick
    choice = np.empty(n, dtype=np.int64)
    j = width
    for i in range(n - 1, -1, -1):
        f = int(picks[i, j])
        choice[i] = f
        j -= int(w[i, f])
    exact_dp = scale == 1

    bound, greedy = _lp_bound_and_greedy(extra, d, slack)
    rows = np.arange(n)
    candidates = [choice] if exact_dp else [_improve(choice, extra, d, slack), _improve(greedy, extra, d, slack)]
    best = min(candidates, key=lambda ch: float(d[rows, ch].sum()))  # min keeps the first on ties
    total = float(d[rows, best].sum())
    cost = int(c[rows, best].sum())
    if cost > capacity:  # rounding costs up should make this impossible; never return it
        raise RuntimeError(f"internal error: optimal allocation took {cost} bytes of {capacity}")
    exact = exact_dp or total - bound <= 1e-12 * max(1.0, abs(total))
    return MCKPSolution(tuple(int(x) for x in best), cost, total, min(bound, total), unit, exact)


def allocate_optimal(
    layers: Sequence[LayerInfo],
    formats: Sequence[str],
    group_size: int,
    capacity: int,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
) -> tuple[dict[str, str], MCKPSolution] | None:
    """Minimise the sum of ``layer.distortion[fmt]`` with the layers' bytes <= ``capacity``.

    Args:
        layers: the layers; each needs a ``distortion`` entry for every candidate format.
        formats: candidate format names, most bits per weight first (`sort_formats`); on equal
            total distortion the earlier (higher-bit) format wins.
        group_size: weights per scale group along K.
        capacity: bytes available to the layers (budget minus fixed bytes).
        max_units: DP table width (see `solve_mckp`).

    Returns:
        (``{layer name: format}`` in the order of ``layers``, the solver's certificate), or None
        when the layers cannot fit even at their smallest formats.
    """
    for layer in layers:
        missing = [f for f in formats if layer.distortion is None or f not in layer.distortion]
        if missing:
            raise ValueError(
                f"strategy 'optimal' needs a distortion estimate for every candidate format; layer "
                f"{layer.name!r} has none for {', '.join(missing)}. Compute LayerInfo.distortion with "
                "the output-distance sensitivity for those formats, or use strategy 'myqasr'."
            )
        bad = [f for f in formats if not math.isfinite(float(layer.distortion[f]))]  # type: ignore[index]
        if bad:
            raise ValueError(f"layer {layer.name!r}: distortion for {', '.join(bad)} is not a finite number")
    # Solve in name order so the answer does not depend on the order the layers were listed in.
    by_name = sorted(layers, key=lambda l: l.name)
    costs = [[layer.nbytes(f, group_size) for f in formats] for layer in by_name]
    dists = [[float(layer.distortion[f]) for f in formats] for layer in by_name]  # type: ignore[index]
    sol = solve_mckp(costs, dists, capacity, max_units=max_units)
    if sol is None:
        return None
    chosen = {layer.name: formats[f] for layer, f in zip(by_name, sol.choice)}
    return {layer.name: chosen[layer.name] for layer in layers}, sol
