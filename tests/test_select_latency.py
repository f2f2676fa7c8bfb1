"""Which latency selection a latency budget keeps (:mod:`fxmorph.passes.select_latency`).

A latency budget selects at several parameter values and keeps the selection with the most FLOPs among those that
keep more parameters than the FLOPs budget at the same predicted latency. Selection runs against a latency-like
resource made of formulas, so nothing here depends on the machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxmorph
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.latency import LatencyBudget
from fxmorph.errors import InputError
from fxmorph.passes.base import PassContext
from fxmorph.passes.prune import PrunePass
from fxmorph.passes.select import DEFAULT_LATENCY_BALANCE, greedy_widths
from fxmorph.passes.select_latency import (
    DEFAULT_PARAM_VALUES,
    FLOPS_TIE,
    KEEPS,
    Candidate,
    flops_reference,
    pick,
)
from tests.test_latency_budget import DearGroup
from tests.test_param_value import WideHead

FLAG = LatencyBudget(1.0, None)  # type: ignore[arg-type]
"""A latency budget the pass only tests for: the costs handed to ``choose`` are priced already."""


def _candidate(value: float | None, flops: float, params: float, reference: float = 0.3) -> Candidate:
    return Candidate(value, np.zeros(1, dtype=np.int64), 1.0, flops, params, reference)


def _even(flops: float, params: float) -> Candidate:
    """The FLOPs budget's cut: the parameters it keeps are the reference."""
    return _candidate(None, flops, params, params)


def test_the_most_flops_among_the_selections_that_keep_more_parameters_than_the_flops_budget() -> None:
    removes_weights = _candidate(0.0, 0.52, 0.21)  # the most FLOPs, but fewer parameters than the FLOPs budget
    just_leads = _candidate(0.05, 0.49, 0.31)
    keeps_weights = _candidate(0.08, 0.47, 0.55)
    assert pick([removes_weights, just_leads, keeps_weights]) is just_leads


def test_selections_that_keep_alike_flops_give_way_to_the_one_with_more_parameters() -> None:
    first = _candidate(0.02, 0.257, 0.30)
    many_weights = _candidate(0.32, 0.257 * (1 - FLOPS_TIE / 2), 0.67)
    fewer_flops = _candidate(0.64, 0.257 * (1 - 2 * FLOPS_TIE), 0.80)
    assert pick([first, many_weights, fewer_flops]) is many_weights


def test_where_none_leads_the_flops_budget_the_one_nearest_it_in_parameters() -> None:
    candidates = [_candidate(0.0, 0.5, 0.1, 0.3), _candidate(0.1, 0.4, 0.2, 0.25), _candidate(0.2, 0.3, 0.15, 0.2)]
    assert pick(candidates).param_value == 0.1


def test_the_flops_budgets_cut_keeps_its_place_where_the_model_cannot_tell_a_selection_from_it() -> None:
    """vit_b_16's case: a selection within :data:`FLOPS_TIE` of the even cut in FLOPs and in parameters."""
    even = _even(0.735, 0.728)
    uneven = _candidate(0.05, 0.735 * (1 + FLOPS_TIE / 2), 0.728 * (1 + FLOPS_TIE / 2), 0.728)
    assert pick([uneven, even]) is even


@pytest.mark.parametrize(
    ("flops", "params"),
    [(0.50 * (1 + 2 * FLOPS_TIE), 0.34), (0.40, 0.34 + 0.2), (0.40 * (1 + FLOPS_TIE / 2), 0.34 * (1 + 2 * FLOPS_TIE))],
    ids=["more-flops", "more-parameters-alike-flops", "a-little-more-of-both"],
)
def test_a_selection_that_keeps_clearly_more_than_the_flops_budgets_cut_replaces_it(
    flops: float, params: float
) -> None:
    """densenet121's case (more FLOPs, and as many parameters) and resnet50's (alike FLOPs, many more parameters)."""
    even = _even(0.50 if flops > 0.5 else 0.40, 0.34)
    better = _candidate(0.05, flops, params, 0.34)
    assert pick([even, better]) is better


def test_the_flops_budgets_cut_beats_selections_with_fewer_flops() -> None:
    """A selection that keeps more parameters but fewer FLOPs than the even cut does not lead it: FLOPs first."""
    even = _even(0.48, 0.59)
    heavy = _candidate(0.32, 0.41, 0.87, 0.60)
    assert pick([heavy, even]) is even


def test_no_candidate_is_an_input_error() -> None:
    with pytest.raises(InputError, match="param_values"):
        pick([])


@pytest.fixture(scope="module")
def wide_head() -> tuple[CostModel, CostModel, dict[int, np.ndarray]]:
    """WideHead's costs, the same priced by a latency-like resource that runs its weight-heavy 1x1 layer three times
    as slow per FLOP (so that cutting it saves the most time and takes the most weights), and flat scores."""
    cg = build_channel_graph(fxmorph.trace(WideHead().eval(), (torch.randn(1, 3, 16, 16),)))
    cost = CostModel(cg)
    scores = {g.id: np.ones(g.size) for g in cg.groups if not g.pinned}
    late = next(g for g in scores if cost.sizes[g] == 256)
    return cost, cost.priced(DearGroup(cost, late, 3.0)), scores


def _flops_budget(cost: CostModel, priced: CostModel, scores: dict[int, np.ndarray]) -> tuple[list[float], list[float]]:
    """The FLOPs budget's cuts at every hundredth of the FLOPs: their predicted costs and the parameters they keep.
    They price no weights (``param_cost=0``): on a model this small, pricing them makes the parameters a FLOPs budget
    keeps jump between neighbouring budgets, and no two samplings of the curve would agree."""
    cuts = [
        greedy_widths(cost, scores, level * cost.flops(), 1, 1, param_cost=0.0) for level in np.linspace(0.01, 1, 100)
    ]
    spent = [priced.spent(w) for w in cuts]
    order = np.argsort(spent, kind="stable")
    return [spent[j] for j in order], [cost.params(cuts[j]) / cost.params() for j in order]


@pytest.mark.parametrize("share", [0.7, 0.5, 0.3])
def test_a_latency_budget_keeps_the_most_flops_of_its_selections_that_lead_the_flops_budget(
    wide_head: tuple[CostModel, CostModel, dict[int, np.ndarray]], share: float
) -> None:
    """Against the FLOPs budget's cuts at every hundredth of the FLOPs (not the pass's bisection), the result keeps
    more parameters than the FLOPs budget at its predicted latency, and as many FLOPs as any selection at one
    parameter value that does."""
    cost, priced, scores = wide_head
    budget = share * priced.spent()
    chosen = PrunePass(cost.flops(), round_to=1, latency=FLAG, param_cost=0.0).choose(priced, scores, [], budget)
    spents, kept = _flops_budget(cost, priced, scores)

    def reference(widths: np.ndarray) -> float:  # the FLOPs budget's parameters at the same latency
        return float(np.interp(priced.spent(widths), spents, kept))

    assert priced.spent(chosen) <= budget
    assert cost.params(chosen) / cost.params() >= reference(chosen) - 0.01
    for value in DEFAULT_PARAM_VALUES:
        one = greedy_widths(
            priced, scores, budget, 1, 1, balance=DEFAULT_LATENCY_BALANCE, param_cost=0.0, param_value=value
        )
        if cost.params(one) / cost.params() >= reference(one) + 0.01:
            assert cost.flops(chosen) >= cost.flops(one) * (1 - FLOPS_TIE)


def test_the_flops_budget_is_bisected_to_the_predicted_latency(
    wide_head: tuple[CostModel, CostModel, dict[int, np.ndarray]],
) -> None:
    """The reference agrees with the FLOPs budget's cuts at every hundredth of the FLOPs, and keeps everything at the
    original's cost."""
    cost, priced, scores = wide_head

    def flops_budget(budget: float) -> np.ndarray:
        return greedy_widths(cost, scores, budget, 1, 1, param_cost=0.0)

    spents, kept = _flops_budget(cost, priced, scores)
    for share in (0.3, 0.5, 0.7):
        target = share * priced.spent()
        reference = flops_reference(priced, flops_budget, target)
        assert reference.params_at(target) == pytest.approx(float(np.interp(target, spents, kept)), abs=0.05)
    assert reference.params_at(priced.spent()) == 1.0


@pytest.mark.parametrize("values", [(), (0.1, -0.5), (0.1, float("nan")), ("0.1",)])
def test_bad_parameter_values_are_refused_by_name(values: tuple[float, ...]) -> None:
    gm = fxmorph.trace(WideHead().eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(InputError, match="param_values"):
        PrunePass(1000, param_values=values).requires(gm, PassContext((torch.randn(1, 3, 16, 16),)))


def test_one_parameter_value_is_that_selection(wide_head: tuple[CostModel, CostModel, dict[int, np.ndarray]]) -> None:
    cost, priced, scores = wide_head
    budget = 0.5 * priced.spent()
    chosen = PrunePass(cost.flops(), round_to=1, latency=FLAG, param_values=(0.08,)).choose(priced, scores, [], budget)
    alone = greedy_widths(
        priced, scores, budget, 1, 1, balance=DEFAULT_LATENCY_BALANCE, param_cost=0.0, param_value=0.08
    )
    assert np.array_equal(chosen, alone)


@pytest.mark.parametrize("share", [0.7, 0.5, 0.3])
def test_keeping_flops_trades_parameters_for_flops(
    wide_head: tuple[CostModel, CostModel, dict[int, np.ndarray]], share: float
) -> None:
    """``latency_keep="flops"`` (parameters not valued) keeps more FLOPs than the default selection at the same budget,
    and the default keeps more parameters: WideHead's weight-heavy layer, three times as slow per FLOP, is what the
    most FLOPs cut; the default keeps the FLOPs budget's cut, which has more FLOPs than any selection that keeps its
    parameters (6 to 16 points of FLOPs, 27 to 64 of parameters apart)."""
    cost, priced, scores = wide_head
    budget = share * priced.spent()
    cuts = {
        keep: PrunePass(cost.flops(), round_to=1, latency=FLAG, param_cost=0.0, param_values=values).choose(
            priced, scores, [], budget
        )
        for keep, values in KEEPS.items()
    }
    assert all(priced.spent(w) <= budget for w in cuts.values())
    assert cost.flops(cuts["flops"]) > cost.flops(cuts["model"]) + 0.05 * cost.flops()
    assert cost.params(cuts["model"]) > cost.params(cuts["flops"]) + 0.2 * cost.params()


@pytest.mark.parametrize("share", [0.7, 0.5, 0.3])
def test_where_no_selection_keeps_more_flops_the_flops_budgets_cut_is_kept(
    wide_head: tuple[CostModel, CostModel, dict[int, np.ndarray]], share: float
) -> None:
    """On WideHead every selection that keeps the FLOPs budget's parameters keeps fewer FLOPs than its cut: the latency
    budget returns that cut, bisected to the budget, under it."""
    cost, priced, scores = wide_head
    budget = share * priced.spent()
    chosen = PrunePass(cost.flops(), round_to=1, latency=FLAG, param_cost=0.0).choose(priced, scores, [], budget)

    def flops_budget(limit: float) -> np.ndarray:  # as PrunePass.choose makes the FLOPs budget's cuts
        return greedy_widths(cost, scores, limit, 1, 1, param_cost=0.0)

    even = flops_reference(priced, flops_budget, budget).widths
    assert even is not None
    assert np.array_equal(chosen, even)
    assert priced.spent(chosen) <= budget
