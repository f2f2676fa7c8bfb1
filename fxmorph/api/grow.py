"""``fxmorph.grow``: a physically wider copy of a model that computes the same function.

The keyword API builds a :class:`~fxmorph.api.options.GrowOptions` (validated once) and :func:`run_grow`
does the work: trace, check the data, resolve ``channels`` to group ids or parse the budget, and run the
checked pipeline of one :class:`~fxmorph.passes.grow.GrowPass` (whose ``requires`` refuses a budget it
cannot reach, and whose function the Pipeline checks). A float16 or bfloat16 model grows as a float32
copy.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from fxmorph.analysis import ChannelGraph, Role, build_channel_graph
from fxmorph.api.budget import parse_any_budget
from fxmorph.api.deliver import deliver
from fxmorph.api.options import GrowOptions
from fxmorph.api.regions import refuse_regions
from fxmorph.api.report import GrowReport
from fxmorph.api.shrink import run_pipeline
from fxmorph.capture.counting import count_params
from fxmorph.capture.export import Capture
from fxmorph.capture.trace import as_inputs, propagate_shapes, trace
from fxmorph.errors import InputError
from fxmorph.meta import FLOPS_KEY, GROW_KEY
from fxmorph.passes.base import PassContext
from fxmorph.passes.protect import grow_candidates
from fxmorph.passes.rounding import RoundTo
from fxmorph.passes.select import DEFAULT_ROUND_TO
from fxmorph.validate import check_data, check_first_batch, check_model, frozen_mode, low_precision_dtype

__all__ = ["GrowReport", "grow", "run_grow"]

logger = logging.getLogger(__name__)


def _resolve_channels(
    cg: ChannelGraph, channels: int | Mapping[int | str, int], candidates: list[int], skipped: Mapping[int, str]
) -> dict[int, int]:
    """``{group id: count}`` from an int (every growable group) or a mapping by group id or module path; a
    group the mapping names that cannot grow (pinned, protected, or growth would change the function) is
    refused with the reason, not skipped."""
    if isinstance(channels, bool) or not isinstance(channels, int | Mapping):
        raise InputError("channels must be an int or a mapping {group id or module path: count}.")
    if isinstance(channels, int):
        if channels < 0:
            raise InputError(f"channels must be a non-negative int (channels to add per group), got {channels}.")
        return {g: channels for g in candidates if channels}
    out = _by_group(cg, channels)
    for gid in out:
        if gid not in candidates:
            why = skipped.get(gid) or cg.groups[gid].pinned or "it is not a free group"
            raise InputError(
                f"channels asks group {gid} to grow, but it cannot: {why}. Drop it from channels "
                "(fxmorph.analyze(model, inputs).explain() shows which groups may grow)."
            )
    return out


def _by_group(cg: ChannelGraph, channels: Mapping[int | str, int]) -> dict[int, int]:
    """``{group id: count}`` from a mapping by group id or module path (counts of one group add up)."""
    out: dict[int, int] = {}
    for key, count in channels.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InputError(f"channels[{key!r}] must be a non-negative int, got {count!r}.")
        gid = key if isinstance(key, int) and not isinstance(key, bool) else _group_of_module(cg, key)
        if not 0 <= gid < len(cg.groups):
            raise InputError(f"channels names group {gid}, but the model has {len(cg.groups)} groups.")
        if count:
            out[gid] = out.get(gid, 0) + count
    return out


def _group_of_module(cg: ChannelGraph, key: Any) -> int:
    if isinstance(key, str):
        for g in cg.groups:
            if any(p.name == f"{key}.weight" and p.role == Role.OUT for p in g.params):
                return g.id
    raise InputError(
        f"channels key {key!r} is neither a group id nor a module whose output channels form a group: "
        "see fxmorph.analyze(model, inputs).explain() for the groups."
    )


def _to_float32(value: Any) -> Any:
    return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


class _Float32Batches:
    """A re-iterable view of ``data`` whose floating tensors are float32."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        return map(_to_float32, self.data)


def grow(
    model: nn.Module,
    example_inputs: Any,
    *,
    budget_flops: float | int | str | None = None,
    channels: int | Mapping[int | str, int] | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    init: str = "auto",
    round_to: RoundTo = DEFAULT_ROUND_TO,
    max_factor: float = 4.0,
    rank: int = 8,
    batches: int = 4,
    scale: float = 0.5,
    noise: float = 0.01,
    protect: Sequence[str] = (),
    seed: int = 0,
    leaf_modules: Iterable[type | str] = (),
    keep_class: bool | None = None,
    uniform_blocks: bool = False,
    capture: Capture = "auto",
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, GrowReport]:
    """Return a wider copy of ``model`` that computes the same function (until it is trained).

    The copy is of ``model``'s own class where it is proven equal to the grown graph (``keep_class``).

    Args:
        model: the model; never modified.
        example_inputs: a tensor or tuple of tensors the model accepts.
        budget_flops: grow until this many FLOPs (absolute, ``"1.2G"``, or a percentage such as
            ``"150%"``; must be above the model's FLOPs). The result is at most the budget, and no
            further step of ``round_to`` channels in any group would fit.
        channels: instead of a budget, how many channels to add: an int for every growable group, or
            ``{group id or module path: count}`` (a module path names the group of its output channels).
        data, loss_fn: batches of ``(inputs, targets)`` and a loss returning a scalar. With them, steps go
            to the groups with the most squared gradient norm per FLOP added; without, every group is
            scaled by one multiplier.
        init: ``"auto"``, ``"gradmax"``, ``"dual"`` (both need data), ``"net2net"`` or ``"zero"``: see
            :mod:`fxmorph.passes.grow_init`. Groups where the init asked for is not valid fall back (the
            report says which and why).
        round_to: widths of growing groups become multiples of this; ``"auto"`` (the default) grows in
            multiples of 16, onnxruntime's CPU channel block (``channels`` counts are added as asked).
        max_factor: no group grows beyond this multiple of its width.
        rank, batches: singular values per group and batches of ``data`` used to estimate them.
        scale: GradMax fan-out norm, relative to the mean fan-out norm of the existing channels.
        noise: Net2Net's relative noise on the split fan-outs (exact: the copies' shares still sum to one).
        protect: module path prefixes whose groups are left alone.
        seed: seeds probes and new values; same seed, same model.
        keep_class: as in :func:`fxmorph.shrink`: ``None`` gives ``model``'s class back where proven, else the
            GraphModule with a warning; ``True`` raises a WriteBackError instead; ``False`` never tries.
        uniform_blocks: growing to a budget, keep the groups that play one role in the model's repeated blocks
            at one width, as in :func:`fxmorph.shrink` (``channels`` adds the counts it names).
        capture: ``"fx"``, ``"export"`` or ``"auto"`` (the default), as in :func:`fxmorph.shrink`.
        return_report: also return the :class:`GrowReport` (always at
            ``fxmorph.metadata(result)["fxmorph.grow"]``).

    Under DDP, call it with the same ``seed`` and ``data`` on every rank after broadcasting the
    BatchNorm buffers (each rank's running statistics are its own, and new channels' statistics and
    the choice of groups read them); then wrap the result in DDP again.

    A float16 or bfloat16 model is grown as a float32 copy (the function check and the SVDs need that
    precision) and the result converted back to the model's dtype.

    The options are validated once, as a :class:`~fxmorph.api.options.GrowOptions`; the budget's reach
    is the grow pass's precondition (:meth:`~fxmorph.passes.grow.GrowPass.requires`).

    Raises:
        InputError: unknown init, an init that needs data without data, data without a loss, data that is
            empty or whose batches the model cannot run, a loss that is not a scalar, malformed ``channels``,
            out-of-range options, or bad model or inputs (see ``docs/bad_input.md``).
        BudgetError: the budget cannot be parsed, is not above the model's FLOPs, or cannot be reached.
    """
    options = GrowOptions(
        budget_flops=budget_flops,
        channels=channels,
        data=data,
        loss_fn=loss_fn,
        init=init,
        round_to=round_to,
        max_factor=max_factor,
        rank=rank,
        batches=batches,
        scale=scale,
        noise=noise,
        protect=protect,
        seed=seed,
        leaf_modules=leaf_modules,
        keep_class=keep_class,
        uniform_blocks=uniform_blocks,
        capture=capture,
    )
    big, report = run_grow(model, example_inputs, options)
    return (big, report) if return_report else big


def run_grow(model: nn.Module, example_inputs: Any, options: GrowOptions) -> tuple[nn.Module, GrowReport]:
    """:func:`grow` with its options validated: the wider model and its report."""
    inputs = as_inputs(example_inputs)
    check_model(model)
    low = low_precision_dtype(model)
    if low is not None:
        big, report = _grow_in_float32(model, inputs, options, low)
    else:
        big, report = _grow(model, inputs, options, options.data)
    result, report.delivery = deliver(
        model, big, keep_class=options.keep_class, leaf_modules=options.leaf_modules, entry="grow"
    )
    return result, report


def _grow_in_float32(
    model: nn.Module, inputs: tuple[Any, ...], options: GrowOptions, low: torch.dtype
) -> tuple[fx.GraphModule, GrowReport]:
    """Grow a float32 copy of a ``low`` precision model (GrowPass's function check at 1e-4 and the SVDs
    need that precision) and convert the result back."""
    data = options.data
    if data is not None:
        data = check_data(data, "grow")[0]
        data = map(_to_float32, data) if isinstance(data, Iterator) else _Float32Batches(data)
    wide, report = _grow(copy.deepcopy(model).float(), _to_float32(inputs), options, data)
    wide = wide.to(low)
    with frozen_mode(wide):
        propagate_shapes(wide, inputs)  # the metadata in the model's own dtype
    report.settings["dtype"] = str(low).removeprefix("torch.")
    logger.info("grow: grew a float32 copy of the %s model and converted the result back", low)
    return wide, report


def _grow(
    model: nn.Module, inputs: tuple[Any, ...], options: GrowOptions, data: Iterable[Any] | None
) -> tuple[fx.GraphModule, GrowReport]:
    start = time.perf_counter()
    gm = trace(model, inputs, leaf_modules=options.leaf_modules, capture=options.capture)
    refuse_regions(gm, "grow")
    if data is not None:
        data, first = check_data(data, "grow")
        check_first_batch(
            model,
            first,
            "grow",
            loss_fn=options.loss_fn,
            needs="chooses where to grow from the "
            "gradients of its parameters (data and loss_fn given); pass no data to grow without them",
        )
    cg = build_channel_graph(gm)
    candidates, skipped = grow_candidates(cg, options.protect)
    budget = None
    requested: dict[int, int] = {}
    if options.budget_flops is not None:
        budget = parse_any_budget(options.budget_flops, gm.meta[FLOPS_KEY])
    else:
        assert options.channels is not None  # GrowOptions holds exactly one of the two
        requested = _resolve_channels(cg, options.channels, candidates, skipped)
    ctx = PassContext(inputs, data=data, loss_fn=options.loss_fn, seed=options.seed)
    big = run_pipeline([options.grow_pass(budget, requested)], gm, ctx, copy_model=True).gm
    big.train(model.training)
    record = big.meta.get(GROW_KEY, {"groups": {}, "skipped": skipped, "max_difference": 0.0})
    report = GrowReport(
        budget_flops=budget,
        flops_before=gm.meta[FLOPS_KEY],
        flops_after=big.meta[FLOPS_KEY],
        params_before=count_params(model),
        params_after=count_params(big),
        seconds=time.perf_counter() - start,
        groups=[{"id": g, "made_by": _made_by(cg, g), **row} for g, row in sorted(record["groups"].items())],
        skipped=dict(record["skipped"]),
        max_difference=float(record["max_difference"]),
        settings=options.settings(),
    )
    big.meta[GROW_KEY] = report
    logger.info("grow: %s", report.table().splitlines()[0])
    return big, report


def _made_by(cg: ChannelGraph, gid: int) -> str:
    return ", ".join(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in cg.groups[gid].producers)) or "-"
