"""Cutting a captured model to its budgets: the checked pipeline ``remove-dead -> prune | width``, under the limits
:func:`~fxmorph.api.limits.cut_limits` resolves, and with ``factorize`` the rounds that split layers first and merge
back the pairs pruning left dearer than one layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import fx

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.latency import LatencyBudget
from fxmorph.api.limits import Limits, cut_limits
from fxmorph.api.options import ShrinkOptions
from fxmorph.errors import BudgetError, InputError, PassError
from fxmorph.meta import FACTORS_KEY
from fxmorph.passes.base import Pass, PassContext, Pipeline, PipelineResult
from fxmorph.passes.factorize import FactorizePass
from fxmorph.passes.merge_factors import MergeFactorsPass
from fxmorph.passes.remove_dead import RemoveDeadPass

__all__ = ["FACTOR_ROUNDS", "Cut", "best_cut", "run_pipeline"]

logger = logging.getLogger(__name__)


def _factorize(gm: fx.GraphModule, inputs: tuple[Any, ...], factorize: bool | tuple[str, ...]) -> PipelineResult:
    """``gm`` with the layers ``factorize`` names split by :class:`FactorizePass` (checked)."""
    if factorize is False or factorize == ():
        return PipelineResult(gm, [])
    targets = () if factorize is True else factorize
    return run_pipeline([FactorizePass(targets)], gm, PassContext(inputs))


FACTOR_ROUNDS = 3
"""How often shrink(factorize=...) prunes again without the pairs pruning left dearer than one layer."""


def _factor_paths(gm: fx.GraphModule) -> list[str]:
    return list(gm.meta.get(FACTORS_KEY, {}))


@dataclass(frozen=True)
class Cut:
    """One round of shrink: the channel graph of the model it cut, the factorizing pipeline before the
    cut, the cutting pipeline and the limits it cut under."""

    cg: ChannelGraph
    split: PipelineResult
    result: PipelineResult
    limits: Limits


def _cut(
    split: PipelineResult,
    inputs: tuple[Any, ...],
    data: Any,
    options: ShrinkOptions,
    budget: int,
    latency: LatencyBudget | None,
) -> Cut:
    """The checked pipeline that cuts ``split.gm`` to ``budget`` FLOPs and ``latency`` (merging factor pairs back
    when it was factorized), with the limits it cut under."""
    cg = build_channel_graph(split.gm)
    limits = cut_limits(cg, budget, options, latency)
    ctx = PassContext(inputs, data=data, loss_fn=options.loss_fn, seed=options.seed)
    passes: list[Pass] = [
        RemoveDeadPass(calibrate=options.calibrate, uniform_blocks=options.uniform_blocks),
        options.cut_pass(budget, limits.grid, limits.max_prune, latency),
    ]
    passes += [MergeFactorsPass()] if split.records else []
    return Cut(cg, split, run_pipeline(passes, split.gm, ctx), limits)


def best_cut(
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    data: Any,
    options: ShrinkOptions,
    budget: int,
    latency: LatencyBudget | None = None,
) -> Cut:
    """The cut of ``gm`` to ``budget`` FLOPs (and ``latency``); with ``factorize``, the last of up to
    :data:`FACTOR_ROUNDS` rounds, each without the pairs the previous round left dearer than one layer."""
    rounds = 1 if options.factorize in (False, ()) else FACTOR_ROUNDS
    targets = options.factorize
    best: Cut | None = None
    for _ in range(rounds):
        split = _factorize(gm, inputs, targets)
        try:
            cut = _cut(split, inputs, data, options, budget, latency)
        except BudgetError:
            if best is not None:
                break  # fewer layers split cannot reach the budget: keep the last round's result
            if not split.records or targets == ():
                raise  # the model itself cannot reach the budget
            # the split layers' rank groups cannot thin enough (round_to, min_width): try those layers whole
            logger.info("shrink: the factorized model cannot reach the budget; pruning the layers whole")
            targets = ()
            continue
        best = cut
        still_split = _factor_paths(cut.result.gm)
        if still_split == _factor_paths(split.gm):
            break
        # Pairs that pruning left dearer than their product were merged, so the model is under the
        # budget: prune again with those layers whole, so that the budget goes to channels that pay.
        targets = tuple(still_split)
        logger.info(
            "shrink: %d factorized pair(s) cost more than one layer; pruning again without them",
            len(_factor_paths(split.gm)) - len(still_split),
        )
    assert best is not None  # the first round either returned a cut or raised
    return best


def run_pipeline(
    passes: list[Pass], gm: fx.GraphModule, ctx: PassContext, *, copy_model: bool = False
) -> PipelineResult:
    """The checked pipeline of ``passes`` on ``gm``; a failure caused by the user's input (a loss that is
    not a scalar, a factorize target that names no layer, a pass's precondition on what the user passed)
    is raised as that InputError or BudgetError.

    No defensive copy up front by default: factorize copies before it rewrites, and remove-dead, prune
    and width build new tensors through surgery and never write to the model they receive, so only a
    result that still shares storage with the user's model (nothing changed) is copied. That keeps huge
    models at the original plus the smaller copy."""
    try:
        return Pipeline(passes)(gm, ctx, copy_model=copy_model)
    except PassError as exc:
        if isinstance(exc.__cause__, InputError | BudgetError):
            raise exc.__cause__ from None
        raise
