"""``fxmorph.shrink``: a physically smaller model that meets a FLOPs budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import fx, nn

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.budget import parse_any_budget, parse_budget
from fxmorph.cost import CostModel
from fxmorph.counting import count_params
from fxmorph.errors import BudgetError, InputError
from fxmorph.passes.base import Pass, PassContext, Pipeline
from fxmorph.passes.importance import CRITERIA
from fxmorph.passes.prune import PrunePass, free_group_ids
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.passes.select import DEFAULT_ROUND_TO, smallest_widths
from fxmorph.passes.width import WidthPass
from fxmorph.report import GroupRow, ShrinkReport
from fxmorph.trace import FLOPS_KEY, UNREACHED_KEY, as_inputs, trace

__all__ = ["REPORT_KEY", "STRATEGIES", "shrink"]

logger = logging.getLogger(__name__)

REPORT_KEY = "fxmorph.report"
STRATEGIES = ("prune", "width")


def _passes(strategy: str, budget: int, criterion: str, round_to: int, min_width: int, max_prune: float,
            protect: tuple[str, ...], calibrate: bool) -> list[Pass]:  # fmt: skip
    options = {"criterion": criterion, "round_to": round_to, "min_width": min_width, "protect": protect}
    cut = PrunePass(budget, max_prune=max_prune, **options) if strategy == "prune" else WidthPass(budget, **options)
    return [RemoveDeadPass(calibrate=calibrate), cut]


def _check_reachable(
    cg: ChannelGraph, budget: int, round_to: int, min_width: int, max_prune: float, protect: tuple[str, ...]
) -> None:
    cost = CostModel(cg)
    if budget >= cost.flops():
        return
    groups = free_group_ids(cg, protect)
    smallest = cost.flops(smallest_widths(cost, groups, round_to, min_width, max_prune))
    if budget < smallest:
        share = 100 * smallest / cost.flops()
        raise BudgetError(
            f"budget {budget:,} FLOPs is below what this model can reach: the smallest is {smallest:,} FLOPs "
            f"({share:.1f}% of {cost.flops():,}), with every free group at its minimum width "
            f"(round_to={round_to}, min_width={min_width}, max_prune={max_prune}) and "
            f"{len(cg.groups) - len(cg.free_groups)} pinned group(s) unchanged. Raise the budget, or lower "
            "round_to/min_width, or raise max_prune."
        )


def _group_rows(cg: ChannelGraph, new: nn.Module) -> list[GroupRow]:
    rows = []
    tensors = dict(new.named_parameters()) | dict(new.named_buffers())
    for g in cg.groups:
        if g.pins and not g.params:
            continue
        after = g.size
        for m in g.params:
            pieces = cg.layout_groups(cg.bindings[(m.name, m.dim)].layout)
            if m.name in tensors and all(gid == g.id for gid, _ in pieces):
                after = tensors[m.name].shape[m.dim] // sum(inner for _, inner in pieces)
                break
        made_by = ", ".join(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in g.producers)) or "-"
        rows.append(GroupRow(g.id, made_by[:60], g.size, after, g.pinned))
    return rows


def shrink(
    model: nn.Module,
    budget_flops: float | int | str,
    example_inputs: Any,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    criterion: str = "l1",
    strategy: str = "prune",
    round_to: int = DEFAULT_ROUND_TO,
    min_width: int = 1,
    max_prune: float = 0.9,
    protect: Sequence[str] = (),
    calibrate: bool = False,
    seed: int = 0,
    leaf_modules: Iterable[type | str] = (),
    return_report: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, ShrinkReport]:
    """Return a physically smaller copy of ``model`` whose FLOPs meet ``budget_flops``.

    Args:
        model: the model; never modified.
        budget_flops: absolute FLOPs (a number > 1), a fraction of the model's FLOPs (0 < x <= 1), or a
            string: ``"50%"``, ``"1.2G"``, ``"3.5e8"``. With ``strategy="width"`` it may be above the
            model's FLOPs (``"150%"``): the multiplier then goes above 1 and the model grows.
        example_inputs: a tensor or tuple of tensors the model accepts.
        data, loss_fn: batches of ``(inputs, targets)`` and a loss, for ``criterion="taylor"``.
        calibrate: with ``data``, also remove channels that are exactly zero at every layer reading
            them on every batch (ReLU channels that never fire).
        criterion: ``"l1"`` (default), ``"l2"``, ``"bn_scale"``, ``"taylor"`` or ``"random"``.
        strategy: ``"prune"`` (importance per FLOP, global; default) or ``"width"`` (one multiplier).
        round_to: widths are multiples of this (16 keeps onnxruntime's blocked CPU kernels fast; 1 hits
            the budget most precisely). Groups smaller than ``round_to`` keep their width.
        min_width: no group goes below this many channels.
        max_prune: no group loses more than this share of its channels (``strategy="prune"``).
        protect: module path prefixes whose groups are left alone.
        seed: seeds the random criterion and the values of any new tensors; same seed, same model.
        return_report: also return the :class:`~fxmorph.report.ShrinkReport` (always available as
            ``result.meta["fxmorph.report"]``).

    Raises:
        BudgetError: the budget cannot be parsed, is out of range, or is below the smallest reachable.
        InputError, TraceError: bad model or inputs.
    """
    start = time.perf_counter()
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion '{criterion}': choose one of {', '.join(CRITERIA)}.")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}.")
    if not (isinstance(round_to, int) and isinstance(min_width, int)) or round_to < 1 or min_width < 1:
        raise InputError("round_to and min_width must be positive integers.")
    if criterion == "taylor" and (data is None or loss_fn is None):
        raise InputError("criterion='taylor' needs data and loss_fn: pass both, or use 'l1', 'l2' or 'bn_scale'.")
    if not 0.0 < max_prune <= 1.0:
        raise InputError(f"max_prune must lie in (0, 1], got {max_prune}.")
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    budget = (parse_any_budget if strategy == "width" else parse_budget)(budget_flops, gm.meta[FLOPS_KEY])
    cg = build_channel_graph(gm)
    protect = tuple(protect)
    _check_reachable(cg, budget, round_to, min_width, max_prune if strategy == "prune" else 1.0, protect)
    ctx = PassContext(inputs, data=data, loss_fn=loss_fn, seed=seed)
    if calibrate and data is None:
        raise InputError("calibrate=True needs data: pass batches of (inputs, targets).")
    passes = _passes(strategy, budget, criterion, round_to, min_width, max_prune, protect, calibrate)
    result = Pipeline(passes)(gm, ctx)
    small = result.gm
    small.train(model.training)
    settings = {"criterion": criterion, "strategy": strategy, "round_to": round_to, "min_width": min_width,
                "max_prune": max_prune, "protect": list(protect), "calibrate": calibrate, "seed": seed}  # fmt: skip
    report = ShrinkReport(
        budget_flops=budget,
        flops_before=gm.meta[FLOPS_KEY],
        flops_after=small.meta[FLOPS_KEY],
        params_before=count_params(model),
        params_after=count_params(small),
        seconds=time.perf_counter() - start,
        groups=_group_rows(cg, small),
        passes=result.records,
        dropped_modules=gm.meta.get(UNREACHED_KEY, ()),
        settings=settings,
    )
    small.meta[REPORT_KEY] = report
    logger.info("shrink: %s", report.table().splitlines()[0])
    return (small, report) if return_report else small
