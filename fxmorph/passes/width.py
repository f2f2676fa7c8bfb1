"""The ``width`` pass: one uniform width multiplier for every free group (MorphNet's expand step).

What it shares with the other passes it reads from the modules that own it: the cut (score, choose,
keep, apply) from :class:`~fxmorph.passes.prune.BudgetPass`, the groups it may change from
:mod:`fxmorph.passes.protect`, the widths from :mod:`fxmorph.passes.select` (below the model's FLOPs)
and :mod:`fxmorph.passes.grow_select` (above them), and function-preserving growth from
:func:`fxmorph.passes.grow.grow_to_widths`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import fx

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel, Costs
from fxmorph.errors import BudgetError
from fxmorph.meta import FLOPS_KEY
from fxmorph.passes.base import PassContext, PassResult
from fxmorph.passes.grow import grow_to_widths
from fxmorph.passes.grow_probe import take_batches
from fxmorph.passes.grow_select import max_grow_flops, uniform_grow_widths
from fxmorph.passes.protect import grow_candidates
from fxmorph.passes.prune import BudgetPass
from fxmorph.passes.rounding import Grid, RoundTo, as_grid
from fxmorph.passes.select_uniform import uniform_widths
from fxmorph.passes.uniform import in_units, width_classes

__all__ = ["MAX_FACTOR", "WidthPass", "width_reach"]

MAX_FACTOR = 4.0
"""The most ``width`` widens a group above the model's FLOPs (a multiple of its width)."""


def width_reach(
    cg: ChannelGraph, round_to: RoundTo | Grid, protect: Sequence[str] = (), max_factor: float = MAX_FACTOR
) -> int:
    """The most FLOPs ``width`` can grow the model of ``cg`` to (every growable group at ``max_factor``
    times its width)."""
    groups, _ = grow_candidates(cg, protect)
    return max_grow_flops(CostModel(cg), groups, round_to, max_factor)


@dataclass(frozen=True)
class WidthPass(BudgetPass):
    """Scale every free group by one multiplier ``w``, the largest whose widths fit the budget.

    ``width_g = round(w * size_g)`` to a multiple of ``round_to``, per group (never per layer, so tied
    layers agree); ``w`` is found by bisection on the cost model, then groups are topped up greedily
    while the budget holds, which lands within one rounding unit.

    Below the model's FLOPs, ``w <= 1``: which channels go is decided by ``criterion``; does not
    preserve the function. Above them, ``w > 1`` over the growable groups (at most ``max_factor``):
    the channels are added by growth with ``init`` (see :mod:`fxmorph.passes.grow_init`; ``"auto"``
    splits channels Net2Net-style without data, and uses the gradient with ``ctx.data``), which
    preserves the function at the moment of growth (:meth:`promises_function` says so for that case
    only, and the Pipeline checks it). A budget above what ``max_factor`` reaches is refused by
    :meth:`requires`.

    Before/after (resnet18 at half the FLOPs): every group at about 0.7 of its width. At 1.5 times
    the FLOPs: every growable group at about 1.2 times its width, same outputs.
    """

    name: ClassVar[str] = "width"
    preserves_function: ClassVar[bool] = False
    init: str = "auto"
    max_factor: float = MAX_FACTOR

    def _grows(self, gm: fx.GraphModule) -> bool:
        flops = gm.meta.get(FLOPS_KEY)
        return flops is not None and self.budget_flops > flops

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Those of :class:`BudgetPass`; above the model's FLOPs, a budget ``max_factor`` reaches."""
        super().requires(gm, ctx)
        if not self._grows(gm):
            return
        flops = gm.meta[FLOPS_KEY]
        most = width_reach(self.analyse(gm), self.round_to, self.protect, self.max_factor)
        if self.budget_flops > most:
            raise BudgetError(
                f"budget {self.budget_flops:,} FLOPs is above what strategy='width' can reach: {most:,} FLOPs "
                f"({100 * most / flops:.0f}% of the model's {flops:,}) with every growable group at "
                f"{self.max_factor:g}x its width ({as_grid(self.round_to).describe()}). Lower the budget, or use "
                "fxmorph.grow(..., max_factor=...) to grow further."
            )

    def promises_function(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        """Growing (a budget above the model's FLOPs) keeps the function; cutting does not."""
        return self._grows(gm)

    def choose(
        self, cost: CostModel, scores: Mapping[int, np.ndarray], classes: list[list[int]], budget: float
    ) -> np.ndarray:
        def widths(costs: Costs, variables: list[int], _: object) -> np.ndarray:
            return uniform_widths(costs, variables, budget, self.round_to, self.min_width)

        return in_units(cost, classes, list(scores), widths)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self._grows(gm):
            return super().call(gm, ctx)
        cg = self.analyse(gm)
        cost = CostModel(cg)
        groups, skipped = grow_candidates(cg, self.protect)
        classes, groups = width_classes(cg, groups, self.uniform_blocks)

        def grown(costs: Costs, variables: list[int], _: object) -> np.ndarray:
            return uniform_grow_widths(costs, variables, self.budget_flops, self.round_to, self.max_factor)

        widths = in_units(cost, classes, groups, grown)
        # Gradient-chosen values need a loss; without one, growth splits channels (no data read).
        batches = take_batches(ctx.data, 4) if ctx.loss_fn is not None else []
        result = grow_to_widths(gm, cg, widths, ctx, init=self.init, batches=batches, skipped=skipped)
        note = f"FLOPs {cost.flops() / 1e9:.3f} G -> {cost.flops(widths) / 1e9:.3f} G; {result.note}"
        return PassResult(result.gm, result.modified, result.changes, note, result.plan)
