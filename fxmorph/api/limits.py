"""The limits a cut works under: the rounding grid and the share of its channels a group may lose.

:func:`cut_limits` resolves ``round_to="auto"`` and ``max_prune="auto"`` to the first setting, in order of speed,
under which the budget (FLOPs, or a latency budget as its model predicts it) can be reached, and names what is out
of reach in a :class:`~fxmorph.errors.BudgetError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.latency import LatencyBudget
from fxmorph.api.options import ShrinkOptions
from fxmorph.errors import BudgetError
from fxmorph.passes.protect import free_group_ids
from fxmorph.passes.rounding import AUTO, AUTO_GRIDS, Grid, as_grid
from fxmorph.passes.select import DEFAULT_MAX_PRUNE, smallest_widths
from fxmorph.passes.uniform import width_classes

__all__ = ["Limits", "cut_limits"]


@dataclass(frozen=True)
class Limits:
    """The rounding grid and the most a group may lose that a cut uses, once ``"auto"`` is resolved."""

    grid: Grid
    max_prune: float

    def describe(self) -> str:
        """For reports: the grid, and the share of channels a group could lose."""
        if self.max_prune >= 1.0:
            return f"{self.grid.describe()}; groups may lose any share of their channels (min_width binds)"
        return f"{self.grid.describe()}; a group keeps at least {100 * (1 - self.max_prune):.0f}% of its channels"


def cut_limits(cg: ChannelGraph, budget: int, options: ShrinkOptions, latency: LatencyBudget | None = None) -> Limits:
    """The grid and ``max_prune`` to cut with: the first, in order of speed, under which the budget can be
    reached. ``round_to="auto"`` tries the grids of :data:`AUTO_GRIDS`; ``max_prune="auto"`` tries
    :data:`DEFAULT_MAX_PRUNE`, then any share (only ``min_width`` binds) once no grid reaches the budget.
    Explicit values are hard limits. Raises BudgetError when nothing allowed reaches the budget (a budget
    above the model's FLOPs is the width pass's to check, in its ``requires``)."""
    round_to, max_prune, min_width = options.round_to, options.max_prune, options.floor
    grids = AUTO_GRIDS if round_to == AUTO else (as_grid(round_to),)
    if options.strategy == "width":  # one multiplier for every group: max_prune does not apply
        prunes: tuple[float, ...] = (1.0,)
    else:
        prunes = (DEFAULT_MAX_PRUNE, 1.0) if max_prune == AUTO else (float(max_prune),)
    cost: CostModel = CostModel(cg)
    target: float = budget
    if latency is not None:
        cost, target = latency.priced(cost, budget)
    if target >= cost.spent():
        return Limits(grids[0], prunes[0])
    groups = free_group_ids(cg, options.protect)
    # a class with a group that cannot change keeps its width everywhere
    groups = width_classes(cg, groups, options.uniform_blocks)[1]
    smallest = 0.0
    for share in prunes:
        for grid in grids:
            smallest = cost.spent(smallest_widths(cost, groups, grid, min_width, share))
            if smallest <= target:
                return Limits(grid, share)
    # ``smallest`` is now the finest grid's and the loosest share's: the least the model can reach.
    if latency is not None:
        raise _unreachable_latency(target, smallest, cost.spent(), f"{_settings(options)} and {_pinned(cg)}")
    raise BudgetError(
        f"budget {budget:,} FLOPs is below what this model can reach: the smallest is {int(smallest):,} FLOPs "
        f"({100 * smallest / cost.flops():.1f}% of {cost.flops():,}), with every free group at its minimum width "
        f"({_settings(options)}) and {_pinned(cg)}. Raise the budget, or lower round_to/min_width, or raise max_prune."
    )


def _settings(options: ShrinkOptions) -> str:
    return f"round_to={options.round_to!r}, min_width={options.floor}, max_prune={options.max_prune!r}"


def _pinned(cg: ChannelGraph) -> str:
    return f"{len(cg.groups) - len(cg.free_groups)} pinned group(s) unchanged"


def _unreachable_latency(target: float, smallest: float, whole: float, limits: str) -> BudgetError:
    """The error of a latency cut aiming below the smallest predicted latency (all in microseconds)."""
    return BudgetError(
        f"the latency cut aims at {target / 1e3:.3g} ms, below what this model can reach: the smallest is predicted "
        f"at {smallest / 1e3:.3g} ms ({100 * smallest / whole:.1f}% of {whole / 1e3:.3g} ms; with budget_flops too, "
        f"the lower of the two binds), with every free group at its minimum width ({limits}). Raise the budget, or "
        "lower round_to/min_width, or raise max_prune."
    )
