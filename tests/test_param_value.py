"""How a latency budget values a step: the parameters it takes (``param_value``) and its balance.

A latency budget values a step by the FLOPs it takes of the model per microsecond it saves; ``param_value`` adds the
parameters it takes, as a share of the model's FLOPs per parameter, and its own balance
(:data:`~fxmorph.passes.select.DEFAULT_LATENCY_BALANCE`) lets it thin unevenly. Selection runs against a latency-like
resource made of formulas, so nothing here depends on the machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxmorph
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.latency import LatencyBudget
from fxmorph.passes import prune
from fxmorph.passes.prune import PrunePass
from fxmorph.passes.select import DEFAULT_LATENCY_BALANCE, DEFAULT_PARAM_COST, greedy_widths
from fxmorph.passes.select_latency import DEFAULT_PARAM_VALUES
from tests.test_latency_budget import DearGroup, TwoBranches


class WideHead(nn.Module):
    """Two convolutions at 16x16, then two 1x1 convolutions at 2x2 whose weights are most of the model's and whose
    FLOPs are few."""

    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.late = nn.Sequential(nn.ReLU(), nn.Conv2d(32, 256, 1), nn.ReLU(), nn.Conv2d(256, 256, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.pool(self.early(x))))


@pytest.fixture(scope="module")
def costs() -> tuple[CostModel, CostModel, dict[int, np.ndarray]]:
    """The model's costs, the same priced by a latency-like resource that runs every FLOP alike (so that steps tie
    on the time they save per FLOP and only their parameters tell them apart), and flat scores for every free
    group."""
    cg = build_channel_graph(fxmorph.trace(WideHead().eval(), (torch.randn(1, 3, 16, 16),)))
    cost = CostModel(cg)
    scores = {g.id: np.ones(g.size) for g in cg.groups if not g.pinned}
    return cost, cost.priced(DearGroup(cost, 0, 1.0)), scores


@pytest.mark.parametrize("share", [0.75, 0.5])
@pytest.mark.parametrize("value", [0.08, 0.5])
def test_valuing_the_parameters_keeps_more_of_them_within_the_same_latency(
    costs: tuple[CostModel, CostModel, dict[int, np.ndarray]], value: float, share: float
) -> None:
    cost, latency, scores = costs
    budget = share * latency.spent()
    plain = greedy_widths(latency, scores, budget, 1, 1, param_cost=0.0, param_value=0.0)
    valued = greedy_widths(latency, scores, budget, 1, 1, param_cost=0.0, param_value=value)
    assert latency.spent(plain) <= budget and latency.spent(valued) <= budget
    assert cost.params(valued) > 1.1 * cost.params(plain)
    assert cost.flops(valued) == pytest.approx(cost.flops(plain), rel=0.02)  # the FLOPs run alike here
    late = [g for g in scores if cost.sizes[g] == 256]
    assert all(valued[g] > plain[g] for g in late)  # the weights are in the late layers


def test_a_flops_budget_ignores_the_parameter_value(costs: tuple[CostModel, CostModel, dict[int, np.ndarray]]) -> None:
    """Under a FLOPs budget the parameters are priced (``param_cost``), never valued: the cut is the same."""
    cost, _, scores = costs
    half = cost.flops() // 2
    assert np.array_equal(
        greedy_widths(cost, scores, half, 1, 1, param_value=0.5), greedy_widths(cost, scores, half, 1, 1)
    )


def test_the_prune_pass_values_parameters_by_default() -> None:
    assert PrunePass(1000).param_values == DEFAULT_PARAM_VALUES and min(DEFAULT_PARAM_VALUES) > 0


def test_a_latency_budget_thins_unevenly_and_keeps_more_flops() -> None:
    """One branch runs twice as slow per FLOP as the other: at the latency budget's own balance it is thinned further
    than at a FLOPs budget's (1), the other less, and the cut keeps more FLOPs within the same latency."""
    cg = build_channel_graph(fxmorph.trace(TwoBranches(), (torch.randn(1, 3, 16, 16),)))
    cost = CostModel(cg)
    free = [g for g in range(len(cg.groups)) if cost.sizes[g] == 64 and not cg.groups[g].pinned]
    dear = free[0]
    scores = {g: np.ones(int(cost.sizes[g])) for g in free}
    priced = cost.priced(DearGroup(cost, dear, 2.0))
    budget = 0.5 * priced.spent()
    even, uneven = (
        greedy_widths(priced, scores, budget, 1, 1, param_cost=0.0, balance=balance)
        for balance in (1.0, DEFAULT_LATENCY_BALANCE)
    )
    assert priced.spent(even) <= budget and priced.spent(uneven) <= budget
    assert uneven[dear] < even[dear] and all(uneven[g] >= even[g] for g in free[1:])
    assert cost.flops(uneven) > cost.flops(even)


@pytest.mark.parametrize("latency", [None, LatencyBudget(1000.0, None)])  # type: ignore[arg-type]
def test_the_prune_pass_balances_each_budget_its_own_way(
    monkeypatch: pytest.MonkeyPatch, latency: LatencyBudget | None
) -> None:
    """The pass hands the selection the FLOPs budget's balance and parameter cost, or under a latency budget its own
    balance, no parameter cost and each of its parameter values, beside FLOPs-budget cuts to compare them with."""
    seen: list[tuple[bool, float, float, float]] = []

    def spy(cost: CostModel, *args: object, balance: float, param_cost: float, param_value: float, **kw: object):
        seen.append((cost.spends_flops, balance, param_cost, param_value))
        return greedy_widths(cost, *args, balance=balance, param_cost=param_cost, param_value=param_value, **kw)

    cg = build_channel_graph(fxmorph.trace(TwoBranches(), (torch.randn(1, 3, 16, 16),)))
    cost = CostModel(cg)
    scores = {g: np.ones(int(cost.sizes[g])) for g in range(len(cg.groups)) if not cg.groups[g].pinned}
    priced = cost if latency is None else cost.priced(DearGroup(cost, min(scores), 2.0))
    monkeypatch.setattr(prune, "greedy_widths", spy)
    PrunePass(cost.flops(), latency=latency).choose(priced, scores, [], 0.5 * priced.spent())
    flops_budget = {(balance, param_cost, value) for spends, balance, param_cost, value in seen if spends}
    assert flops_budget == {(1.0, DEFAULT_PARAM_COST, 0.0)}
    latency_cuts = [(balance, param_cost, value) for spends, balance, param_cost, value in seen if not spends]
    if latency is None:
        assert not latency_cuts
    else:
        assert latency_cuts == [(DEFAULT_LATENCY_BALANCE, 0.0, value) for value in DEFAULT_PARAM_VALUES]
