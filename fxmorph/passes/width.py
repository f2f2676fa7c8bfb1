"""The ``width`` pass: one uniform width multiplier for every free group (MorphNet's expand step)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fxmorph.cost import CostModel
from fxmorph.passes.prune import BudgetPass
from fxmorph.passes.select import uniform_widths

__all__ = ["WidthPass"]


@dataclass(frozen=True)
class WidthPass(BudgetPass):
    """Scale every free group by one multiplier ``w <= 1``, the largest whose widths fit the budget.

    ``width_g = round(w * size_g)`` to a multiple of ``round_to``, per group (never per layer, so tied
    layers agree); ``w`` is found by bisection on the cost model, then groups are topped up greedily
    while the budget holds, which lands within one rounding unit. Which channels go is decided by
    ``criterion``. Does not preserve the function.

    Before/after (resnet18 at half the FLOPs): every group at about 0.7 of its width.
    """

    name: ClassVar[str] = "width"
    preserves_function: ClassVar[bool] = False

    def choose(self, cost: CostModel, scores: Mapping[int, np.ndarray]) -> np.ndarray:
        return uniform_widths(cost, list(scores), self.budget_flops, self.round_to, self.min_width)
