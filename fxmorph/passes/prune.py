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

from fxmorph.analysis import ChannelGraph
from fxmorph.cost import CostModel
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.passes.importance import importance
from fxmorph.passes.plans import keep_best
from fxmorph.passes.select import DEFAULT_PARAM_COST, DEFAULT_ROUND_TO, greedy_widths
from fxmorph.surgery.apply import apply_plan

__all__ = ["BudgetPass", "PrunePass", "free_group_ids"]


def free_group_ids(cg: ChannelGraph, protect: tuple[str, ...]) -> list[int]:
    """Free groups, minus those whose producing parameters live under a protected module prefix."""
    out = []
    for g in cg.free_groups:
        if protect and any(p.name.startswith(prefix) for p in g.producers for prefix in protect):
            continue
        out.append(g.id)
    return out


@dataclass(frozen=True)
class BudgetPass(Pass):
    """Base of the passes that cut free groups down to ``budget_flops`` (does not preserve the function).

    Subclasses choose the widths (:meth:`choose`); which channels stay is decided by ``criterion``.
    """

    budget_flops: int
    criterion: str = "l1"
    round_to: int = DEFAULT_ROUND_TO
    min_width: int = 1
    protect: tuple[str, ...] = ()

    @abc.abstractmethod
    def choose(self, cost: CostModel, scores: Mapping[int, np.ndarray]) -> np.ndarray:
        """The width of every group, under the budget."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cg = self.analyse(gm)
        cost = CostModel(cg)
        if cost.flops() <= self.budget_flops:
            return PassResult(gm, False, note="budget already met")
        scores = importance(cg, self.criterion, data=ctx.data, loss_fn=ctx.loss_fn, seed=ctx.seed)
        scores = {g: scores[g] for g in free_group_ids(cg, self.protect)}
        widths = self.choose(cost, scores)
        plan = keep_best(cg, widths, scores)
        changes = {g: (cg.groups[g].size, p.width) for g, p in plan.items()}
        note = f"FLOPs {cost.flops() / 1e9:.3f} G -> {cost.flops(widths) / 1e9:.3f} G"
        return PassResult(apply_plan(gm, cg, plan, seed=ctx.seed), bool(plan), changes, note, plan)


@dataclass(frozen=True)
class PrunePass(BudgetPass):
    """Remove channels, least important per FLOP saved first, until ``budget_flops`` is met.

    Importance comes from ``criterion`` (see :mod:`fxmorph.passes.importance`), aggregated over every
    member of a group and weighed against the FLOPs a channel saves, from the cost model and re-ranked
    as widths change (see :func:`~fxmorph.passes.select.greedy_widths`); once under the budget,
    channels are added back greedily while it still holds. Widths are
    multiples of ``round_to`` (groups smaller than that keep their size), at least ``min_width``, and
    no group loses more than ``max_prune`` of its channels; ``balance`` weighs a group's remaining
    channels more the fewer they are, which keeps widths even where scores say little; ``param_cost``
    counts what a parameter costs in FLOPs when ranking cuts (weight-bound layers give way first).
    Does not preserve the function (it removes live channels); the mask oracle describes the result.

    Before/after (resnet50 with weights=None, ``budget_flops`` half of 8.18 GFLOPs, defaults):
    layer1.0.conv1 64 -> 32 channels, layer3.0.conv2 256 -> 176, layer3's residual group 1024 -> 768,
    layer4.0.conv2 512 -> 352, ...; FLOPs 8.178 G -> 4.089 G.
    """

    name: ClassVar[str] = "prune"
    preserves_function: ClassVar[bool] = False
    max_prune: float = 0.9
    balance: float = 1.0
    param_cost: float = DEFAULT_PARAM_COST

    def choose(self, cost: CostModel, scores: Mapping[int, np.ndarray]) -> np.ndarray:
        return greedy_widths(
            cost, scores, self.budget_flops, self.round_to, self.min_width, max_prune=self.max_prune,
            balance=self.balance, param_cost=self.param_cost,
        )  # fmt: skip
