"""The steps the width selection weighs: each group's next allowed width, what the step saves and what it is worth.

:func:`ranked_steps` gives every group's next step down or up (:func:`step_candidates`), what it changes of the
budgeted resource (:func:`step_deltas`: FLOPs, or predicted microseconds) and its value per weighed cost, which
:mod:`fxmorph.passes.select` ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fxmorph.analysis.cost import Costs

__all__ = ["Cumulative", "empties_a_join", "ranked_steps", "step_candidates", "step_deltas", "whole_values"]

Cumulative = Mapping[int, np.ndarray]
"""Per group, the cumulative value of its best channels: ``values[g][k]`` is what its ``k`` best are worth."""


def step_candidates(
    cost: Costs, w: np.ndarray, groups: list[int], allowed: dict[int, np.ndarray], down: bool
) -> list[tuple[int, int]]:
    """The next allowed width of every group, down or up; a group goes whole only where the groups already gone
    leave no tensor empty with it (:attr:`Costs.joint`)."""
    out = []
    for g in groups:
        opts = allowed[g]
        k = int(np.searchsorted(opts, w[g]))
        nxt = k - 1 if down else k + 1
        if not 0 <= nxt < len(opts):
            continue
        if opts[nxt] == 0 and empties_a_join(cost, w, g):
            continue
        out.append((g, int(opts[nxt])))
    return out


def empties_a_join(cost: Costs, w: np.ndarray, g: int) -> bool:
    """Whether removing variable ``g`` whole, beside those already at 0 in ``w``, leaves a tensor empty (it would be
    the last of a concatenation's groups, :attr:`Costs.joint`)."""
    gone = set(np.flatnonzero(w == 0).tolist()) | {g}
    return any(s <= gone for s in cost.joint)


def step_deltas(cost: Costs, w: np.ndarray, cands: list[tuple[int, int]]) -> np.ndarray:
    """What each candidate step changes of the budgeted resource (FLOPs, or predicted microseconds)."""
    if not cands:
        return np.zeros(0)
    return np.abs(cost.spent_steps(w, cands) - cost.spent(w)).astype(np.float64)


def _taken(
    cost: Costs, w: np.ndarray, cands: list[tuple[int, int]], saved: np.ndarray, param_flops: float
) -> np.ndarray:
    """What each candidate step takes of the model, in FLOPs: the FLOPs it changes, or where it changes none (an
    op priced by its memory alone) what it saves of the budgeted resource, ``saved`` (in FLOPs); under a latency
    budget, plus ``param_flops`` FLOPs per parameter it changes."""
    if cost.spends_flops or not cands:
        return saved
    flops = np.abs(cost.flops_steps(w, cands) - cost.flops(w)).astype(np.float64)
    taken = np.where(flops > 0, flops, saved)
    if not param_flops:
        return taken
    return taken + param_flops * np.abs(cost.params_steps(w, cands) - cost.params(w)).astype(np.float64)


def _flops_per_unit(cost: Costs, w: np.ndarray) -> float:
    """FLOPs per unit of the budgeted resource at ``w`` (1 where the budget is in FLOPs)."""
    if cost.spends_flops:
        return 1.0
    spent = cost.spent(w)
    return 1.0 if spent <= 0 else cost.flops(w) / spent


def _weighed(
    cost: Costs, w: np.ndarray, cands: list[tuple[int, int]], saved: np.ndarray, param_cost: float
) -> np.ndarray:
    """What each step saves of the budgeted resource, ``saved`` (in FLOPs), plus ``param_cost`` per parameter it
    changes."""
    if not param_cost or not cands:
        return saved
    params = np.abs(cost.params_steps(w, cands) - cost.params(w)).astype(np.float64)
    return saved + param_cost * params


def _ratios(
    normed: Cumulative,
    w: np.ndarray,
    cands: list[tuple[int, int]],
    taken: np.ndarray,
    weighed: np.ndarray,
    whole: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Value per unit of weighed cost of each candidate step: the mean value of the channels it moves,
    times the FLOPs it takes of the model over its weighed cost (1 for a FLOPs budget without a parameter
    cost). A step that saves nothing is worth infinitely much (never cut, nothing gained by it).

    A step between 0 and a width (a group removed whole, or put back) moves channels valued at ``whole`` each
    (:func:`_whole_values`), and saves what every op that goes with the group costs.

    Under a latency budget a step's weighed cost is the time it saves, so of two steps whose channels score
    alike, the one that takes fewer FLOPs per microsecond goes first: the cut keeps the FLOPs that run fast on the
    runtime (wide kernels) and gives up those that run slow (thin and memory-bound ones). What a step takes counts
    its parameters too (``param_flops``, :data:`~fxmorph.passes.select_latency.DEFAULT_PARAM_VALUES`), so that of
    two steps that save alike, the one that takes fewer weights goes first."""
    out = np.full(len(cands), np.inf)
    for j, (g, width) in enumerate(cands):
        lo, hi = sorted((width, int(w[g])))
        if taken[j] > 0 and weighed[j] > 0:
            if lo == 0 and whole is not None:
                out[j] = whole[g] * taken[j] / weighed[j]
            else:
                out[j] = (normed[g][hi] - normed[g][lo]) / (hi - lo) * taken[j] / weighed[j]
    return out


def ranked_steps(
    cost: Costs,
    w: np.ndarray,
    groups: list[int],
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    param_cost: float,
    down: bool,
    whole: Mapping[int, float] | None = None,
    param_flops: float = 0.0,
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """The next step of every group (down or up), what each changes of the budgeted resource, and its value per
    weighed cost (``param_flops``: FLOPs a parameter counts for in what a step takes of the model, under a latency
    budget)."""
    cands = step_candidates(cost, w, groups, allowed, down=down)
    spent = step_deltas(cost, w, cands)
    saved = spent * _flops_per_unit(cost, w)  # in FLOPs: the model's FLOPs per unit of the budgeted resource
    taken = _taken(cost, w, cands, saved, param_flops)
    return cands, spent, _ratios(normed, w, cands, taken, _weighed(cost, w, cands, saved, param_cost), whole)


def whole_values(cost: Costs, normed: Cumulative) -> dict[int, float]:
    """What each channel of a group removed whole is worth.

    Under a FLOPs budget, the mean balanced value of the group's channels (its balanced total over its size): a
    removal takes the FLOPs its channels cost, as thinning does, so the value of the channels tells the two apart,
    and the balance that keeps groups thinning evenly weighs against removal as against thinning a group far below
    the others. A group goes once thinning the others costs more, or where the weights it takes with it weigh more
    than its FLOPs (``param_cost``: the late dense layers of a densenet121 fed 64x64 images, at 2x2 pixels). Valued
    plainly instead, removal escapes the balance and costs less than any step that thins: densenet121 at half its
    FLOPs (224x224) lost 40 of its 58 dense layers and kept 15% of its parameters.

    Under a latency budget, 1, what the group's channels score on average (scores are over the group's mean):
    there a removal saves what no channel's FLOPs show, the fixed time and the memory-bound ops of every op that goes
    with the group (a dense layer's norm and activation over its whole input, its concatenation), and a group goes
    where those savings beat thinning's. densenet121 at half its latency (onnxruntime, 2 threads, 224x224) kept
    49% of its FLOPs with 27 of its 58 layers removed; 41% at the mean balanced value (two removed), 40% without
    removal (before a step's parameters counted in what it takes, which keeps more of them at a few points of its
    FLOPs: :data:`~fxmorph.passes.select_latency.DEFAULT_PARAM_VALUES`)."""
    if cost.spends_flops:
        return {g: float(values[-1]) / max(len(values) - 1, 1) for g, values in normed.items()}
    return dict.fromkeys(normed, 1.0)
