"""``fxmorph.grow``: a physically wider copy of a model that computes the same function."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.api.budget import parse_any_budget
from fxmorph.capture.counting import count_params
from fxmorph.capture.trace import as_inputs, propagate_shapes, trace
from fxmorph.errors import BudgetError, InputError, PassError
from fxmorph.meta import FLOPS_KEY, GROW_KEY
from fxmorph.passes.base import PassContext, Pipeline
from fxmorph.passes.grow import GrowPass, grow_candidates
from fxmorph.passes.grow_init import DATA_INITS, INITS
from fxmorph.passes.grow_select import max_grow_flops
from fxmorph.passes.rounding import RoundTo, check_round_to
from fxmorph.passes.select import DEFAULT_ROUND_TO
from fxmorph.validate import (
    check_callable,
    check_data,
    check_first_batch,
    check_model,
    check_number,
    check_prefixes,
    check_seed,
    frozen_mode,
    low_precision_dtype,
)

__all__ = ["GrowReport", "grow"]

logger = logging.getLogger(__name__)


@dataclass
class GrowReport:
    """What :func:`fxmorph.grow` did: totals, per grown group ``(id, made_by, before, after, init,
    note)``, skipped groups with the reason, and the largest output change it measured (relative)."""

    budget_flops: int | None
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seconds: float
    groups: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    max_difference: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    def table(self) -> str:
        """A readable summary: totals, then one line per grown group."""
        lines = [f"FLOPs {self.flops_before:,} -> {self.flops_after:,}, params {self.params_before:,} -> "
                 f"{self.params_after:,}, {len(self.groups)} groups grown, {len(self.skipped)} skipped, "
                 f"max output change {self.max_difference:.1e} ({self.seconds:.1f} s)"]  # fmt: skip
        for row in self.groups:
            note = f"  ({row['note']})" if row["note"] else ""
            lines.append(f"  group {row['id']:4d} {row['made_by'][:50]:50s} {row['before']:6d} -> {row['after']:6d}"
                         f"  {row['init']}{note}")  # fmt: skip
        return "\n".join(lines)


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
            raise InputError(f"channels asks group {gid} to grow, but it cannot: {why}. Drop it from channels "
                             "(fxmorph.analyze(model, inputs).explain() shows which groups may grow).")  # fmt: skip
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
            if any(p.name == f"{key}.weight" and p.role == "out" for p in g.params):
                return g.id
    raise InputError(
        f"channels key {key!r} is neither a group id nor a module whose output channels form a group: "
        "see fxmorph.analyze(model, inputs).explain() for the groups."
    )


def _check_options(init: str, data: Any, loss_fn: Any, round_to: RoundTo, max_factor: float, rank: int,
                   batches: int, scale: float, noise: float) -> None:  # fmt: skip
    if init not in INITS:
        raise InputError(f"unknown init {init!r}: choose one of {', '.join(INITS)}.")
    if init in DATA_INITS and data is None:
        raise InputError(f"init='{init}' needs data and loss_fn (gradients choose its values): pass both, "
                         "or use init='net2net' or 'zero'.")  # fmt: skip
    if data is not None and loss_fn is None:
        raise InputError("data needs loss_fn: pass a loss such as torch.nn.functional.cross_entropy.")
    check_callable("loss_fn", loss_fn)
    if not check_round_to(round_to):
        raise InputError(f"round_to must be 'auto' or a positive int, got {round_to!r}.")
    for name, value in (("rank", rank), ("batches", batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}.")
    check_number("max_factor", max_factor, low=1.0, open_low=True)
    check_number("scale", scale, low=0.0)
    check_number("noise", noise, low=0.0)


def _to_float32(value: Any) -> Any:
    return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


class _Float32Batches:
    """A re-iterable view of ``data`` whose floating tensors are float32."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        return map(_to_float32, self.data)


def _check_budget(cost: CostModel, budget: int, candidates: list[int], round_to: RoundTo, max_factor: float) -> None:
    flops = cost.flops()
    if budget <= flops:
        raise BudgetError(
            f"grow needs a budget above the model's current {flops:,} FLOPs, got {budget:,}: pass absolute "
            "FLOPs or a percentage above 100% ('150%'); fxmorph.shrink goes below."
        )
    most = max_grow_flops(cost, candidates, round_to, max_factor)
    if budget > most:
        raise BudgetError(
            f"budget {budget:,} FLOPs is above what growth can reach: {most:,} FLOPs with each of the "
            f"{len(candidates)} growable group(s) at {max_factor}x its width (round_to={round_to}). "
            "Raise max_factor, or lower the budget."
        )


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
    return_report: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, GrowReport]:
    """Return a wider copy of ``model`` that computes the same function (until it is trained).

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
        return_report: also return the :class:`GrowReport` (always at ``result.meta["fxmorph.grow"]``).

    Under DDP, call it with the same ``seed`` and ``data`` on every rank after broadcasting the
    BatchNorm buffers (each rank's running statistics are its own, and new channels' statistics and
    the choice of groups read them); then wrap the result in DDP again.

    A float16 or bfloat16 model is grown as a float32 copy (the function check and the SVDs need that
    precision) and the result converted back to the model's dtype.

    Raises:
        InputError: unknown init, an init that needs data without data, data without a loss, data that is
            empty or whose batches the model cannot run, a loss that is not a scalar, malformed ``channels``,
            out-of-range options, or bad model or inputs (see ``docs/bad_input.md``).
        BudgetError: the budget cannot be parsed, is not above the model's FLOPs, or cannot be reached.
    """
    start = time.perf_counter()
    _check_options(init, data, loss_fn, round_to, max_factor, rank, batches, scale, noise)
    if (budget_flops is None) == (channels is None):
        raise InputError("pass exactly one of budget_flops and channels.")
    protect, seed = check_prefixes("protect", protect), check_seed(seed)
    inputs = as_inputs(example_inputs)
    check_model(model)
    low = low_precision_dtype(model)
    if low is not None:  # grow a float32 copy: the function check (1e-4) and the SVDs need its precision
        if data is not None:
            data = check_data(data, "grow")[0]
            data = map(_to_float32, data) if isinstance(data, Iterator) else _Float32Batches(data)
        options = {"budget_flops": budget_flops, "channels": channels, "data": data, "loss_fn": loss_fn, "init": init,
                   "round_to": round_to, "max_factor": max_factor, "rank": rank, "batches": batches, "scale": scale,
                   "noise": noise, "protect": protect, "seed": seed, "leaf_modules": leaf_modules}  # fmt: skip
        wide, report = grow(copy.deepcopy(model).float(), _to_float32(inputs), **options, return_report=True)
        wide = wide.to(low)
        with frozen_mode(wide):
            propagate_shapes(wide, inputs)
        report.settings["dtype"] = str(low).removeprefix("torch.")
        logger.info("grow: grew a float32 copy of the %s model and converted the result back", low)
        return (wide, report) if return_report else wide
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    if data is not None:
        data, first = check_data(data, "grow")
        check_first_batch(model, first, "grow", loss_fn=loss_fn, needs="chooses where to grow from the gradients "
                          "of its parameters (data and loss_fn given); pass no data to grow without them")  # fmt: skip
    cg = build_channel_graph(gm)
    candidates, skipped = grow_candidates(cg, tuple(protect))
    budget = None
    requested: dict[int, int] = {}
    if budget_flops is not None:
        budget = parse_any_budget(budget_flops, gm.meta[FLOPS_KEY])
        _check_budget(CostModel(cg), budget, candidates, round_to, max_factor)
    else:
        assert channels is not None
        requested = _resolve_channels(cg, channels, candidates, skipped)
    grow_pass = GrowPass(budget, tuple(sorted(requested.items())), init, round_to, max_factor, rank, batches, scale,
                         noise, tuple(protect))  # fmt: skip
    ctx = PassContext(inputs, data=data, loss_fn=loss_fn, seed=seed)
    try:
        result = Pipeline([grow_pass])(gm, ctx)
    except PassError as exc:
        if isinstance(exc.__cause__, InputError | BudgetError):
            raise exc.__cause__ from None
        raise
    big = result.gm
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
        settings={"init": init, "round_to": round_to, "max_factor": max_factor, "rank": rank, "batches": batches,
                  "scale": scale, "noise": noise, "protect": list(protect), "seed": seed, "data": data is not None},
    )  # fmt: skip
    big.meta[GROW_KEY] = report
    logger.info("grow: %s", report.table().splitlines()[0])
    return (big, report) if return_report else big


def _made_by(cg: ChannelGraph, gid: int) -> str:
    return ", ".join(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in cg.groups[gid].producers)) or "-"
