"""``fxmorph.shrink``: a physically smaller model that meets a FLOPs budget, a latency budget, or both.

The keyword API builds a :class:`~fxmorph.api.options.ShrinkOptions` (validated once) and
:func:`run_shrink` does the work: trace, check the data, parse the budget, cut (:mod:`fxmorph.api.cut`: the
rounding grid and the share a group may lose, :func:`~fxmorph.api.limits.cut_limits`, then the checked pipeline
``remove-dead -> prune | width``, with ``factorize`` in rounds; with a latency budget, in rounds measured by the
runtime, :mod:`fxmorph.api.latency_budget`), and report.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.latency import LatencyBudget
from fxmorph.api.budget import parse_any_budget, parse_budget
from fxmorph.api.cut import FACTOR_ROUNDS, Cut, best_cut, run_pipeline
from fxmorph.api.deliver import deliver
from fxmorph.api.latency_budget import LatencyOutcome, meet_latency
from fxmorph.api.options import ShrinkOptions
from fxmorph.api.regions import bundle_inputs, region_budget, whole_flops
from fxmorph.api.removals import confirm_removals
from fxmorph.api.report import GroupRow, ShrinkReport
from fxmorph.api.runtimes import LatencyRuntime, runtime_for
from fxmorph.capture.counting import count_params
from fxmorph.capture.export import Capture
from fxmorph.capture.trace import as_inputs, trace
from fxmorph.errors import BudgetError, InputError, PassError
from fxmorph.meta import CAPTURE_KEY, FLOPS_KEY, REGIONS_KEY, REPORT_KEY, UNREACHED_KEY
from fxmorph.passes.rounding import AUTO, RoundTo
from fxmorph.passes.select import DEFAULT_PARAM_COST, DEFAULT_ROUND_TO
from fxmorph.passes.select_latency import LatencyKeep
from fxmorph.validate import check_data, check_first_batch

__all__ = ["REPORT_KEY", "run_pipeline", "run_shrink", "shrink"]

logger = logging.getLogger(__name__)


def _check_data(model: nn.Module, options: ShrinkOptions, rounds: int) -> Any:
    """The data to use (checked: iterable, not empty, its first batch runs through the model); pruning
    may run ``rounds`` times (``factorize``), each reading the data."""
    cut = options.cuts_with_data
    if not (cut or options.calibrate):
        return options.data
    data, first = check_data(options.data, "shrink", reads=(int(cut) + int(options.calibrate)) * rounds)
    needs = (
        "reads the gradients of the model's parameters (criterion='taylor'); use criterion='l1' without them"
        if options.criterion == "taylor"
        else "grows with gradients (data and loss_fn given)"
    )
    check_first_batch(model, first, "shrink", pair=cut, loss_fn=options.loss_fn if cut else None, needs=needs)
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


def _module_gone(model: nn.Module, path: str) -> bool:
    """Whether the module holding the tensor at ``path`` is no longer in ``model``."""
    owner = path.rpartition(".")[0]
    try:
        model.get_submodule(owner)
    except AttributeError:
        return True
    return False


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
        own = [
            m
            for m in g.producers
            if {gid for gid, _ in cg.layout_groups(cg.bindings[(m.name, m.dim)].layout)} == {g.id}
        ]
        if own and all(_module_gone(new, m.name) for m in own):
            after = 0  # removed whole with the modules making it alone (or gone with a group removed whole)
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


def _shares_storage(a: nn.Module, b: nn.Module) -> bool:
    """Whether any parameter or buffer of ``a`` shares memory with one of ``b``."""
    theirs = {t.untyped_storage().data_ptr() for t in (*b.parameters(), *b.buffers()) if t.numel()}
    return any(t.numel() and t.untyped_storage().data_ptr() in theirs for t in (*a.parameters(), *a.buffers()))


def shrink(
    model: nn.Module,
    budget_flops: float | int | str | None = None,
    example_inputs: Any = None,
    *,
    budget_latency: float | str | None = None,
    runtime: str | LatencyRuntime = "onnxruntime",
    latency_threads: int | None = None,
    latency_keep: LatencyKeep = "model",
    data: Iterable[Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    criterion: str = "l1",
    strategy: str = "prune",
    round_to: RoundTo = DEFAULT_ROUND_TO,
    min_width: int | None = None,
    max_prune: float | str = AUTO,
    param_cost: float = DEFAULT_PARAM_COST,
    protect: Sequence[str] = (),
    calibrate: bool = False,
    factorize: bool | Sequence[str] = False,
    seed: int = 0,
    leaf_modules: Iterable[type | str] = (),
    keep_class: bool | None = None,
    uniform_blocks: bool = False,
    capture: Capture = "auto",
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ShrinkReport]:
    """Return a physically smaller copy of ``model`` whose FLOPs meet ``budget_flops``, or whose latency, measured
    in a runtime, meets ``budget_latency`` (or both).

    The copy is of ``model``'s own class (its methods, attributes and ``isinstance`` hold) wherever it is
    proven to compute exactly what the shrunk graph computes; otherwise it is the ``torch.fx.GraphModule``
    (see ``keep_class``).

    Args:
        model: the model; never modified.
        budget_flops: absolute FLOPs (a number > 1), a fraction of the model's FLOPs (0 < x <= 1), or a
            string: ``"50%"``, ``"1.2G"``, ``"3.5e8"``. With ``strategy="width"`` it may be above the
            model's FLOPs (``"150%"``): the multiplier then goes above 1 and the model grows.
        example_inputs: a tensor or tuple of tensors the model accepts (required; a latency budget is for their
            shape).
        budget_latency: a share of the model's latency as ``runtime`` measures it on this machine (``0.6``,
            ``"60%"``) or a time (``"12ms"``, ``"800us"``). The cut is chosen against a latency model of the
            runtime (:mod:`fxmorph.analysis.latency`: a table per kernel measured on small graphs, memory costs
            for the ops without one, cached on disk per machine, thread count and runtime version), then the result
            is measured beside the original and cut again with the prediction corrected until it lands at or under
            the budget and within 5% of it (6 rounds at most; :mod:`fxmorph.api.latency_budget`). The report's
            ``latency`` gives each round's prediction and measurement. With ``budget_flops`` too, both are met.
        runtime: the runtime of ``budget_latency``: ``"onnxruntime"`` (its CPU provider, the default) or an object
            with ``describe``, ``profile`` and ``measure`` (:class:`~fxmorph.api.runtimes.LatencyRuntime`).
        latency_threads: the runtime's intra-op threads (default: every core).
        latency_keep: what a latency budget keeps the most of: ``"model"`` (the default), the most FLOPs among the
            cuts that keep at least the parameters a FLOPs budget keeps at the same latency; ``"flops"``, the most
            FLOPs whatever the parameters (densenet121 at half its latency: 48.6% of its FLOPs and 53.8% of its
            parameters against 51.3% and 24.5%; :data:`~fxmorph.passes.select_latency.LatencyKeep`).
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
        min_width: no group goes below this many channels; None (the default) is 0 under a latency budget and 1
            otherwise. 0 also lets a group go whole where that is exact: its channels reach the rest of the model
            only through concatenations (a dense layer's new features), the ops that compute them going with it
            and the concatenations leaving them out; or they feed a layer that reads nothing else, which then
            computes its bias, and the residual branch it closes folds into one value per channel (an inverted
            residual, a squeeze-excitation, a transformer's MLP; :mod:`fxmorph.analysis.removal`). The result
            comes back as the model's class where it runs without what went (torchvision's dense blocks,
            ``MobileNetV2``, ``VisionTransformer``); shrink tries one removal of each kind first and keeps the
            groups of kinds that do not (a ResNet block, timm's Res2Net; :mod:`fxmorph.api.removals`). Under a
            latency budget a group goes where the fixed and memory-bound costs of the ops that go with it save more than
            thinning; under a FLOPs budget only once thinning costs more
            (:func:`~fxmorph.passes.select_steps.whole_values`).
        max_prune: no group loses more than this share of its channels (``strategy="prune"``). ``"auto"``
            (the default) is 0.9, unless the budget cannot be reached that way on any grid: then only
            ``min_width`` binds (small models cut 25x, such as LeNet-5).
        param_cost: what one parameter weighs against one FLOP when choosing the cuts
            (``strategy="prune"``): the default (50) makes weight-bound layers, which cost batch-1 latency
            their FLOPs do not show, give way first; 0 ranks by FLOPs alone, the better choice when the goal
            is accuracy at a FLOPs count rather than latency (LeNet-5 on MNIST at 10x fewer FLOPs: 99.14%
            with 0, 98.81% with 50, ``benchmarks/RESULTS.md``). The budget is in FLOPs either way. Under a
            latency budget, whose tables time the weights' reads, it is not used: there the parameters a cut takes
            count beside its FLOPs in what it takes of the model, at several values, and of the cuts those give the
            one that keeps the most FLOPs while keeping more weights than a FLOPs budget at the same predicted
            latency is kept (:mod:`fxmorph.passes.select_latency`).
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
        keep_class: ``None`` (the default) gives the result back as ``model``'s class when write-back proves it
            equal to the shrunk graph, and otherwise as the GraphModule with a
            :class:`~fxmorph.errors.WriteBackWarning` naming the line of ``forward`` that prevents it (a width
            written in the source, say ``x.view(-1, 512)``); ``True`` raises that as a
            :class:`~fxmorph.errors.WriteBackError`; ``False`` always returns the GraphModule.
        uniform_blocks: keep the groups that play one role in the model's repeated blocks at one width (the
            blocks of a ``Sequential``, ``ModuleList`` or ``ModuleDict`` of one type: ``layer3.*.conv1`` of a
            ResNet, ``model.layers.*.mlp.up_proj`` of a Llama), so that formats holding one size per model (a
            Hugging Face config, TensorRT-LLM) can describe the result. The budget lands as without it; a
            class one of whose groups cannot change (pinned, protected) keeps its width in every block. On a
            model with a ``config``, the groups one config field sizes step together in proportion (BERT's
            ``hidden_size``: its stream and its heads) and a group no field sizes keeps its width, so the
            config states the result and ``from_pretrained`` rebuilds it.
        capture: how the model becomes a graph: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``,
            for forwards symbolic tracing cannot enter: ``**kwargs``, Python on shapes; ``leaf_modules`` does not
            apply), or ``"auto"`` (the default): symbolic tracing, and ``torch.export`` where it fails. The report
            says which was used.
        return_report: also return the :class:`~fxmorph.api.report.ShrinkReport` (always available as
            ``fxmorph.metadata(result)["fxmorph.report"]``).

    The options are validated once, as a :class:`~fxmorph.api.options.ShrinkOptions`.

    Raises:
        BudgetError: the budget cannot be parsed, is out of range, is below the smallest reachable, or (with
            ``strategy="width"``) above the largest reachable; a latency budget no round measured at or under.
        InputError: a bad option, model, example inputs or data (not iterable, empty, batches the model cannot
            run); TraceError: the model cannot be traced, or the example inputs do not run through it.
            A ``loss_fn`` that does not return a scalar is an InputError too.
        PassError: a pass failed (a bug: please report it with the model).
        WriteBackError: ``keep_class=True`` and the result cannot be proven equal as ``model``'s class.
        See ``docs/bad_input.md`` for every bad input and its error.
    """
    options = ShrinkOptions(
        budget_flops=budget_flops,
        budget_latency=budget_latency,
        runtime=runtime,
        latency_threads=latency_threads,
        latency_keep=latency_keep,
        data=data,
        loss_fn=loss_fn,
        criterion=criterion,
        strategy=strategy,
        round_to=round_to,
        min_width=min_width,
        max_prune=max_prune,
        param_cost=param_cost,
        protect=protect,
        calibrate=calibrate,
        factorize=factorize,
        seed=seed,
        leaf_modules=leaf_modules,
        keep_class=keep_class,
        uniform_blocks=uniform_blocks,
        capture=capture,
    )
    small, report = run_shrink(model, example_inputs, options)
    return (small, report) if return_report else small


def _flops_budget(gm: fx.GraphModule, options: ShrinkOptions, flops_before: int) -> int:
    """The FLOPs budget (the model's FLOPs where only a latency budget is given); a latency budget never grows."""
    if options.budget_flops is None:
        return flops_before
    budget = (parse_any_budget if options.strategy == "width" else parse_budget)(options.budget_flops, flops_before)
    if options.budget_latency is not None and budget > flops_before:
        raise InputError(
            f"budget_flops {options.budget_flops!r} is above the model's FLOPs, and a latency budget only cuts: pass a "
            "FLOPs budget at most 100% with budget_latency, or grow with strategy='width' alone."
        )
    return budget


def _cut_to_budgets(
    gm: fx.GraphModule, inputs: tuple[Any, ...], data: Any, options: ShrinkOptions, budget: int
) -> tuple[Cut, LatencyOutcome | None]:
    """The cut of ``gm`` to the FLOPs ``budget`` and, where there is one, the latency budget, measured."""
    if options.budget_latency is None:
        return best_cut(gm, inputs, data, options, region_budget(gm, budget)), None
    if REGIONS_KEY in gm.meta:
        raise InputError(
            "a latency budget needs the whole model captured (it measures the model in a runtime), but this model was "
            "captured in regions: use budget_flops, or make the model capture whole (capture='export', leaf_modules)."
        )
    runtime = runtime_for(options.runtime, options.latency_threads or os.cpu_count() or 1)

    def cut(latency: LatencyBudget) -> tuple[Cut, fx.GraphModule]:
        made = best_cut(gm, inputs, data, options, budget, latency)
        return made, made.result.gm

    return meet_latency(gm, inputs, options.budget_latency, runtime, cut)


def run_shrink(model: nn.Module, example_inputs: Any, options: ShrinkOptions) -> tuple[nn.Module, ShrinkReport]:
    """:func:`shrink` with its options validated: the smaller model and its report."""
    start = time.perf_counter()
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, leaf_modules=options.leaf_modules, capture=options.capture)
    if options.floor == 0 and options.keep_class is not False:  # groups go whole only where the class runs without
        confirm_removals(model, gm, options.leaf_modules)
    inputs = bundle_inputs(gm, inputs, options.data)
    rounds = 1 if options.factorize in (False, ()) else FACTOR_ROUNDS
    data = _check_data(model, options, rounds)
    # a model captured in regions: the budget counts the whole forward, the code outside the regions a fixed cost
    flops_before = whole_flops(gm, gm.meta[FLOPS_KEY])
    budget = _flops_budget(gm, options, flops_before)
    cut, latency = _cut_to_budgets(gm, inputs, data, options, budget)
    small = cut.result.gm if not _shares_storage(cut.result.gm, model) else copy.deepcopy(cut.result.gm)
    _check_result(whole_flops(gm, small.meta[FLOPS_KEY]), budget)
    small.train(model.training)
    records = cut.split.records + cut.result.records
    report = ShrinkReport(
        budget_flops=budget,
        flops_before=flops_before,
        flops_after=whole_flops(gm, small.meta[FLOPS_KEY]),
        params_before=count_params(model),
        params_after=count_params(small),
        seconds=time.perf_counter() - start,
        groups=_group_rows(cut.cg, small, [r.name for r in records]),
        passes=records,
        dropped_modules=gm.meta.get(UNREACHED_KEY, ()),
        settings=options.settings(cut.limits.describe()),
        capture=gm.meta[CAPTURE_KEY],
        regions=tuple(gm.meta[REGIONS_KEY].describe()) if REGIONS_KEY in gm.meta else (),
        latency=latency,
    )
    small.meta[REPORT_KEY] = report
    result, report.delivery = deliver(
        model, small, keep_class=options.keep_class, leaf_modules=options.leaf_modules, entry="shrink"
    )
    report.seconds = time.perf_counter() - start
    logger.info("shrink: %s", report.table().splitlines()[0])
    return result, report
