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
from fxmorph.passes.uniform import coarse_cumulative, per_unit

__all__ = [
    "DEFAULT_MAX_PRUNE",
    "DEFAULT_PARAM_COST",
    "DEFAULT_ROUND_TO",
    "allowed_widths",
    "greedy_widths",
    "largest_multiplier",
    "smallest_widths",
    "uniform_widths",
]

DEFAULT_PARAM_COST = 50.0
"""What one parameter weighs against one FLOP when choosing which channels to cut. At batch 1,
onnxruntime's CPU kernels pay for reading weights as well as for arithmetic: a linear fit over the
convolutions of resnet50 and its pruned and narrowed variants gave about 2.2 us per MFLOP and
0.12 us per thousand parameters (50 to 55 FLOPs per parameter). Without it, a FLOPs budget cuts
vgg11_bn's 120 M-parameter classifier no more than its convolutions, and the model stays
weight-bound. The budget itself stays in FLOPs; this only orders the cuts."""

DEFAULT_ROUND_TO: RoundTo = AUTO
"""Default rounding: multiples of onnxruntime's CPU channel block (16) where the budget allows, finer
steps for narrow groups only when the budget needs them (see :mod:`fxmorph.passes.rounding`)."""

DEFAULT_MAX_PRUNE = 0.9
"""The share of its channels a group may lose by default, unless the budget needs more (see
``fxmorph.shrink``'s ``max_prune="auto"``)."""

Cumulative = Mapping[int, np.ndarray]


def allowed_widths(size: int, round_to: RoundTo | Grid, min_width: int, span: int = 1, copies: int = 1) -> np.ndarray:
    """Sorted allowed widths of a group of ``size`` elements of ``span`` channels, held ``copies`` times by one
    axis (``min_width`` in channels)."""
    floor = max(-(-min_width // span), 1)
    step = as_grid(round_to).step(size, span, copies)
    steps = np.arange(step, size + 1, step)
    steps = steps[steps >= floor]
    return np.unique(np.append(steps, size))


def _bounded(cost: Costs, g: int, round_to: RoundTo | Grid, min_width: int, max_prune: float) -> np.ndarray:
    size, span = int(cost.sizes[g]), int(cost.spans[g])
    floor = max(-(-min_width // span), int(np.ceil(size * (1.0 - max_prune))))
    return allowed_widths(size, round_to, floor * span, span, int(cost.copies[g]))


def smallest_widths(
    cost: Costs, groups: list[int], round_to: RoundTo | Grid, min_width: int, max_prune: float = 1.0
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


def _deltas(cost: Costs, w: np.ndarray, cands: list[tuple[int, int]]) -> np.ndarray:
    """What each candidate step changes of the budgeted resource (FLOPs, or predicted microseconds)."""
    if not cands:
        return np.zeros(0)
    return np.abs(cost.spent_steps(w, cands) - cost.spent(w)).astype(np.float64)


def _taken(cost: Costs, w: np.ndarray, cands: list[tuple[int, int]], saved: np.ndarray) -> np.ndarray:
    """What each candidate step takes of the model, in FLOPs: the FLOPs it changes, or where it changes none (an
    op priced by its memory alone) what it saves of the budgeted resource, ``saved`` (in FLOPs)."""
    if cost.spends_flops or not cands:
        return saved
    flops = np.abs(cost.flops_steps(w, cands) - cost.flops(w)).astype(np.float64)
    return np.where(flops > 0, flops, saved)


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
    normed: Cumulative, w: np.ndarray, cands: list[tuple[int, int]], taken: np.ndarray, weighed: np.ndarray
) -> np.ndarray:
    """Value per unit of weighed cost of each candidate step: the mean value of the channels it moves,
    times the FLOPs it takes of the model over its weighed cost (1 for a FLOPs budget without a parameter
    cost). A step that saves nothing is worth infinitely much (never cut, nothing gained by it).

    Under a latency budget a step's weighed cost is the time it saves, so of two steps whose channels score
    alike, the one that takes fewer FLOPs per microsecond goes first: the cut keeps the FLOPs that run fast on the
    runtime (wide kernels) and gives up those that run slow (thin and memory-bound ones)."""
    out = np.full(len(cands), np.inf)
    for j, (g, width) in enumerate(cands):
        lo, hi = sorted((width, int(w[g])))
        if taken[j] > 0 and weighed[j] > 0:
            out[j] = (normed[g][hi] - normed[g][lo]) / (hi - lo) * taken[j] / weighed[j]
    return out


def _ranked(
    cost: Costs,
    w: np.ndarray,
    groups: list[int],
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    param_cost: float,
    down: bool,
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """The next step of every group (down or up), what each changes of the budgeted resource, and its value per
    weighed cost."""
    cands = _candidates(w, groups, allowed, down=down)
    spent = _deltas(cost, w, cands)
    saved = spent * _flops_per_unit(cost, w)  # in FLOPs: the model's FLOPs per unit of the budgeted resource
    taken = _taken(cost, w, cands, saved)
    return cands, spent, _ratios(normed, w, cands, taken, _weighed(cost, w, cands, saved, param_cost))


def _cumulative(scores: Mapping[int, np.ndarray], balance: float = 0.0) -> dict[int, np.ndarray]:
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
    classes: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Remove the least important channels per FLOP saved until under ``budget``, then add back.

    A channel's value is its score over its group's mean score times the FLOPs one of the group's
    channels costs now, so a step's value per FLOP saved is the mean relative score of the channels
    it removes: on flat scores no group is cheaper to cut than another, and ``balance`` (a group's
    remaining channels weigh ``(size / rank) ** balance`` more, see ``_cumulative``) makes every
    group thin in proportion; uneven scores move the cuts to where they matter least. What a step
    saves also counts ``param_cost`` FLOPs per parameter (see :data:`DEFAULT_PARAM_COST`; 0 ranks by
    FLOPs alone), so weight-bound layers, which cost latency their FLOPs do not show, give way first;
    the budget is met in FLOPs all the same. Where ``cost`` is priced in another resource (a latency
    model), a step's value is weighed against what it saves of that resource instead: the steps that
    take the fewest FLOPs per microsecond saved go first. Each round takes the best steps down (one per group, all
    within 2% of the best ratio, covering at most ``step`` of the remaining gap) and re-ranks. No
    group loses more than ``max_prune`` of its channels. Once under the budget, steps up are added
    back greedily (most value per cost first) while the budget still holds, and while the result is
    more than 1% under the budget, coarse steps are traded for fine ones where that lands closer.

    Before the per-round limit and the current-cost values, every group took a step per
    round whatever its value and a channel kept the value of its original cost: convnext_tiny's stem
    stream went 96 -> 16 channels at half the FLOPs while its 384-wide MLP layers kept 288.

    Each of ``classes`` (groups of one size, see :mod:`fxmorph.passes.uniform`) keeps one width: its
    groups step together, saving their FLOPs summed, and a step's value per FLOP is the mean over the
    members of their relative scores (the value per FLOP of each member's own step).
    """
    normed = _cumulative(scores, balance)
    if not classes:
        return _greedy(cost, normed, budget, round_to, min_width, max_prune, step, param_cost)
    tied = cost.tied(classes)
    units = per_unit(tied, normed, lambda values: np.mean(values, axis=0), coarse_cumulative)
    return tied.expand(_greedy(tied, units, budget, round_to, min_width, max_prune, step, param_cost))


def _greedy(
    cost: Costs,
    normed: Cumulative,
    budget: float,
    round_to: RoundTo | Grid,
    min_width: int,
    max_prune: float,
    step: float,
    param_cost: float,
) -> np.ndarray:
    """:func:`greedy_widths` over the variables of ``cost`` valued by ``normed`` (cumulative values)."""
    groups = sorted(normed)
    allowed = {g: _bounded(cost, g, round_to, min_width, max_prune) for g in groups}
    remove = functools.partial(
        _remove, cost, allowed=allowed, normed=normed, budget=budget, step=step, param_cost=param_cost
    )
    add_back = functools.partial(_add_back, cost, allowed=allowed, normed=normed, budget=budget, param_cost=param_cost)
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
    slack: float = 0.02,
) -> np.ndarray:
    """Take steps down in ``groups``, best (importance lost / cost saved) first, until under budget.
    A round takes the best steps, up to ``step`` of the gap left, among those within ``slack`` of the
    best ratio, then re-ranks."""
    w = w.copy()
    current = cost.spent(w)
    while current > budget:
        cands, saved, ratios = _ranked(cost, w, groups, allowed, normed, param_cost, down=True)
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
            w[g] = width
            taken += saved[j]
            if taken >= target:
                break
        current = cost.spent(w)
    return w


def _add_back(
    cost: Costs,
    w: np.ndarray,
    groups: list[int],
    *,
    allowed: dict[int, np.ndarray],
    normed: Cumulative,
    budget: float,
    param_cost: float = 0.0,
) -> np.ndarray:
    """Take steps up, most importance per cost first, while the FLOPs budget holds: several per
    round while the room left is large, then one at a time."""
    w = w.copy()
    current = cost.spent(w)
    while True:
        cands, added, gains = _ranked(cost, w, groups, allowed, normed, param_cost, down=False)
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
        cands = _candidates(w, groups, allowed, down=down)
        sizes = _deltas(cost, w, cands)
        for j in [j for j in np.argsort(-sizes) if sizes[j] > gap][:count]:
            trial = w.copy()
            trial[cands[j][0]] = cands[j][1]
            trials.append(trial)
    return trials


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
    flat = _cumulative({g: np.ones(int(sizes[g])) for g in groups})
    allowed = {
        g: allowed_widths(int(sizes[g]), round_to, min_width, int(cost.spans[g]), int(cost.copies[g])) for g in groups
    }
    return _add_back(cost, widths_at(lo), groups, allowed=allowed, normed=flat, budget=budget)
