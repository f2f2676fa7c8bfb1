"""Uniform widths: every group at one multiplier of its size, the largest that fits a budget.

The width multiplier of MobileNet and MorphNet's uniform baseline: :func:`uniform_widths` bisects the multiplier
(:func:`largest_multiplier`) whose rounded widths fit, then tops the result up with the steps that still fit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fxmorph.analysis.cost import Costs
from fxmorph.passes.rounding import Grid, RoundTo
from fxmorph.passes.select import add_back_steps, allowed_widths, cumulative_values

__all__ = ["largest_multiplier", "uniform_widths"]


def largest_multiplier(fits: Callable[[float], bool], lo: float, hi: float, steps: int = 40) -> float:
    """The largest multiplier in ``[lo, hi]`` that ``fits`` (by bisection; ``lo`` is assumed to fit)."""
    if fits(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def uniform_widths(
    cost: Costs, groups: list[int], budget: float, round_to: RoundTo | Grid = 1, min_width: int = 1
) -> np.ndarray:
    """The largest uniform multiplier (by bisection) whose rounded widths fit ``budget``, topped up."""
    sizes = cost.sizes

    def widths_at(m: float) -> np.ndarray:
        w = cost.widths()
        for g in groups:
            opts = allowed_widths(int(sizes[g]), round_to, min_width, int(cost.spans[g]), int(cost.copies[g]))
            w[g] = opts[np.argmin(np.abs(opts - m * sizes[g]))]
        return w

    lo = largest_multiplier(lambda m: cost.spent(widths_at(m)) <= budget, 0.0, 1.0)
    flat = cumulative_values({g: np.ones(int(sizes[g])) for g in groups})
    allowed = {
        g: allowed_widths(int(sizes[g]), round_to, min_width, int(cost.spans[g]), int(cost.copies[g])) for g in groups
    }
    return add_back_steps(cost, widths_at(lo), groups, allowed=allowed, normed=flat, budget=budget)
