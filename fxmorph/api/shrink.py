"""``fxmorph.shrink``: a physically smaller model that meets a FLOPs budget."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.api.budget import parse_any_budget, parse_budget
from fxmorph.api.report import GroupRow, ShrinkReport
from fxmorph.capture.counting import count_params
from fxmorph.capture.trace import as_inputs, trace
from fxmorph.errors import BudgetError, InputError, PassError
from fxmorph.meta import FACTORS_KEY, FLOPS_KEY, REPORT_KEY, UNREACHED_KEY
from fxmorph.passes.base import Pass, PassContext, Pipeline, PipelineResult
from fxmorph.passes.factorize import FactorizePass
from fxmorph.passes.grow import grow_candidates
from fxmorph.passes.grow_select import max_grow_flops
from fxmorph.passes.importance import CRITERIA
from fxmorph.passes.merge_factors import MergeFactorsPass
from fxmorph.passes.prune import PrunePass, free_group_ids
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.passes.rounding import AUTO, AUTO_GRIDS, Grid, RoundTo, as_grid, check_round_to
from fxmorph.passes.select import DEFAULT_MAX_PRUNE, DEFAULT_PARAM_COST, DEFAULT_ROUND_TO, smallest_widths
from fxmorph.passes.width import WidthPass
from fxmorph.validate import (
    check_callable,
    check_data,
    check_first_batch,
    check_number,
    check_prefixes,
    check_seed,
)

__all__ = ["REPORT_KEY", "STRATEGIES", "shrink", "width_reach"]

logger = logging.getLogger(__name__)

STRATEGIES = ("prune", "width")


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


def _passes(strategy: str, budget: int, criterion: str, limits: Limits, min_width: int, protect: tuple[str, ...],
            calibrate: bool, param_cost: float) -> list[Pass]:  # fmt: skip
    options = {"criterion": criterion, "round_to": limits.grid, "min_width": min_width, "protect": protect}
    cut = (PrunePass(budget, max_prune=limits.max_prune, param_cost=param_cost, **options) if strategy == "prune"
           else WidthPass(budget, **options))  # fmt: skip
    return [RemoveDeadPass(calibrate=calibrate), cut]


def width_reach(cg: ChannelGraph, round_to: RoundTo | Grid, protect: tuple[str, ...]) -> int:
    """The most FLOPs ``strategy="width"`` can grow the model of ``cg`` to (every growable group at
    ``max_factor`` times its width)."""
    groups, _ = grow_candidates(cg, protect)
    return max_grow_flops(CostModel(cg), groups, round_to, WidthPass.max_factor)


def _limits(cg: ChannelGraph, budget: int, strategy: str, round_to: RoundTo, min_width: int,
            max_prune: float | str, protect: tuple[str, ...]) -> Limits:  # fmt: skip
    """The grid and ``max_prune`` to cut with: the first, in order of speed, under which the budget can be
    reached. ``round_to="auto"`` tries the grids of :data:`AUTO_GRIDS`; ``max_prune="auto"`` tries
    :data:`DEFAULT_MAX_PRUNE`, then any share (only ``min_width`` binds) once no grid reaches the budget.
    Explicit values are hard limits. Raises BudgetError when nothing allowed reaches the budget."""
    grids = AUTO_GRIDS if round_to == AUTO else (as_grid(round_to),)
    if strategy == "width":  # one multiplier for every group: max_prune does not apply
        prunes: tuple[float, ...] = (1.0,)
    else:
        prunes = (DEFAULT_MAX_PRUNE, 1.0) if max_prune == AUTO else (float(max_prune),)
    cost = CostModel(cg)
    if budget >= cost.flops():
        _check_growth_reach(cg, budget, strategy, grids[0], protect)
        return Limits(grids[0], prunes[0])
    groups = free_group_ids(cg, protect)
    smallest = 0
    for share in prunes:
        for grid in grids:
            smallest = cost.flops(smallest_widths(cost, groups, grid, min_width, share))
            if smallest <= budget:
                return Limits(grid, share)
    # ``smallest`` is now the finest grid's and the loosest share's: the least the model can reach.
    raise BudgetError(
        f"budget {budget:,} FLOPs is below what this model can reach: the smallest is {smallest:,} FLOPs "
        f"({100 * smallest / cost.flops():.1f}% of {cost.flops():,}), with every free group at its minimum width "
        f"(round_to={round_to!r}, min_width={min_width}, max_prune={max_prune!r}) and "
        f"{len(cg.groups) - len(cg.free_groups)} pinned group(s) unchanged. Raise the budget, or lower "
        "round_to/min_width, or raise max_prune."
    )


def _check_growth_reach(cg: ChannelGraph, budget: int, strategy: str, grid: Grid, protect: tuple[str, ...]) -> None:
    """``strategy="width"`` above the model's FLOPs grows every group by one multiplier, up to a limit."""
    flops = CostModel(cg).flops()
    if strategy == "width" and budget > flops and budget > (most := width_reach(cg, grid, protect)):
        raise BudgetError(
            f"budget {budget:,} FLOPs is above what strategy='width' can reach: {most:,} FLOPs "
            f"({100 * most / flops:.0f}% of the model's {flops:,}) with every growable group at "
            f"{WidthPass.max_factor:g}x its width ({grid.describe()}). Lower the budget, or use "
            "fxmorph.grow(..., max_factor=...) to grow further."
        )


def _check_options(criterion: Any, strategy: Any, round_to: Any, min_width: Any, max_prune: Any,
                   loss_fn: Any) -> None:  # fmt: skip
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r}: choose one of {', '.join(CRITERIA)}.")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    if not check_round_to(round_to):
        raise InputError(f"round_to must be 'auto' or a positive integer, got round_to={round_to!r}.")
    if isinstance(min_width, bool) or not isinstance(min_width, int) or min_width < 1:
        raise InputError(f"min_width must be a positive integer, got min_width={min_width!r}.")
    if not (isinstance(max_prune, str) and max_prune == AUTO):
        check_number("max_prune", max_prune, low=0.0, high=1.0, open_low=True)
    check_callable("loss_fn", loss_fn)


def _check_data(model: nn.Module, data: Any, loss_fn: Any, criterion: str, strategy: str, calibrate: bool,
                rounds: int) -> Any:  # fmt: skip
    """The data to use (checked: iterable, not empty, its first batch runs through the model); pruning
    may run ``rounds`` times (``factorize``), each reading the data."""
    cut = data is not None and (criterion == "taylor" or (strategy == "width" and loss_fn is not None))
    if not (cut or calibrate):
        return data
    data, first = check_data(data, "shrink", reads=(int(cut) + int(calibrate)) * rounds)
    needs = ("reads the gradients of the model's parameters (criterion='taylor'); use criterion='l1' without "
             "them" if criterion == "taylor" else "grows with gradients (data and loss_fn given)")  # fmt: skip
    check_first_batch(model, first, "shrink", pair=cut, loss_fn=loss_fn if cut else None, needs=needs)
    return data


def _check_result(flops: int, budget: int) -> None:
    """The postcondition of shrink: the result is at most the budget (never a wrong model, silently)."""
    if flops > budget:
        raise BudgetError(
            f"shrink did not meet the budget: the result has {flops:,} FLOPs, above the budget of {budget:,}. "
            "This is a bug in fxmorph (the input checks passed): please report it with the model; meanwhile try "
            "another criterion or round_to=1."
        )


def _bound_tensor(model: nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at ``path`` as the model's forward reads it (a parameter before a buffer of the same
    name, as ``getattr`` resolves it), or None where the path no longer names a tensor (a layer
    merged back from a factorized pair)."""
    owner, _, leaf = path.rpartition(".")
    try:
        value = getattr(model.get_submodule(owner) if owner else model, leaf)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _rows(cg: ChannelGraph, new: nn.Module) -> list[GroupRow]:
    rows = []
    for g in cg.groups:
        if g.pins and not g.params:
            continue
        after = g.size
        for m in g.params:
            pieces = cg.layout_groups(cg.bindings[(m.name, m.dim)].layout)
            tensor = _bound_tensor(new, m.name)
            # the tensor must still have the bound dim (a rebuilt layer may not: then measure another)
            if tensor is not None and m.dim < tensor.dim() and all(gid == g.id for gid, _ in pieces):
                after = tensor.shape[m.dim] // sum(inner for _, inner in pieces)
                break
        made_by = ", ".join(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in g.producers)) or "-"
        rows.append(GroupRow(g.id, made_by[:60], g.size, after, g.pinned))
    return rows


def _group_rows(cg: ChannelGraph, new: nn.Module, passes: list[str]) -> list[GroupRow]:
    """Per group of ``cg``, its width before and in ``new``; an internal failure is a PassError naming
    the step (never a raw exception, whatever the model)."""
    try:
        return _rows(cg, new)
    except Exception as exc:
        raise PassError(
            f"step 'report' failed after {passes}: {type(exc).__name__}: {exc}. The model was shrunk and checked, "
            "but this is a bug in fxmorph: please report it with the model."
        ) from exc


def _factorize(gm: fx.GraphModule, inputs: tuple[Any, ...], factorize: bool | tuple[str, ...]) -> PipelineResult:
    """``gm`` with the layers ``factorize`` names split by :class:`FactorizePass` (checked)."""
    if factorize is False or factorize == ():
        return PipelineResult(gm, [])
    targets = () if factorize is True else factorize
    return _run([FactorizePass(targets)], gm, PassContext(inputs))


_FACTOR_ROUNDS = 3
"""How often shrink(factorize=...) prunes again without the pairs pruning left dearer than one layer."""


def _factor_paths(gm: fx.GraphModule) -> list[str]:
    return list(gm.meta.get(FACTORS_KEY, {}))


def _cut(gm: fx.GraphModule, inputs: tuple[Any, ...], data: Any, loss_fn: Any, seed: int, options: tuple[Any, ...],
         merge: bool) -> tuple[ChannelGraph, PipelineResult, Limits]:  # fmt: skip
    """The channel graph of ``gm``, the checked pipeline that cuts it to the budget and the limits it cut
    under (``options``: strategy, budget, criterion, round_to, min_width, max_prune, protect, calibrate,
    param_cost)."""
    strategy, budget, criterion, round_to, min_width, max_prune, protect, calibrate, param_cost = options
    cg = build_channel_graph(gm)
    limits = _limits(cg, budget, strategy, round_to, min_width, max_prune, protect)
    ctx = PassContext(inputs, data=data, loss_fn=loss_fn, seed=seed)
    passes = _passes(strategy, budget, criterion, limits, min_width, protect, calibrate, param_cost)
    passes += [MergeFactorsPass()] if merge else []
    return cg, _run(passes, gm, ctx), limits


def _run(passes: list[Pass], gm: fx.GraphModule, ctx: PassContext) -> PipelineResult:
    """The checked pipeline of ``passes`` on ``gm``; a failure caused by the user's input (a loss that is
    not a scalar, a factorize target that names no layer) is raised as that InputError or BudgetError.

    No defensive copy up front: factorize copies before it rewrites, and remove-dead, prune and width
    build new tensors through surgery and never write to the model they receive, so only a result that
    still shares storage with the user's model (nothing changed) is copied. That keeps huge models at
    the original plus the smaller copy."""
    try:
        return Pipeline(passes)(gm, ctx, copy_model=False)
    except PassError as exc:
        if isinstance(exc.__cause__, InputError | BudgetError):
            raise exc.__cause__ from None
        raise


def _shares_storage(a: nn.Module, b: nn.Module) -> bool:
    """Whether any parameter or buffer of ``a`` shares memory with one of ``b``."""
    theirs = {t.untyped_storage().data_ptr() for t in (*b.parameters(), *b.buffers()) if t.numel()}
    return any(t.numel() and t.untyped_storage().data_ptr() in theirs for t in (*a.parameters(), *a.buffers()))


def shrink(
    model: nn.Module,
    budget_flops: float | int | str,
    example_inputs: Any,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    criterion: str = "l1",
    strategy: str = "prune",
    round_to: RoundTo = DEFAULT_ROUND_TO,
    min_width: int = 1,
    max_prune: float | str = AUTO,
    param_cost: float = DEFAULT_PARAM_COST,
    protect: Sequence[str] = (),
    calibrate: bool = False,
    factorize: bool | Sequence[str] = False,
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
        round_to: widths are multiples of this (groups smaller than it keep their width): 16 keeps
            onnxruntime's blocked CPU kernels fast, 1 hits the budget most precisely. ``"auto"`` (the
            default) uses 16 where the budget can be reached that way, and otherwise finer steps, first in
            groups narrower than 64 channels, then everywhere (:mod:`fxmorph.passes.rounding`); the report's
            ``settings["rounding"]`` says which.
        min_width: no group goes below this many channels.
        max_prune: no group loses more than this share of its channels (``strategy="prune"``). ``"auto"``
            (the default) is 0.9, unless the budget cannot be reached that way on any grid: then only
            ``min_width`` binds (small models cut 25x, such as LeNet-5).
        param_cost: what one parameter weighs against one FLOP when choosing the cuts
            (``strategy="prune"``): the default (50) makes weight-bound layers, which cost batch-1 latency
            their FLOPs do not show, give way first; 0 ranks by FLOPs alone, the better choice when the goal
            is accuracy at a FLOPs count rather than latency (LeNet-5 on MNIST at 10x fewer FLOPs: 99.14%
            with 0, 98.81% with 50, ``benchmarks/RESULTS.md``). The budget is in FLOPs either way.
        protect: module path prefixes whose groups are left alone.
        factorize: first split Linear and convolution layers into two through an SVD of their weight
            (:class:`~fxmorph.passes.factorize.FactorizePass`, exact up to rounding), so that the pruning
            ranks each layer's rank directions against neurons and filters: ``True`` for every eligible
            layer, or a list of module paths (or prefixes). It pays where weight matrices are far from
            full rank: LeNet-300-100 on MNIST at 10x fewer FLOPs, 98.1% against 97.5% without
            (``benchmarks/RESULTS.md``). A pair costs more FLOPs than the single layer while its rank
            stays above ``in * out / (in + out)``: such pairs are merged back into one layer
            (:class:`~fxmorph.passes.merge_factors.MergeFactorsPass`) and the model is pruned again with
            those layers whole (up to 3 rounds, each reading ``data``), so the budget still lands as
            closely as without ``factorize`` and no pair dearer than its product is returned.
        seed: seeds the random criterion and the values of any new tensors; same seed, same model.
        return_report: also return the :class:`~fxmorph.api.report.ShrinkReport` (always available as
            ``result.meta["fxmorph.report"]``).

    Raises:
        BudgetError: the budget cannot be parsed, is out of range, is below the smallest reachable, or (with
            ``strategy="width"``) above the largest reachable.
        InputError: a bad option, model, example inputs or data (not iterable, empty, batches the model cannot
            run); TraceError: the model cannot be traced, or the example inputs do not run through it.
            A ``loss_fn`` that does not return a scalar is an InputError too.
        PassError: a pass failed (a bug: please report it with the model).
        See ``docs/bad_input.md`` for every bad input and its error.
    """
    start = time.perf_counter()
    _check_options(criterion, strategy, round_to, min_width, max_prune, loss_fn)
    check_number("param_cost", param_cost, low=0.0)
    if criterion == "taylor" and (data is None or loss_fn is None):
        raise InputError("criterion='taylor' needs data and loss_fn: pass both, or use 'l1', 'l2' or 'bn_scale'.")
    if calibrate and data is None:
        raise InputError("calibrate=True needs data: pass batches of (inputs, targets).")
    protect, seed = check_prefixes("protect", protect), check_seed(seed)
    factorize = factorize if isinstance(factorize, bool) else check_prefixes("factorize", factorize)
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    rounds = 1 if factorize in (False, ()) else _FACTOR_ROUNDS
    data = _check_data(model, data, loss_fn, criterion, strategy, calibrate, rounds)
    flops_before = gm.meta[FLOPS_KEY]
    budget = (parse_any_budget if strategy == "width" else parse_budget)(budget_flops, flops_before)
    options = (strategy, budget, criterion, round_to, min_width, max_prune, protect, calibrate, param_cost)
    targets: bool | tuple[str, ...] = factorize
    best: tuple[ChannelGraph, PipelineResult, PipelineResult, Limits] | None = None
    for _ in range(rounds):
        split = _factorize(gm, inputs, targets)
        try:
            cg, result, limits = _cut(split.gm, inputs, data, loss_fn, seed, options, merge=bool(split.records))
        except BudgetError:
            if best is not None:
                break  # fewer layers split cannot reach the budget: keep the last round's result
            if not split.records or targets == ():
                raise  # the model itself cannot reach the budget
            # the split layers' rank groups cannot thin enough (round_to, min_width): try those layers whole
            logger.info("shrink: the factorized model cannot reach the budget; pruning the layers whole")
            targets = ()
            continue
        best = (cg, split, result, limits)
        still_split = _factor_paths(result.gm)
        if still_split == _factor_paths(split.gm):
            break
        # Pairs that pruning left dearer than their product were merged, so the model is under the
        # budget: prune again with those layers whole, so that the budget goes to channels that pay.
        targets = tuple(still_split)
        logger.info("shrink: %d factorized pair(s) cost more than one layer; pruning again without them",
                    len(_factor_paths(split.gm)) - len(still_split))  # fmt: skip
    assert best is not None
    cg, split, result, limits = best
    small = result.gm if not _shares_storage(result.gm, model) else copy.deepcopy(result.gm)
    _check_result(small.meta[FLOPS_KEY], budget)
    small.train(model.training)
    settings = {"criterion": criterion, "strategy": strategy, "round_to": round_to, "min_width": min_width,
                "max_prune": max_prune, "rounding": limits.describe(), "param_cost": param_cost,
                "protect": list(protect), "calibrate": calibrate,
                "factorize": factorize if isinstance(factorize, bool) else list(factorize), "seed": seed}  # fmt: skip
    report = ShrinkReport(
        budget_flops=budget,
        flops_before=flops_before,
        flops_after=small.meta[FLOPS_KEY],
        params_before=count_params(model),
        params_after=count_params(small),
        seconds=time.perf_counter() - start,
        groups=_group_rows(cg, small, [r["pass"] for r in split.records + result.records]),
        passes=split.records + result.records,
        dropped_modules=gm.meta.get(UNREACHED_KEY, ()),
        settings=settings,
    )
    small.meta[REPORT_KEY] = report
    logger.info("shrink: %s", report.table().splitlines()[0])
    return (small, report) if return_report else small
