"""The ``width`` pass: one uniform width multiplier for every free group (MorphNet's expand step)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import fx

from fxmorph.analysis.cost import CostModel
from fxmorph.meta import FLOPS_KEY
from fxmorph.passes.base import PassContext, PassResult
from fxmorph.passes.grow import grow_candidates, grow_to_widths
from fxmorph.passes.grow_probe import take_batches
from fxmorph.passes.grow_select import uniform_grow_widths
from fxmorph.passes.prune import BudgetPass
from fxmorph.passes.select import uniform_widths

__all__ = ["WidthPass"]


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
    preserves the function at the moment of growth.

    Before/after (resnet18 at half the FLOPs): every group at about 0.7 of its width. At 1.5 times
    the FLOPs: every growable group at about 1.2 times its width, same outputs.
    """

    name: ClassVar[str] = "width"
    preserves_function: ClassVar[bool] = False
    init: str = "auto"
    max_factor: float = 4.0

    def choose(self, cost: CostModel, scores: Mapping[int, np.ndarray]) -> np.ndarray:
        return uniform_widths(cost, list(scores), self.budget_flops, self.round_to, self.min_width)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        flops = gm.meta.get(FLOPS_KEY)
        if flops is None or self.budget_flops <= flops:
            return super().call(gm, ctx)
        cg = self.analyse(gm)
        cost = CostModel(cg)
        groups, skipped = grow_candidates(cg, self.protect)
        widths = uniform_grow_widths(cost, groups, self.budget_flops, self.round_to, self.max_factor)
        batches = take_batches(ctx.data, 4) if ctx.loss_fn is not None else []
        result = grow_to_widths(gm, cg, widths, ctx, init=self.init, batches=batches, skipped=skipped)
        note = f"FLOPs {cost.flops() / 1e9:.3f} G -> {cost.flops(widths) / 1e9:.3f} G; {result.note}"
        return PassResult(result.gm, result.modified, result.changes, note, result.plan)
