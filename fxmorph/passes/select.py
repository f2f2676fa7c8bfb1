"""Choosing widths under a FLOPs budget with the cost model (no tracing, no forward passes).

Allowed widths of a group are multiples of ``round_to`` between its floor (``min_width``, and the
share ``max_prune`` may remove) and its size, plus its size itself; a group smaller than
``round_to`` keeps its size unless ``round_to == 1``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np

from fxmorph.cost import CostModel

__all__ = ["allowed_widths", "greedy_widths", "smallest_widths", "uniform_widths"]

Cumulative = Mapping[int, np.ndarray]


def allowed_widths(size: int, round_to: int, min_width: int) -> np.ndarray:
    """Sorted allowed widths of a group of ``size`` channels."""
    floor = max(min_width, 1)
    steps = np.arange(round_to, size + 1, round_to)
    steps = steps[steps >= floor]
    return np.unique(np.append(steps, size))


def _bounded(cost: CostModel, g: int, round_to: int, min_width: int, max_prune: float) -> np.ndarray:
    size = int(cost.sizes[g])
    floor = max(min_width, int(np.ceil(size * (1.0 - max_prune))))
    return allowed_widths(size, round_to, floor)


def smallest_widths(
    cost: CostModel, groups: list[int], round_to: int, min_width: int, max_prune: float = 1.0
) -> np.ndarray:
    """Width vector with every listed group at its smallest allowed width."""
    w = cost.widths()
    for g in groups:
        w[g] = _bounded(cost, g, round_to, min_width, max_prune)[0]
    return w


def _candidates(w: np.ndarray, groups: list[int], allowed: dict[int, np.ndarray], down: bool) -> list[tuple[int, int]]:
    out = []
    for g in groups:
        opts = allowed[g]
        k = int(np.searchsorted(opts, w[g]))
        nxt = k - 1 if down else k + 1
        if 0 <= nxt < len(opts):
            out.append((g, int(opts[nxt])))
    return out


def _deltas(cost: CostModel, w: np.ndarray, cands: list[tuple[int, int]]) -> np.ndarray:
    if not cands:
        return np.zeros(0)
    mat = np.repeat(w[:, None], len(cands), axis=1)
    for j, (g, width) in enumerate(cands):
        mat[g, j] = width
    return np.abs(cost.flops_batch(mat) - cost.flops(w)).astype(np.float64)


def _value(cumulative: Cumulative, g: int, lo: int, hi: int) -> float:
    """Importance of the channels ranked ``lo..hi-1`` from the top of group ``g``."""
    return float(cumulative[g][hi] - cumulative[g][lo])


def _cumulative(scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per group, the cumulative sum of scores (normalised by the group mean) from the top down."""
    out = {}
    for g, s in scores.items():
        normed = s / s.mean() if s.size and s.mean() > 0 else s
        out[g] = np.concatenate([[0.0], np.cumsum(np.sort(normed)[::-1])])
    return out


def greedy_widths(
    cost: CostModel,
    scores: Mapping[int, np.ndarray],
    budget: int,
    round_to: int = 1,
    min_width: int = 1,
    *,
    flops_weight: float = 0.5,
    max_prune: float = 0.9,
    step: float = 0.25,
) -> np.ndarray:
    """Remove the least important channels per FLOP saved until under ``budget``, then add back.

    Each round ranks, for every group, the next allowed step down by importance lost divided by
    (FLOPs saved) ** ``flops_weight``, removes the best steps covering ``step`` of the remaining gap,
    and re-ranks (the FLOPs a channel saves change as the widths around it change). Importance is
    normalised by each group's mean, so ``flops_weight=1`` would always empty the high-resolution
    layers first; the default 0.5 balances cost against importance. No group loses more than
    ``max_prune`` of its channels. Once under the budget, steps up are added back greedily (most
    importance per FLOP first) while the budget still holds, and coarse steps are traded for fine
    ones where that lands closer to the budget.
    """
    groups = sorted(scores)
    allowed = {g: _bounded(cost, g, round_to, min_width, max_prune) for g in groups}
    normed = _cumulative(scores)
    remove = functools.partial(_remove, cost, allowed=allowed, normed=normed, budget=budget,
                               flops_weight=flops_weight, step=step)  # fmt: skip
    w = remove(cost.widths(), groups)
    w = _add_back(cost, w, groups, allowed, normed, budget)
    return _refine(cost, w, groups, allowed, normed, budget, remove)


def _remove(
    cost: CostModel,
    w: np.ndarray,
    groups: list[int],
    *,
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    budget: int,
    flops_weight: float,
    step: float,
) -> np.ndarray:
    """Take steps down in ``groups``, best (importance lost / FLOPs saved) first, until under budget."""
    w = w.copy()
    current = cost.flops(w)
    while current > budget:
        cands = _candidates(w, groups, allowed, down=True)
        if not cands:
            break
        saved = _deltas(cost, w, cands)
        lost = np.array([_value(normed, g, width, int(w[g])) for g, width in cands])
        order = np.argsort(lost / np.maximum(saved, 1e-9) ** flops_weight, kind="stable")
        target = max((current - budget) * step, 1.0)
        taken = 0.0
        for j in order:
            g, width = cands[j]
            w[g] = width
            taken += saved[j]
            if taken >= target:
                break
        current = cost.flops(w)
    return w


def _gain(normed: Cumulative, w: np.ndarray, cand: tuple[int, int], added: float) -> float:
    g, width = cand
    return _value(normed, g, int(w[g]), width) / max(added, 1e-9)


def _add_back(
    cost: CostModel, w: np.ndarray, groups: list[int], allowed: dict[int, np.ndarray], normed: Cumulative, budget: int
) -> np.ndarray:
    """Take steps up, most importance per FLOP first, while the budget holds: several per round while
    the room left is large, then one at a time."""
    w = w.copy()
    current = cost.flops(w)
    while True:
        cands = _candidates(w, groups, allowed, down=False)
        added = _deltas(cost, w, cands)
        room = budget - current
        fits = sorted(
            (j for j in range(len(cands)) if added[j] <= room), key=lambda j: -_gain(normed, w, cands[j], added[j])
        )
        if not fits:
            return w
        trial, spent = w.copy(), 0.0
        for j in fits:
            if spent and spent + added[j] > room / 2:
                break
            trial[cands[j][0]] = cands[j][1]
            spent += added[j]
        flops = cost.flops(trial)
        if flops > budget:  # steps interact (FLOPs are products of widths): take the best one alone
            trial = w.copy()
            trial[cands[fits[0]][0]] = cands[fits[0]][1]
            flops = cost.flops(trial)
        w, current = trial, flops


def _refine(
    cost: CostModel,
    w: np.ndarray,
    groups: list[int],
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    budget: int,
    remove: Callable[..., np.ndarray],
    tries: int = 4,
) -> np.ndarray:
    """Trade coarse steps for fine ones, to land closer to the budget.

    A group whose one step is larger than the gap left to the budget either takes that step down
    and finer steps are added back elsewhere, or takes it up and finer steps are removed elsewhere;
    the trial closest to the budget (still under it) wins, a few times over.
    """
    current = cost.flops(w)
    for _ in range(tries):
        best, best_flops = None, current
        for trial in _trials(cost, w, groups, allowed, budget - current, tries):
            g = int(np.flatnonzero(trial != w)[0])
            if trial[g] > w[g]:
                trial = remove(trial, [h for h in groups if h != g])
            trial = _add_back(cost, trial, groups, allowed, normed, budget)
            flops = cost.flops(trial)
            if best_flops < flops <= budget:
                best, best_flops = trial, flops
        if best is None:
            break
        w, current = best, best_flops
    return w


def _trials(
    cost: CostModel, w: np.ndarray, groups: list[int], allowed: dict[int, np.ndarray], gap: int, count: int
) -> list[np.ndarray]:
    """Width vectors one coarse step (larger than ``gap``) away from ``w``, largest steps first."""
    trials = []
    for down in (True, False):
        cands = _candidates(w, groups, allowed, down=down)
        sizes = _deltas(cost, w, cands)
        for j in [j for j in np.argsort(-sizes) if sizes[j] > gap][:count]:
            trial = w.copy()
            trial[cands[j][0]] = cands[j][1]
            trials.append(trial)
    return trials


def uniform_widths(
    cost: CostModel, groups: list[int], budget: int, round_to: int = 1, min_width: int = 1
) -> np.ndarray:
    """The largest uniform multiplier (by bisection) whose rounded widths fit ``budget``, topped up."""
    sizes = cost.sizes

    def widths_at(m: float) -> np.ndarray:
        w = cost.widths()
        for g in groups:
            opts = allowed_widths(int(sizes[g]), round_to, min_width)
            w[g] = opts[np.argmin(np.abs(opts - m * sizes[g]))]
        return w

    lo, hi = 0.0, 1.0
    if cost.flops(widths_at(hi)) <= budget:
        return widths_at(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost.flops(widths_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    flat = _cumulative({g: np.ones(int(sizes[g])) for g in groups})
    allowed = {g: allowed_widths(int(sizes[g]), round_to, min_width) for g in groups}
    return _add_back(cost, widths_at(lo), groups, allowed, flat, budget)
