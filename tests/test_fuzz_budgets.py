"""Fuzzing the public entry points: random architectures x random budgets x random seeds.

Architectures come from :mod:`tests.random_arch`; budgets are drawn as a fraction, absolute FLOPs, a
percentage string or a string with a ``K`` suffix, mostly within what the model can reach. Every case
goes through the public API and is held to what it promises:

- ``fxmorph.shrink`` below 100% (``strategy`` prune or width, every criterion, ``round_to``,
  ``min_width``, ``max_prune``, seed, train or eval mode, sometimes a protected layer): the result
  passes ``fxmorph.check`` and keeps the output structure and shapes; the user's model is untouched
  (state_dict and every training flag); the budget is parsed as documented and met; the counted FLOPs
  equal the cost model's for the widths the report records; protected groups keep their width; every
  width is allowed (a multiple of ``round_to`` or the group's size, at least ``min_width``, at most
  ``max_prune`` removed); no allowed step up still fits the budget (so with ``round_to=1`` it lands
  within 1% wherever one channel costs at most 1% of the budget); and the result equals the original
  with the removed channels masked (the mask oracle, float64; the kept channels come from the
  pipeline's records, ``report.passes[i]["kept"]``). A ``BudgetError`` is accepted only when the
  budget is below the smallest reachable FLOPs, which it must name.
- ``fxmorph.grow`` above 100% (every init; the data inits, and sometimes the others, with a tiny
  random batch): check passes, the budget is met and no allowed step still fits, the outputs are
  unchanged to 1e-5 (in float64, in eval and train mode) on the example and on a fresh input. A
  ``BudgetError`` is accepted only above the most growth can reach (or at most the model's FLOPs),
  which it must name.
- ``fxmorph.shrink(..., strategy="width")`` above 100%: it grows, with the same guarantees.
- ``fxmorph.shrink`` at 100% on models with dead channels (zeroed weight rows, columns, BN scales):
  only ``remove-dead`` acts, and it promises the same function.

Each property draws a derandomized sample in the default run, and the larger sample it was written
with under ``-m slow`` (the ``*_thorough`` twins at the end). About one case in ten also exports the
result with ``fxmorph.export_onnx``, whose own parity check in onnxruntime raises on a mismatch; about
one shrink or grow in five is repeated with the same seed and must give the same weights. Regressions
found here are named after their bug in ``test_random_architectures.py``.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import fxmorph
from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.grow_init import DATA_INITS, INITS
from fxmorph.passes.grow_select import growth_options, max_grow_flops
from fxmorph.passes.importance import CRITERIA
from fxmorph.passes.protect import free_group_ids, grow_candidates
from fxmorph.passes.rounding import as_grid
from fxmorph.passes.select import smallest_widths
from fxmorph.testing import masked_reference, run_double
from tests.conftest import assert_close_trees
from tests.random_arch import SETTINGS, architectures, build, thorough

ROUND_TO = (1, 1, 1, 2, 2, 4, 8, 16)  # the generator's groups have at most 16 channels: 8 and 16 rarely cut
MAX_FACTOR = 4.0  # grow's and the width pass's default
# Rare flags from the low digits of a wide integer: hypothesis skews small ranges towards their start.
onnx_sample = st.integers(0, 2**16).map(lambda i: i % 10 == 1)  # about one draw in ten
one_in_five = st.integers(0, 2**16).map(lambda i: i % 5 == 1)


# -- helpers ------------------------------------------------------------------------------------------


def _loss(out: Any, target: Any) -> torch.Tensor:
    """A scalar from any output structure (the targets are unused)."""
    return sum((t.float() ** 2).mean() for t in tree_flatten(out)[0])  # type: ignore[return-value]


def _batches(seed: int) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 8, 8, generator=g), None)]


Snapshot = tuple[dict[str, torch.Tensor], list[bool]]


def _snapshot(model: nn.Module) -> Snapshot:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_untouched(model: nn.Module, before: Snapshot) -> None:
    state, flags = _snapshot(model)
    assert state.keys() == before[0].keys(), "the user's model gained or lost tensors"
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), f"the user's model changed: {k}"
    assert flags == before[1], "the user's model changed training flags"


def _outputs(model: nn.Module, x: torch.Tensor, train: bool = False, double: bool = False) -> Any:
    m = copy.deepcopy(model).train(train)
    if double:
        m, x = m.double(), x.double()
    with torch.no_grad():
        return m(x)


def _assert_same_structure(small: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    a, spec_a = tree_flatten(_outputs(small, x))
    b, spec_b = tree_flatten(_outputs(model, x))
    assert spec_a == spec_b, f"output structure changed: {spec_a} vs {spec_b}"
    assert [t.shape for t in a] == [t.shape for t in b], "output shapes changed"


@st.composite
def budgets(draw: Any, grow: bool = False) -> tuple[str, bool, float]:
    """``(form, reachable, t)``: how the budget is written, and where it lies (see :func:`_budget`)."""
    forms = ["absolute", "percent", "suffix"] if grow else ["fraction", "absolute", "percent", "suffix"]
    t = draw(st.integers(0, 200)) / 200  # hypothesis favours the ends of a float range: 0 and 1 only now and then
    return draw(st.sampled_from(forms)), draw(st.sampled_from([True, True, True, False])), t


def _budget(drawn: tuple[str, bool, float], flops: int, reachable: tuple[int, int]) -> tuple[Any, int, int]:
    """The budget as passed, the FLOPs it means, and the rounding its form allows (in FLOPs).

    A reachable budget lies at ``t`` between the ``reachable`` bounds (smallest and original FLOPs when
    shrinking, one above the original and the most growth reaches when growing); any other between
    5% and 100% of the model's FLOPs (shrinking) or 101% and 300% (growing)."""
    form, within, t = drawn
    lo, hi = reachable
    anywhere = 1.01 + 2 * t if lo > flops else 0.05 + 0.95 * t
    share = (lo + t * (hi - lo)) / flops if within else anywhere
    if form == "fraction":
        return share, math.floor(share * flops), 0
    if form == "absolute":
        value = max(math.floor(share * flops), 2)
        return value, value, 0
    if form == "percent":
        text = f"{100 * share:.2f}"
        return f"{text}%", math.floor(float(text) / 100.0 * flops), 0
    text = f"{share * flops / 1e3:.3f}"
    return f"{text}K", round(float(text) * 1e3), 1


def _allowed_next(width: int, size: int, round_to: int) -> int | None:
    """The next allowed width above ``width`` when shrinking: a multiple of ``round_to``, or the size."""
    if width >= size:
        return None
    step = (width // round_to + 1) * round_to
    return step if step <= size else size


def _assert_no_step_fits(cost: CostModel, w: np.ndarray, steps: dict[int, int], budget: int) -> float:
    """No single allowed step ``{group: next width}`` keeps the FLOPs within ``budget``; returns the
    FLOPs the cheapest step adds (infinite without steps)."""
    current, finest = cost.flops(w), math.inf
    for g, width in steps.items():
        trial = w.copy()
        trial[g] = width
        flops = cost.flops(trial)
        assert flops > budget, f"group {g} could still go {w[g]} -> {width} ({flops:,} <= budget {budget:,})"
        finest = min(finest, flops - current)
    return finest


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    """Same seed, same model: every parameter and buffer equal."""
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys(), "same seed, different tensors"
    for k in first:
        assert torch.equal(first[k], second[k]), f"same seed, different values of {k}"


def _export(model: nn.Module, x: torch.Tensor) -> None:
    event("exported to ONNX")
    with tempfile.TemporaryDirectory() as tmp:
        fxmorph.export_onnx(model, (x,), Path(tmp) / "model.onnx")  # raises on a parity mismatch


def _widths(cost: CostModel, record: dict[str, Any]) -> np.ndarray:
    w = cost.widths()
    for g, (_, after) in record["changes"].items():
        w[g] = after
    return w


# -- shrink below 100% ----------------------------------------------------------------------------------


def _growth_case(
    model: nn.Module, x: torch.Tensor, budget: tuple[str, bool, float], round_to: int
) -> tuple[ChannelGraph, CostModel, int, tuple[Any, int, int]]:
    """The channel graph, cost model, most FLOPs growth can reach, and the drawn budget (value to pass,
    FLOPs expected, slack) of a growth case; skips models where nothing may grow (the analysis
    properties cover those)."""
    cg = fxmorph.analyze(model, (x,))
    cost = CostModel(cg)
    candidates, _ = grow_candidates(cg, ())
    assume(candidates)
    most = max_grow_flops(cost, candidates, round_to, MAX_FACTOR)
    return cg, cost, most, _budget(budget, cost.flops(), (cost.flops() + 1, max(most, cost.flops() + 1)))


SHRINK = {
    "arch": architectures(),
    "budget": budgets(),
    "strategy": st.sampled_from(["prune", "width"]),
    "criterion": st.sampled_from(CRITERIA),
    "round_to": st.sampled_from(ROUND_TO),
    "min_width": st.sampled_from([1, 1, 2]),
    "max_prune": st.sampled_from([0.9, 0.9, 0.5, 1.0]),
    "seed": st.integers(0, 2**16),
    "pick": st.integers(0, 2**16),
    "train": one_in_five,
    "again": one_in_five,
    "onnx": onnx_sample,
}


@settings(max_examples=80, **SETTINGS)
@given(**SHRINK)
def test_shrink_meets_random_budgets(
    arch: dict[str, Any], budget: tuple[str, bool, float], strategy: str, criterion: str, round_to: int,
    min_width: int, max_prune: float, seed: int, pick: int, train: bool, again: bool, onnx: bool,
) -> None:  # fmt: skip
    model, x = build(arch)
    model.train(train)
    before = _snapshot(model)
    cg = fxmorph.analyze(model, (x,))
    cost = CostModel(cg)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    protect = (layers[pick // 5 % len(layers)],) if pick % 5 == 1 and layers else ()  # one case in five
    free = free_group_ids(cg, protect)
    assume(free)  # models without a free group are covered by the analysis properties
    cap = max_prune if strategy == "prune" else 1.0
    smallest = cost.flops(smallest_widths(cost, free, round_to, min_width, cap))
    value, expected, slack = _budget(budget, cost.flops(), (smallest, cost.flops()))
    options: dict[str, Any] = {"strategy": strategy, "criterion": criterion, "round_to": round_to,
                               "min_width": min_width, "max_prune": max_prune, "seed": seed,
                               "protect": protect}  # fmt: skip
    if criterion == "taylor":
        options.update(data=_batches(seed), loss_fn=_loss)
    try:
        small, report = fxmorph.shrink(model, value, (x,), return_report=True, **options)
    except fxmorph.BudgetError as exc:
        _assert_untouched(model, before)
        assert expected < smallest + slack and f"{smallest:,}" in str(exc), f"unexpected BudgetError: {exc}"
        event("outcome: BudgetError (below the smallest reachable)")
        return
    _assert_untouched(model, before)
    assert small.training == train
    assert abs(report.budget_flops - expected) <= slack, "budget parsed wrongly"
    assert report.budget_flops >= smallest, "a budget below the smallest reachable raised no BudgetError"
    budget_flops = report.budget_flops
    fxmorph.check(small, (x,))
    _assert_same_structure(small, model, x)

    records = {r["pass"]: r for r in report.passes}
    cut = records.pop(strategy)
    assert not any(r["modified"] for r in records.values()), "the generator makes no dead channels"
    assert all(cg.groups[g].size == size for g, (size, _) in cut["changes"].items()), "group ids disagree"
    w = _widths(cost, cut)
    achieved = cost.flops(w)
    recorded = fxmorph.metadata(small)["fxmorph.flops"]
    assert achieved == report.flops_after == recorded == fxmorph.count_flops(small, (x,))
    assert achieved <= budget_flops
    assert all(w[g.id] == g.size for g in cg.free_groups if g.id not in free), "a protected group changed"
    # the grid counts channels: a group of heads steps by the heads whose channels fill a multiple of round_to
    grid = {g: as_grid(round_to).step(int(cost.sizes[g]), int(cost.spans[g]), int(cost.copies[g])) for g in free}
    for g in free:
        size, width = int(cost.sizes[g]), int(w[g])
        floor = min(size, max(-(-min_width // int(cost.spans[g])), math.ceil(size * (1.0 - cap))))
        assert width == size or (width % grid[g] == 0 and width >= floor), f"group {g}: width {width} of {size}"
    steps = {g: n for g in free if (n := _allowed_next(int(w[g]), int(cost.sizes[g]), grid[g])) is not None}
    finest = _assert_no_step_fits(cost, w, steps, budget_flops)
    if round_to == 1:  # README: within 1% of the budget, wherever one more channel costs at most 1% of it
        assert achieved >= 0.99 * budget_flops or finest > 0.01 * budget_flops

    plan = WidthPlan({g: GroupPlan(tuple(keep)) for g, keep in cut["kept"].items()})
    event(f"outcome: {len(plan)} group(s) cut" if plan else "outcome: nothing cut")
    assert {g: p.width for g, p in plan.items()} == {g: a for g, (b, a) in cut["changes"].items() if a < b}
    assert_close_trees(run_double(small, x), masked_reference(cg, plan, x), what="mask oracle", allow_zero=True)
    if again:
        _assert_same_weights(fxmorph.shrink(model, value, (x,), **options), small)
    if onnx:
        _export(small, x)


# -- growth above 100% ----------------------------------------------------------------------------------


def _assert_same_function(big: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """Same outputs to 1e-5 (relative to each output's scale) on ``x`` and on a fresh input, in eval
    and train mode, run in float64 as the mask oracle is: in float32, rounding alone passes 1e-5 of
    an output far smaller than the values it was computed from, or normalised with the statistics
    of a tiny batch."""
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for inputs in (x, fresh):
        where = "fresh" if inputs is fresh else "example"
        for train in (False, True):
            what = f"{'train' if train else 'eval'} mode in float64, {where} input"
            expected = _outputs(model, inputs, train, double=True)
            got = _outputs(big, inputs, train, double=True)
            assert_close_trees(got, expected, rtol=1e-5, what=what, allow_zero=True)


def _grown_widths(cost: CostModel, rows: list[dict[str, Any]]) -> np.ndarray:
    w = cost.widths()
    for row in rows:
        assert cost.sizes[row["id"]] == row["before"], "group ids disagree"
        w[row["id"]] = row["after"]
    return w


def _assert_growth_budget(cost: CostModel, cg: ChannelGraph, w: np.ndarray, budget: int, round_to: int) -> None:
    """At most the budget, every width an allowed growth option, and no further step fits."""
    candidates, _ = grow_candidates(cg, ())
    assert cost.flops(w) <= budget
    steps = {}
    for g in range(len(cg.groups)):
        options = growth_options(int(cost.sizes[g]), round_to, MAX_FACTOR, int(cost.spans[g]), int(cost.copies[g]))
        if g not in candidates:
            assert w[g] == cost.sizes[g], f"group {g} cannot grow but did"
            continue
        assert w[g] in options, f"group {g}: width {w[g]} is not one of {options.tolist()}"
        k = int(np.searchsorted(options, w[g], side="right"))
        if k < len(options):
            steps[g] = int(options[k])
    _assert_no_step_fits(cost, w, steps, budget)


GROW = {
    "arch": architectures(),
    "budget": budgets(grow=True),
    "init": st.sampled_from(INITS),
    "with_data": st.booleans(),
    "round_to": st.sampled_from(ROUND_TO),
    "seed": st.integers(0, 2**16),
    "train": one_in_five,
    "again": one_in_five,
    "onnx": onnx_sample,
}


@settings(max_examples=40, **SETTINGS)
@given(**GROW)
def test_grow_meets_random_budgets_and_keeps_function(
    arch: dict[str, Any], budget: tuple[str, bool, float], init: str, with_data: bool, round_to: int, seed: int,
    train: bool, again: bool, onnx: bool,
) -> None:  # fmt: skip
    model, x = build(arch)
    model.train(train)
    before = _snapshot(model)
    cg, cost, most, (value, expected, slack) = _growth_case(model, x, budget, round_to)
    data = _batches(seed) if with_data or init in DATA_INITS else None
    options: dict[str, Any] = {"budget_flops": value, "init": init, "data": data, "loss_fn": _loss if data else None,
                               "round_to": round_to, "seed": seed}  # fmt: skip
    try:
        big, report = fxmorph.grow(model, (x,), return_report=True, **options)
    except fxmorph.BudgetError as exc:
        _assert_untouched(model, before)
        flops = cost.flops()
        above = expected > most - slack and f"{most:,}" in str(exc)
        assert above or (expected <= flops + slack and f"{flops:,}" in str(exc)), f"unexpected BudgetError: {exc}"
        event("outcome: BudgetError (above the most growth reaches)")
        return
    _assert_untouched(model, before)
    assert big.training == train
    assert abs(report.budget_flops - expected) <= slack, "budget parsed wrongly"
    fxmorph.check(big, (x,))
    w = _grown_widths(cost, report.groups)
    recorded = fxmorph.metadata(big)["fxmorph.flops"]
    assert cost.flops(w) == report.flops_after == recorded == fxmorph.count_flops(big, (x,))
    _assert_growth_budget(cost, cg, w, report.budget_flops, round_to)
    event(f"inits used: {sorted({row['init'] for row in report.groups}) or 'none (nothing grew)'}")
    _assert_same_function(big, model, x)
    if again:
        _assert_same_weights(fxmorph.grow(model, (x,), **options), big)
    if onnx:
        _export(big, x)


WIDEN = {
    "arch": architectures(),
    "budget": budgets(grow=True),
    "with_data": st.booleans(),
    "round_to": st.sampled_from(ROUND_TO),
    "seed": st.integers(0, 2**16),
    "onnx": onnx_sample,
}


@settings(max_examples=25, **SETTINGS)
@given(**WIDEN)
def test_width_strategy_above_budget_grows_and_keeps_function(
    arch: dict[str, Any], budget: tuple[str, bool, float], with_data: bool, round_to: int, seed: int, onnx: bool
) -> None:
    model, x = build(arch)
    before = _snapshot(model)
    cg, cost, most, (value, expected, slack) = _growth_case(model, x, budget, round_to)
    data = {"data": _batches(seed), "loss_fn": _loss} if with_data else {}
    try:
        wide, report = fxmorph.shrink(model, value, (x,), strategy="width", round_to=round_to, seed=seed,
                                      return_report=True, **data)  # fmt: skip
    except fxmorph.BudgetError as exc:
        _assert_untouched(model, before)
        assert expected > most - slack and f"{most:,}" in str(exc), f"unexpected BudgetError: {exc}"
        event("outcome: BudgetError (above the most growth reaches)")
        return
    _assert_untouched(model, before)
    assert abs(report.budget_flops - expected) <= slack, "budget parsed wrongly"
    fxmorph.check(wide, (x,))
    records = {r["pass"]: r for r in report.passes}
    width = records.pop("width")
    assert not any(r["modified"] for r in records.values()) and not width["kept"], "growing removed channels"
    w = _widths(cost, width)
    recorded = fxmorph.metadata(wide)["fxmorph.flops"]
    assert cost.flops(w) == report.flops_after == recorded == fxmorph.count_flops(wide, (x,))
    _assert_growth_budget(cost, cg, w, report.budget_flops, round_to)
    event("outcome: grew" if width["modified"] else "outcome: nothing grew")
    _assert_same_function(wide, model, x)
    if onnx:
        _export(wide, x)


# -- remove-dead: the same function ---------------------------------------------------------------------


def _kill_channels(model: nn.Module, seed: int) -> None:
    """Zero, in about 70% of the layers, one output row (and its bias), one input column, or one BN
    scale (and, half the time, set its shift to 0 or below: the channel is then 0 after a ReLU)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d) or rng.random() < 0.3:
                continue
            if isinstance(m, nn.BatchNorm2d):
                c = int(rng.integers(m.num_features))
                m.weight[c] = 0.0
                if rng.random() < 0.5:  # a constant channel of value 0 or below (0 after a ReLU): no fold needed
                    m.bias[c] = -float(rng.integers(2)) * abs(float(m.bias[c]))
            elif rng.random() < 0.5:
                c = int(rng.integers(m.weight.shape[0]))
                m.weight[c] = 0.0
                if m.bias is not None and rng.random() < 0.5:
                    m.bias[c] = 0.0
            else:
                m.weight[:, int(rng.integers(m.weight.shape[1]))] = 0.0


DEAD = {
    "arch": architectures(),
    "seed": st.integers(0, 2**16),
    "round_to": st.sampled_from(ROUND_TO),
    "onnx": onnx_sample,
}


@settings(max_examples=25, **SETTINGS)
@given(**DEAD)
def test_shrink_at_full_budget_removes_dead_channels_exactly(
    arch: dict[str, Any], seed: int, round_to: int, onnx: bool
) -> None:
    model, x = build(arch)
    _kill_channels(model, seed)
    before = _snapshot(model)
    small, report = fxmorph.shrink(model, 1.0, (x,), round_to=round_to, seed=seed, return_report=True)
    _assert_untouched(model, before)
    fxmorph.check(small, (x,))
    records = {r["pass"]: r for r in report.passes}
    dead = records.pop("remove-dead")
    assert not any(r["modified"] for r in records.values()), "the budget was already met"
    event(f"outcome: {'dead channels removed' if dead['modified'] else 'nothing removed'}")
    assert report.flops_after <= report.flops_before
    assert {g: len(k) for g, k in dead["kept"].items()} == {g: a for g, (_, a) in dead["changes"].items()}
    expected = _outputs(model, x, double=True)  # float64: the fold's rounding only, not float32 noise
    assert_close_trees(_outputs(small, x, double=True), expected, rtol=1e-5, what="remove-dead equivalence",
                       allow_zero=True)  # fmt: skip
    if onnx:
        _export(small, x)


# -- the defaults: round_to="auto", max_prune="auto" -------------------------------------------------------


DEFAULTS = {"arch": architectures(new_blocks=1), "budget": budgets(), "seed": st.integers(0, 2**16)}


@settings(max_examples=30, **SETTINGS)
@given(**DEFAULTS)
def test_default_rounding_reaches_every_budget_any_width_reaches(
    arch: dict[str, Any], budget: tuple[str, bool, float], seed: int
) -> None:
    """``shrink`` with its defaults (``round_to="auto"``, ``max_prune="auto"``), on architectures with
    the blocks added for issue 18 (parameters through ``matmul``/``F.linear``, functional norms,
    norm-activation subclasses, ``nn.TransformerEncoderLayer``): it refuses only budgets below what any
    width reaches (``round_to=1``, only ``min_width`` binding), naming that smallest FLOPs; it meets the
    budget, keeps the output shapes and obeys the mask oracle; and where multiples of 16 reach the budget
    the result is exactly ``round_to=16, max_prune=0.9``'s (the fast grid is not given up needlessly)."""
    model, x = build(arch)
    before = _snapshot(model)
    cg = fxmorph.analyze(model, (x,))
    cost = CostModel(cg)
    free = free_group_ids(cg, ())
    assume(free)
    finest = cost.flops(smallest_widths(cost, free, 1, 1, 1.0))
    fast = cost.flops(smallest_widths(cost, free, 16, 1, 0.9))
    value, expected, slack = _budget(budget, cost.flops(), (finest, cost.flops()))
    try:
        small, report = fxmorph.shrink(model, value, (x,), return_report=True, seed=seed)
    except fxmorph.BudgetError as exc:
        _assert_untouched(model, before)
        assert expected < finest + slack and f"{finest:,}" in str(exc), f"unexpected BudgetError: {exc}"
        event("outcome: BudgetError (below what any width reaches)")
        return
    _assert_untouched(model, before)
    assert report.flops_after <= report.budget_flops
    fxmorph.check(small, (x,))
    _assert_same_structure(small, model, x)
    if report.budget_flops >= fast:
        event("grid: multiples of 16")
        assert report.settings["rounding"].startswith("multiples of 16 ("), report.settings["rounding"]
        _assert_same_weights(fxmorph.shrink(model, value, (x,), round_to=16, max_prune=0.9, seed=seed), small)
    else:
        event(f"grid: {report.settings['rounding'].split(';')[0]}")
    records = {r["pass"]: r for r in report.passes}
    cut = records.pop("prune")
    plan = WidthPlan({g: GroupPlan(tuple(keep)) for g, keep in cut["kept"].items()})
    assert_close_trees(run_double(small, x), masked_reference(cg, plan, x), what="mask oracle", allow_zero=True)


# -- the thorough samples (``-m slow``) ------------------------------------------------------------------
# The default run draws enough examples of each property to meet every block kind, budget form and
# option many times over; these twins draw the counts the properties were written with.
test_shrink_meets_random_budgets_thorough = thorough(test_shrink_meets_random_budgets, 400, **SHRINK)
test_grow_meets_random_budgets_thorough = thorough(test_grow_meets_random_budgets_and_keeps_function, 200, **GROW)
test_width_strategy_above_budget_thorough = thorough(
    test_width_strategy_above_budget_grows_and_keeps_function, 100, **WIDEN
)
test_shrink_at_full_budget_thorough = thorough(test_shrink_at_full_budget_removes_dead_channels_exactly, 100, **DEAD)
test_default_rounding_thorough = thorough(test_default_rounding_reaches_every_budget_any_width_reaches, 150, **DEFAULTS)
