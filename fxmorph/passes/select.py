"""Choosing widths under a budget with the cost model (no tracing, no forward passes).

The budget measures what ``Costs.spent`` measures: FLOPs, or where the costs are priced in predicted latency
(:meth:`~fxmorph.analysis.cost.Costs.priced`, :mod:`fxmorph.analysis.latency`), microseconds; "FLOPs" below stands
for either.

Allowed widths of a group are multiples of its step on the rounding grid (``round_to``, see
:mod:`fxmorph.passes.rounding`) between its floor (``min_width``, and the share ``max_prune`` may
remove) and its size, plus its size itself; a group smaller than its step keeps its size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fxmorph.analysis.cost import CostModel, Costs
from fxmorph.passes.rounding import AUTO, Grid, RoundTo, as_grid
from fxmorph.passes.select_steps import (
    Cumulative,
    empties_a_join,
    ranked_steps,
    step_candidates,
    step_deltas,
    whole_values,
)
from fxmorph.passes.uniform import coarse_cumulative, per_unit

__all__ = [
    "DEFAULT_LATENCY_BALANCE",
    "DEFAULT_MAX_PRUNE",
    "DEFAULT_PARAM_COST",
    "DEFAULT_ROUND_TO",
    "add_back_steps",
    "allowed_widths",
    "cumulative_values",
    "greedy_widths",
    "smallest_widths",
]

DEFAULT_PARAM_COST = 50.0
"""What one parameter weighs against one FLOP when choosing which channels to cut. At batch 1,
onnxruntime's CPU kernels pay for reading weights as well as for arithmetic: a linear fit over the
convolutions of resnet50 and its pruned and narrowed variants gave about 2.2 us per MFLOP and
0.12 us per thousand parameters (50 to 55 FLOPs per parameter). Without it, a FLOPs budget cuts
vgg11_bn's 120 M-parameter classifier no more than its convolutions, and the model stays
weight-bound. The budget itself stays in FLOPs; this only orders the cuts."""

DEFAULT_LATENCY_BALANCE = 0.25
"""Under a latency budget, the ``balance`` of :func:`cumulative_values`: how much more a group's last channels weigh
than its first. A FLOPs budget thins every group in proportion where scores say little (a balance of 1); a latency
budget's point is to thin unevenly, where the runtime spends time that FLOPs do not show (thin early convolutions,
memory-bound stages, whole blocks), and a balance of 1 held it back: a group's channels weighed up to twice their
score once it was halved, while a group removed whole loses its channels at their mean score
(:func:`~fxmorph.passes.select_steps.whole_values`). Measured against a balance of 1 at 0.04 parameter value, cut to
73, 48.75 and 29% of the predicted latency (``benchmarks/RESULTS.md``, session 18): convnext_tiny kept 75.2, 46.4
and 23.6% of its FLOPs (68.3, 41.5 and 20.2% before; the FLOPs budget at the same latency 69.2, 42.2 and 20.8%),
mobilenet_v2 69.6, 40.6 and 18.6% (66.0, 34.7 and 15.7%), efficientnet_b0 84.9, 54.9 and 29.2% (85.0, 47.8 and
18.3%), with more parameters in every case; resnet50's FLOPs moved by less than a point (its time follows its FLOPs).
A balance of 0 kept more FLOPs still on convnext_tiny and densenet121, and mobilenet_v2 cut to 29% kept 7.9% of its
parameters, no more than the FLOPs budget's 8.1%."""

DEFAULT_ROUND_TO: RoundTo = AUTO
"""Default rounding: multiples of onnxruntime's CPU channel block (16) where the budget allows, finer
steps for narrow groups only when the budget needs them (see :mod:`fxmorph.passes.rounding`)."""

DEFAULT_MAX_PRUNE = 0.9
"""The share of its channels a group may lose by default, unless the budget needs more (see
``fxmorph.shrink``'s ``max_prune="auto"``)."""


def allowed_widths(
    size: int, round_to: RoundTo | Grid, min_width: int, span: int = 1, copies: int = 1, removable: bool = False
) -> np.ndarray:
    """Sorted allowed widths of a group of ``size`` elements of ``span`` channels, held ``copies`` times by one
    axis (``min_width`` in channels), with 0 first where ``min_width`` is 0 and the group is ``removable`` whole."""
    floor = max(-(-min_width // span), 1)
    step = as_grid(round_to).step(size, span, copies)
    steps = np.arange(step, size + 1, step)
    steps = steps[steps >= floor]
    widths = np.unique(np.append(steps, size))
    return np.concatenate([[0], widths]) if removable and min_width == 0 else widths


def _bounded(cost: Costs, g: int, round_to: RoundTo | Grid, min_width: int, max_prune: float) -> np.ndarray:
    """The allowed widths of variable ``g``: ``max_prune`` bounds how far a group thins, not whether it goes whole."""
    size, span = int(cost.sizes[g]), int(cost.spans[g])
    floor = max(-(-min_width // span), int(np.ceil(size * (1.0 - max_prune))))
    widths = allowed_widths(size, round_to, max(floor, 1) * span, span, int(cost.copies[g]))
    return np.concatenate([[0], widths]) if min_width == 0 and cost.removable[g] else widths


def smallest_widths(
    cost: Costs, groups: list[int], round_to: RoundTo | Grid, min_width: int, max_prune: float = 1.0
) -> np.ndarray:
    """Width vector with every listed group at its smallest allowed width."""
    w = cost.widths()
    for g in groups:
        w[g] = _bounded(cost, g, round_to, min_width, max_prune)[0]
    return w


def cumulative_values(scores: Mapping[int, np.ndarray], balance: float = 0.0) -> dict[int, np.ndarray]:
    """Per group, the cumulative sum of channel values from the top down.

    A channel's value is its score over the group's mean score, times ``(size / rank) ** balance``
    where ``rank`` counts from the top (1 for the best channel): the fewer channels a group keeps, the
    more each one weighs, so on flat scores every group thins in proportion and no group is thinned far
    below the others on small score differences."""
    out = {}
    for g, s in scores.items():
        normed = np.sort(s / s.mean() if s.size and s.mean() > 0 else s)[::-1]
        if balance:
            normed = normed * (len(normed) / np.arange(1, len(normed) + 1)) ** balance
        out[g] = np.concatenate([[0.0], np.cumsum(normed)])
    return out


def greedy_widths(
    cost: CostModel,
    scores: Mapping[int, np.ndarray],
    budget: float,
    round_to: RoundTo | Grid = 1,
    min_width: int = 1,
    *,
    max_prune: float = DEFAULT_MAX_PRUNE,
    step: float = 0.25,
    balance: float = 1.0,
    param_cost: float = DEFAULT_PARAM_COST,
    param_value: float = 0.0,
    classes: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Remove the least important channels per FLOP saved until under ``budget``, then add back.

    A channel's value is its score over its group's mean score times the FLOPs one of the group's
    channels costs now, so a step's value per FLOP saved is the mean relative score of the channels
    it removes: on flat scores no group is cheaper to cut than another, and ``balance`` (a group's
    remaining channels weigh ``(size / rank) ** balance`` more, see ``cumulative_values``) makes every
    group thin in proportion; uneven scores move the cuts to where they matter least. What a step
    saves also counts ``param_cost`` FLOPs per parameter (see :data:`DEFAULT_PARAM_COST`; 0 ranks by
    FLOPs alone), so weight-bound layers, which cost latency their FLOPs do not show, give way first;
    the budget is met in FLOPs all the same. Where ``cost`` is priced in another resource (a latency
    model), a step's value is weighed against what it saves of that resource instead: the steps that
    take the fewest FLOPs per microsecond saved go first, a step's parameters counting ``param_value`` times the
    model's FLOPs per parameter each in what it takes (:mod:`fxmorph.passes.select_latency` selects at several
    values); callers pass such a budget its own ``balance`` (:data:`DEFAULT_LATENCY_BALANCE`), since its cuts are
    meant to be uneven. Each round takes the best steps down (one per group, all within 2% of the best ratio,
    covering at most ``step`` of the remaining gap) and re-ranks. No group loses more than ``max_prune`` of its
    channels, but with ``min_width`` 0 a group that can go whole
    (:attr:`Costs.removable`) may go, valued as :func:`~fxmorph.passes.select_steps.whole_values` says, and never
    the last of a concatenation (:attr:`Costs.joint`). Once under the budget, steps up are added
    back greedily (most value per cost first) while the budget still holds, and while the result is
    more than 1% under the budget, coarse steps are traded for fine ones where that lands closer.

    Before the per-round limit and the current-cost values, every group took a step per
    round whatever its value and a channel kept the value of its original cost: convnext_tiny's stem
    stream went 96 -> 16 channels at half the FLOPs while its 384-wide MLP layers kept 288.

    Each of ``classes`` (groups of one size, see :mod:`fxmorph.passes.uniform`) keeps one width: its
    groups step together, saving their FLOPs summed, and a step's value per FLOP is the mean over the
    members of their relative scores (the value per FLOP of each member's own step).
    """
    normed = cumulative_values(scores, balance)
    valued = {"param_cost": param_cost, "param_flops": _param_flops(cost, param_value)}
    if not classes:
        return _greedy(cost, normed, budget, round_to, min_width, max_prune, step, **valued)
    tied = cost.tied(classes)
    units = per_unit(tied, normed, lambda values: np.mean(values, axis=0), coarse_cumulative)
    return tied.expand(_greedy(tied, units, budget, round_to, min_width, max_prune, step, **valued))


def _param_flops(cost: CostModel, param_value: float) -> float:
    """What one parameter a step takes counts for in FLOPs under a latency budget: ``param_value`` times the
    model's FLOPs per parameter (0 under a FLOPs budget, or for a model without parameters)."""
    params = cost.params()
    if cost.spends_flops or not param_value or params <= 0:
        return 0.0
    return param_value * cost.flops() / params


def _greedy(
    cost: Costs,
    normed: Cumulative,
    budget: float,
    round_to: RoundTo | Grid,
    min_width: int,
    max_prune: float,
    step: float,
    *,
    param_cost: float,
    param_flops: float,
) -> np.ndarray:
    """:func:`greedy_widths` over the variables of ``cost`` valued by ``normed`` (cumulative values); a variable
    removed whole loses the mean value of its channels (see :func:`_ratios`). ``param_cost`` and ``param_flops``:
    what a parameter costs and what it counts for, in FLOPs."""
    groups = sorted(normed)
    whole = whole_values(cost, normed)
    allowed = {g: _bounded(cost, g, round_to, min_width, max_prune) for g in groups}
    valued = {"normed": normed, "whole": whole, "param_cost": param_cost, "param_flops": param_flops}
    remove = functools.partial(_remove, cost, allowed=allowed, budget=budget, step=step, **valued)
    add_back = functools.partial(add_back_steps, cost, allowed=allowed, budget=budget, **valued)
    w = remove(cost.widths(), groups)
    w = add_back(w, groups)
    return _refine(cost, w, groups, allowed, budget, remove, add_back)


def _remove(
    cost: Costs,
    w: np.ndarray,
    groups: list[int],
    *,
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    budget: float,
    step: float,
    param_cost: float = 0.0,
    param_flops: float = 0.0,
    slack: float = 0.02,
    whole: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Take steps down in ``groups``, best (importance lost / cost saved) first, until under budget.
    A round takes the best steps, up to ``step`` of the gap left, among those within ``slack`` of the
    best ratio, then re-ranks."""
    w = w.copy()
    current = cost.spent(w)
    while current > budget:
        cands, saved, ratios = ranked_steps(cost, w, groups, allowed, normed, param_cost, True, whole, param_flops)
        if not cands:
            break
        order = np.argsort(ratios, kind="stable")
        if not np.isfinite(ratios[order[0]]):
            break  # no step saves FLOPs any more
        target = max((current - budget) * step, 1.0)
        taken = 0.0
        for j in order:
            if not np.isfinite(ratios[j]) or (taken and ratios[j] > ratios[order[0]] * (1.0 + slack)):
                break  # only steps about as good as the best share a round (and none that saves no FLOPs)
            g, width = cands[j]
            if width == 0 and empties_a_join(cost, w, g):
                continue  # a step of this round already took the last other group of a concatenation
            w[g] = width
            taken += saved[j]
            if taken >= target:
                break
        current = cost.spent(w)
    return w


def add_back_steps(
    cost: Costs,
    w: np.ndarray,
    groups: list[int],
    *,
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    budget: float,
    param_cost: float = 0.0,
    param_flops: float = 0.0,
    whole: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Take steps up, most importance per cost first, while the FLOPs budget holds: several per
    round while the room left is large, then one at a time."""
    w = w.copy()
    current = cost.spent(w)
    while True:
        cands, added, gains = ranked_steps(cost, w, groups, allowed, normed, param_cost, False, whole, param_flops)
        room = budget - current
        fits = sorted((j for j in range(len(cands)) if added[j] <= room), key=lambda j: -gains[j])
        if not fits:
            return w
        trial, spent = w.copy(), 0.0
        for j in fits:
            if spent and spent + added[j] > room / 2:
                break
            trial[cands[j][0]] = cands[j][1]
            spent += added[j]
        flops = cost.spent(trial)
        if flops > budget:  # steps interact (FLOPs are products of widths): take the best one alone
            trial = w.copy()
            trial[cands[fits[0]][0]] = cands[fits[0]][1]
            flops = cost.spent(trial)
        w, current = trial, flops


def _refine(
    cost: Costs,
    w: np.ndarray,
    groups: list[int],
    allowed: dict[int, np.ndarray],
    budget: float,
    remove: Callable[..., np.ndarray],
    add_back: Callable[..., np.ndarray],
    tries: int = 4,
    tolerance: float = 0.01,
) -> np.ndarray:
    """Trade coarse steps for fine ones, to land closer to the budget.

    A group whose one step is larger than the gap left to the budget either takes that step down
    and finer steps are added back elsewhere, or takes it up and finer steps are removed elsewhere;
    the trial closest to the budget (still under it) wins, a few times over. Within ``tolerance`` of
    the budget nothing is traded: a coarse step the ranking chose is worth more than a closer landing.
    """
    current = cost.spent(w)
    for _ in range(tries):
        if budget - current <= tolerance * budget:
            break
        best, best_flops = None, current
        for trial in _trials(cost, w, groups, allowed, budget - current, tries):
            g = int(np.flatnonzero(trial != w)[0])
            if trial[g] > w[g]:
                trial = remove(trial, [h for h in groups if h != g])
            trial = add_back(trial, groups)
            flops = cost.spent(trial)
            if best_flops < flops <= budget:
                best, best_flops = trial, flops
        if best is None:
            break
        w, current = best, best_flops
    return w


def _trials(
    cost: Costs, w: np.ndarray, groups: list[int], allowed: dict[int, np.ndarray], gap: int, count: int
) -> list[np.ndarray]:
    """Width vectors one coarse step (larger than ``gap``) away from ``w``, largest steps first."""
    trials = []
    for down in (True, False):
        cands = step_candidates(cost, w, groups, allowed, down=down)
        sizes = step_deltas(cost, w, cands)
        for j in [j for j in np.argsort(-sizes) if sizes[j] > gap][:count]:
            trial = w.copy()
            trial[cands[j][0]] = cands[j][1]
            trials.append(trial)
    return trials
