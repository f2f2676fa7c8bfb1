"""The ``prune`` pass: remove the least important channels per FLOP until a FLOPs budget is met.

Also home of :class:`BudgetPass`, what ``prune`` and ``width`` share: score the free groups, choose
widths under the budget with the cost model, keep the best-scored channels, apply the plan.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import fx

from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.latency import LatencyBudget
from fxmorph.errors import InputError
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.passes.importance import CRITERIA, importance
from fxmorph.passes.keep import keep_best
from fxmorph.passes.protect import check_protect, free_group_ids
from fxmorph.passes.rounding import Grid, RoundTo
from fxmorph.passes.select import (
    DEFAULT_LATENCY_BALANCE,
    DEFAULT_MAX_PRUNE,
    DEFAULT_PARAM_COST,
    DEFAULT_ROUND_TO,
    greedy_widths,
)
from fxmorph.passes.select_latency import DEFAULT_PARAM_VALUES, latency_widths
from fxmorph.passes.uniform import width_classes
from fxmorph.surgery.apply import apply_plan

__all__ = ["BudgetPass", "PrunePass"]


@dataclass(frozen=True)
class BudgetPass(Pass):
    """Base of the passes that cut free groups down to ``budget_flops`` (does not preserve the function).

    Subclasses choose the widths (:meth:`choose`); which channels stay is decided by ``criterion``.
    """

    budget_flops: int
    criterion: str = "l1"
    round_to: RoundTo | Grid = DEFAULT_ROUND_TO
    min_width: int = 1
    protect: tuple[str, ...] = ()
    uniform_blocks: bool = False
    """Keep the groups playing one role in the model's repeated blocks at one width (see
    :mod:`fxmorph.passes.uniform`)."""
    latency: LatencyBudget | None = None
    """A latency budget to meet as well (the cost of a step is then its predicted microseconds)."""

    @abc.abstractmethod
    def choose(
        self, cost: CostModel, scores: Mapping[int, np.ndarray], classes: list[list[int]], budget: float
    ) -> np.ndarray:
        """The width of every group, with ``cost.spent`` under ``budget``; each of ``classes`` keeps one width."""

    def priced(self, cost: CostModel) -> tuple[CostModel, float]:
        """``cost`` priced in what the budget measures (FLOPs, or predicted latency and FLOPs), and the budget."""
        if self.latency is None:
            return cost, self.budget_flops
        return self.latency.priced(cost, self.budget_flops)

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """A known criterion, the data and loss ``taylor`` reads, and ``protect`` paths the model has."""
        if self.criterion not in CRITERIA:
            raise InputError(f"unknown criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}.")
        if self.criterion == "taylor" and (ctx.data is None or ctx.loss_fn is None):
            raise InputError("criterion='taylor' needs data and loss_fn: pass both, or use 'l1', 'l2' or 'bn_scale'.")
        check_protect(gm, self.protect)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cg = self.analyse(gm)
        cost, budget = self.priced(CostModel(cg))
        if cost.spent() <= budget:
            return PassResult(gm, False, note="budget already met")
        scores = importance(cg, self.criterion, data=ctx.data, loss_fn=ctx.loss_fn, seed=ctx.seed)
        free = free_group_ids(cg, self.protect)
        classes, free = width_classes(cg, free, self.uniform_blocks)
        widths = self.choose(cost, {g: scores[g] for g in free}, classes, budget)
        plan = keep_best(cg, widths, scores)
        changes = {g: (cg.groups[g].size, p.width) for g, p in plan.items()}
        note = f"FLOPs {cost.flops() / 1e9:.3f} G -> {cost.flops(widths) / 1e9:.3f} G"
        if self.latency is not None:
            note += f"; predicted latency {cost.spent() / 1e3:.2f} ms -> {cost.spent(widths) / 1e3:.2f} ms"
        if classes:
            note += f"; {sum(map(len, classes))} groups in {len(classes)} classes kept at one width"
        return PassResult(apply_plan(gm, cg, plan, seed=ctx.seed), bool(plan), changes, note, plan)


@dataclass(frozen=True)
class PrunePass(BudgetPass):
    """Remove channels, least important per FLOP saved first, until ``budget_flops`` is met.

    Importance comes from ``criterion`` (see :mod:`fxmorph.passes.importance`), aggregated over every
    member of a group and weighed against the FLOPs a channel saves, from the cost model and re-ranked
    as widths change (see :func:`~fxmorph.passes.select.greedy_widths`); once under the budget,
    channels are added back greedily while it still holds. Widths are on the rounding grid
    ``round_to`` (see :mod:`fxmorph.passes.rounding`), at least ``min_width``, and
    no group loses more than ``max_prune`` of its channels; ``balance`` weighs a group's remaining
    channels more the fewer they are, which keeps widths even where scores say little (``latency_balance`` under a
    latency budget, :data:`~fxmorph.passes.select.DEFAULT_LATENCY_BALANCE`); ``param_cost``
    counts what a parameter costs in FLOPs when ranking cuts (weight-bound layers give way first). Under a
    latency budget a step's parameters count beside its FLOPs, at each of ``param_values``, and the selection that
    keeps the most FLOPs while keeping at least the parameters a FLOPs budget keeps at the same latency is kept
    (:mod:`fxmorph.passes.select_latency`; one value: that selection).
    Does not preserve the function (it removes live channels); the mask oracle describes the result.

    Before/after (resnet50 with weights=None, ``budget_flops`` half of 8.18 GFLOPs, defaults):
    layer1.0.conv1 64 -> 32 channels, layer3.0.conv2 256 -> 176, layer3's residual group 1024 -> 768,
    layer4.0.conv2 512 -> 352, ...; FLOPs 8.178 G -> 4.089 G.
    """

    name: ClassVar[str] = "prune"
    preserves_function: ClassVar[bool] = False
    max_prune: float = DEFAULT_MAX_PRUNE
    balance: float = 1.0
    latency_balance: float = DEFAULT_LATENCY_BALANCE
    param_cost: float = DEFAULT_PARAM_COST
    param_values: tuple[float, ...] = DEFAULT_PARAM_VALUES

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Those of :class:`BudgetPass`, and at least one parameter value, none negative."""
        super().requires(gm, ctx)
        values = self.param_values
        if not values or any(not isinstance(v, int | float) or not v >= 0 for v in values):
            raise InputError(
                f"prune: param_values must be a non-empty tuple of numbers of 0 or more, got {values!r}: pass for "
                "example (0.08,)."
            )

    def choose(
        self, cost: CostModel, scores: Mapping[int, np.ndarray], classes: list[list[int]], budget: float
    ) -> np.ndarray:
        if self.latency is None:
            return self._widths(cost, scores, classes, budget, self.balance, self.param_cost)
        # the cuts of a FLOPs budget (as budget_flops makes them: no group removed whole), in FLOPs: what a latency
        # budget's cut must beat at the same latency
        flops = cost.priced(cost.flops_function)
        floor = max(self.min_width, 1)
        return latency_widths(
            cost,
            # a latency budget thins where the runtime spends its time, unevenly by design; it prices weights
            # itself (its tables time the weights' reads) and values them instead, at each of its values
            lambda value: self._widths(cost, scores, classes, budget, self.latency_balance, 0.0, value),
            lambda limit: self._widths(flops, scores, classes, limit, self.balance, self.param_cost, min_width=floor),
            budget,
            self.param_values,
        )

    def _widths(
        self,
        cost: CostModel,
        scores: Mapping[int, np.ndarray],
        classes: list[list[int]],
        budget: float,
        balance: float,
        param_cost: float,
        param_value: float = 0.0,
        min_width: int | None = None,
    ) -> np.ndarray:
        """:func:`~fxmorph.passes.select.greedy_widths` with this pass's grid and ``max_prune``, and its floor unless
        ``min_width`` is given."""
        return greedy_widths(
            cost,
            scores,
            budget,
            self.round_to,
            self.min_width if min_width is None else min_width,
            max_prune=self.max_prune,
            balance=balance,
            param_cost=param_cost,
            param_value=param_value,
            classes=classes,
        )
