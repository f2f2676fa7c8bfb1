"""Meeting a latency budget: select against the runtime's latency model, measure the result, correct, repeat.

:func:`meet_latency` profiles the runtime for the graph's kernels (:meth:`LatencyRuntime.profile`, cached on disk),
measures the model, and calibrates the model's prediction to that measurement (``scale``). Each round then cuts to
the budget as predicted, measures the result beside the original (interleaved: the ratio of the two cancels the
machine's drift) and, where the measured latency misses the window ``[budget * (1 - tolerance), budget]``, corrects
``scale`` by what the measurement says of the prediction and cuts again, a few rounds at most. Each round aims at
the middle of the window, so that measuring noise on either side still lands in it. The result is the round closest
to the budget at or under it; no round under it is a :class:`~fxmorph.errors.BudgetError`, never a model that
misses silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import fx

from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.graph import ChannelGraph
from fxmorph.analysis.latency import LatencyBudget, LatencyFunction, RuntimeProfile, kernels_of
from fxmorph.api.budget import parse_latency
from fxmorph.api.runtimes import LatencyRuntime
from fxmorph.errors import BudgetError

__all__ = ["LatencyOutcome", "LatencyStep", "meet_latency"]

logger = logging.getLogger(__name__)

ROUNDS = 4
"""At most this many cuts and measurements."""
TOLERANCE = 0.05
"""A measured result within this share under the budget is done."""

Cut = TypeVar("Cut")


@dataclass(frozen=True)
class LatencyStep:
    """One round: the latency the model predicted for its cut, what the runtime measured, and the cut's FLOPs."""

    predicted_ms: float
    measured_ms: float
    flops: int
    params: int


@dataclass
class LatencyOutcome:
    """How a latency budget was met: the runtime, the budget and the model's latency, and every round."""

    runtime: str
    budget_ms: float
    original_ms: float
    predicted_original_ms: float
    """The latency model's prediction for the original, before calibration (its error on the whole model)."""
    profile_seconds: float
    """How long building (or reading) the latency tables took."""
    steps: list[LatencyStep] = field(default_factory=list)
    chosen: int = -1
    """The round whose result was returned."""

    @property
    def measured_ms(self) -> float:
        """The measured latency of the result."""
        return self.steps[self.chosen].measured_ms

    def describe(self) -> list[str]:
        """Lines for the shrink report."""
        lines = [
            f"latency {self.original_ms:.2f} ms -> {self.measured_ms:.2f} ms measured "
            f"({100 * self.measured_ms / self.original_ms:.1f}%, budget {self.budget_ms:.2f} ms) on {self.runtime}",
            f"        latency tables in {self.profile_seconds:.1f} s; the model predicted "
            f"{self.predicted_original_ms:.2f} ms for the original (scaled to its measured time)",
        ]
        for k, s in enumerate(self.steps):
            mark = "  <- returned" if k == self.chosen else ""
            lines.append(
                f"        round {k + 1}: predicted {s.predicted_ms:.2f} ms, measured {s.measured_ms:.2f} ms, "
                f"FLOPs {s.flops / 1e9:.3f} G{mark}"
            )
        return lines


def _profile(runtime: LatencyRuntime, cg: ChannelGraph, known: RuntimeProfile | None = None) -> RuntimeProfile:
    """The runtime's profile for the kernels of ``cg``; ``known`` serves the kernels it has (its tables span the
    original widths, which a cut model's never exceed)."""
    needed = kernels_of(cg)
    if known is not None and all(k in known.tables for k in needed):
        return known
    return runtime.profile(needed)


def _predicted_us(gm: fx.GraphModule, runtime: LatencyRuntime, profile: RuntimeProfile, scale: float) -> float:
    """The predicted microseconds of ``gm`` (its own graph analysed)."""
    cg = build_channel_graph(gm)
    cost = CostModel(cg)
    return LatencyFunction(cost, _profile(runtime, cg, profile), scale)(cost.widths())


def _next_aim(aims: list[float], measured: list[float], goal: float) -> float:
    """The next aim of the cut (in predicted milliseconds), so that its measured latency lands on ``goal``: the
    measured latency rises with the aim, so interpolate between the closest rounds on either side of the goal, or
    scale the closest round's aim by how far it missed where all rounds fell on one side."""
    below = [k for k, m in enumerate(measured) if m <= goal]
    above = [k for k, m in enumerate(measured) if m > goal]
    if below and above:
        lo = max(below, key=lambda k: measured[k])
        hi = min(above, key=lambda k: measured[k])
        if measured[hi] > measured[lo]:
            t = (goal - measured[lo]) / (measured[hi] - measured[lo])
            return aims[lo] + t * (aims[hi] - aims[lo])
    closest = min(range(len(aims)), key=lambda k: abs(measured[k] - goal))
    return aims[closest] * goal / measured[closest]


def meet_latency(
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    budget: float | int | str,
    runtime: LatencyRuntime,
    cut: Callable[[LatencyBudget], tuple[Cut, fx.GraphModule]],
) -> tuple[Cut, LatencyOutcome]:
    """The cut of ``gm`` (``cut(latency)`` gives it and its model) whose measured latency meets ``budget``."""
    start = time.perf_counter()
    cg = build_channel_graph(gm)
    profile = _profile(runtime, cg)
    seconds = time.perf_counter() - start
    original_ms = runtime.measure({"original": gm}, inputs)["original"].median_ms
    budget_ms = parse_latency(budget, original_ms)
    cost = CostModel(cg)
    predicted = LatencyFunction(cost, profile)(cost.widths())
    scale = original_ms * 1e3 / predicted  # calibrated: the model predicts the original's measured time
    outcome = LatencyOutcome(runtime.describe(), budget_ms, original_ms, predicted / 1e3, seconds)
    goal = budget_ms * (1.0 - TOLERANCE / 2)  # the middle of the window: noise either side still lands in it
    aims: list[float] = []
    measured: list[float] = []
    results: list[Cut] = []
    for _ in range(ROUNDS):
        aim = goal if not aims else _next_aim(aims, measured, goal)
        try:
            result, small = cut(LatencyBudget(aim * 1e3, profile, scale))
        except BudgetError as exc:
            if not aims:
                raise BudgetError(
                    f"budget_latency {budget!r} ({budget_ms:.3g} ms of the model's measured {original_ms:.3g} ms on "
                    f"{outcome.runtime}) is below what this model can reach: {exc}"
                ) from exc
            break  # the measurements pushed the aim out of reach: what was measured so far decides
        predicted_us = _predicted_us(small, runtime, profile, scale)
        ratio = runtime.measure({"original": gm, "result": small}, inputs)["result"].paired_ratio
        measured_ms = ratio * original_ms  # the ratio of interleaved runs: the drift of the machine cancels
        small_cost = CostModel(build_channel_graph(small))
        outcome.steps.append(LatencyStep(predicted_us / 1e3, measured_ms, small_cost.flops(), small_cost.params()))
        results.append(result)
        aims.append(aim)
        measured.append(measured_ms)
        logger.info("budget %.2f ms: predicted %.2f ms, measured %.2f ms", budget_ms, predicted_us / 1e3, measured_ms)
        if budget_ms * (1.0 - TOLERANCE) <= measured_ms <= budget_ms:
            break
    under = [k for k, s in enumerate(outcome.steps) if s.measured_ms <= budget_ms]
    if not under:
        times = ", ".join(f"{s.measured_ms:.2f}" for s in outcome.steps)
        raise BudgetError(
            f"no cut met the latency budget of {budget_ms:.2f} ms in {len(measured)} round(s) (measured {times} ms on "
            f"{outcome.runtime}): the machine may be too busy to measure steadily, or the budget is near what the "
            "model can reach. Retry on a quieter machine, or raise the budget."
        )
    outcome.chosen = max(under, key=lambda k: outcome.steps[k].measured_ms)
    return results[outcome.chosen], outcome
