"""Choosing widths above the current ones under a FLOPs budget, with the cost model only.

A group of ``size`` channels may grow to any multiple of its step on the rounding grid (``round_to``,
see :mod:`fxmorph.passes.rounding`) above its size, up to
``max_factor * size`` (at least one step is always allowed). Two policies:

- :func:`uniform_grow_widths`: one multiplier ``w >= 1`` for every group, ``width_g`` the allowed width
  nearest ``w * size_g`` (rounded per group, never per layer); the largest ``w`` under the budget is
  found by bisection (FLOPs are monotone in ``w``), then single steps are added while the budget holds,
  each to the group whose width after the step is the smallest multiple of its size (so the widths
  stay as even as the rounding allows).
- :func:`greedy_grow_widths`: steps are added one at a time, the one with the most *gain* per FLOP
  added first, while the budget holds. The gain of a group's ``j``-th new channel is given per group
  (``sigma_j^2`` of its bridging operator: the squared gradient norm GradMax's ``j``-th new channel
  brings), continued beyond the given values by a fitted power law (:func:`extend_spectrum`), so
  returns diminish and growth spreads over the groups that pay.

Both stop when no allowed step fits, so the result is at most the budget and less than one step (of
the cheapest group, at the final widths) below it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fxmorph.analysis.cost import Costs
from fxmorph.passes.rounding import Grid, RoundTo, as_grid
from fxmorph.passes.select_uniform import largest_multiplier

__all__ = [
    "extend_spectrum",
    "greedy_grow_widths",
    "growth_options",
    "max_grow_flops",
    "next_steps",
    "uniform_grow_widths",
]


def growth_options(
    size: int, round_to: RoundTo | Grid, max_factor: float, span: int = 1, copies: int = 1
) -> np.ndarray:
    """Sorted widths a group of ``size`` elements of ``span`` channels, held ``copies`` times by one axis, may take
    when growing (``size`` first)."""
    step = as_grid(round_to).step(size, span, copies)
    first = (size // step + 1) * step
    cap = max(int(np.floor(max_factor * size)), first)
    return np.concatenate([[size], np.arange(first, cap + 1, step)]).astype(np.int64)


def _options(cost: Costs, groups: Sequence[int], round_to: RoundTo | Grid, max_factor: float) -> dict[int, np.ndarray]:
    return {
        g: growth_options(int(cost.sizes[g]), round_to, max_factor, int(cost.spans[g]), int(cost.copies[g]))
        for g in groups
    }


def max_grow_flops(cost: Costs, groups: Sequence[int], round_to: RoundTo | Grid, max_factor: float) -> int:
    """FLOPs with every listed group at its widest allowed width."""
    w = cost.widths()
    for g, opts in _options(cost, groups, round_to, max_factor).items():
        w[g] = opts[-1]
    return cost.flops(w)


def next_steps(w: np.ndarray, options: Mapping[int, np.ndarray]) -> list[tuple[int, int]]:
    """``(group, next allowed width)`` for every group not yet at its widest."""
    out = []
    for g, opts in options.items():
        k = int(np.searchsorted(opts, w[g], side="right"))
        if k < len(opts):
            out.append((g, int(opts[k])))
    return out


def _step_flops(cost: Costs, w: np.ndarray, steps: list[tuple[int, int]]) -> np.ndarray:
    return cost.flops_steps(w, steps).astype(np.float64)


def extend_spectrum(values: np.ndarray, count: int) -> np.ndarray:
    """``values`` (descending gains of a group's first new channels) continued to ``count`` entries by
    a power law ``v_j ~ (j + 1)^-alpha`` fitted to them, ``alpha >= 1`` (returns must diminish: the
    probe only saw the top of the spectrum)."""
    values = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    n = len(values)
    if n >= count or n == 0:
        return values[:count] if n else np.zeros(count)
    positive = values > 0
    alpha = 1.0
    if positive.sum() >= 2:
        j = np.log(np.flatnonzero(positive) + 1.0)
        alpha = max(1.0, -float(np.polyfit(j, np.log(values[positive]), 1)[0]))
    tail = values[-1] * (n / (np.arange(n, count) + 1.0)) ** alpha
    return np.concatenate([values, tail])


def _gain(gains: Mapping[int, np.ndarray] | None, size: int, g: int, lo: int, hi: int) -> float:
    """Gain of growing group ``g`` from ``lo`` to ``hi`` channels (one per channel without ``gains``)."""
    if gains is None or g not in gains:
        return float(hi - lo)
    return float(gains[g][lo - size : hi - size].sum())


def _top_up(
    cost: Costs,
    w: np.ndarray,
    options: Mapping[int, np.ndarray],
    budget: int,
    gains: Mapping[int, np.ndarray] | None,
) -> np.ndarray:
    """Add steps that fit, one at a time, while any fits: the most gain per FLOP first, or without
    ``gains`` the one leaving the group at the smallest multiple of its size."""
    w = w.copy()
    current = cost.flops(w)
    while True:
        steps = next_steps(w, options)
        if not steps:
            return w
        added = _step_flops(cost, w, steps) - current
        fits = np.flatnonzero(added <= budget - current)
        if not fits.size:
            return w
        if gains is None:  # keep the multiplier even: the group furthest behind first
            best = fits[np.argmin([steps[j][1] / cost.sizes[steps[j][0]] for j in fits])]
        else:
            value = np.array([_gain(gains, int(cost.sizes[g]), g, int(w[g]), width) for g, width in steps])
            best = fits[np.argmax(value[fits] / np.maximum(added[fits], 1.0))]
        g, width = steps[best]
        w[g] = width
        current = cost.flops(w)


def greedy_grow_widths(
    cost: Costs,
    groups: Sequence[int],
    budget: int,
    round_to: RoundTo | Grid,
    max_factor: float,
    gains: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Widths from adding steps, most gain per FLOP first, while ``budget`` holds (see module doc)."""
    options = _options(cost, groups, round_to, max_factor)
    if gains is not None:
        gains = {g: extend_spectrum(gains.get(g, np.zeros(0)), int(options[g][-1] - cost.sizes[g])) for g in groups}
    return _top_up(cost, cost.widths(), options, budget, gains)


def uniform_grow_widths(
    cost: Costs, groups: Sequence[int], budget: int, round_to: RoundTo | Grid, max_factor: float
) -> np.ndarray:
    """Widths of the largest uniform multiplier ``w >= 1`` under ``budget``, topped up (see module doc)."""
    options = _options(cost, groups, round_to, max_factor)

    def widths_at(m: float) -> np.ndarray:
        w = cost.widths()
        for g, opts in options.items():
            w[g] = opts[np.argmin(np.abs(opts - m * cost.sizes[g]))]
        return w

    lo = largest_multiplier(lambda m: cost.flops(widths_at(m)) <= budget, 1.0, max(max_factor, 1.0))
    return _top_up(cost, widths_at(lo), options, budget, None)
