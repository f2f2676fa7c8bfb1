"""Meeting a latency budget: select against the runtime's latency model, measure the result, correct, repeat.

:func:`meet_latency` profiles the runtime for the graph's kernels (:meth:`LatencyRuntime.profile`, cached on disk),
measures the model, and calibrates the model's prediction to that measurement (``scale``). Each round then cuts to
the budget as predicted, measures the result beside the original (interleaved: the ratio of the two cancels the
machine's drift) and, where the measured latency misses the window ``[budget * (1 - tolerance), budget]``, corrects
``scale`` from what the rounds measured (:mod:`fxmorph.api.latency_corrections`) and cuts again, a few rounds at
most. Each round aims at the middle of the window, so that measuring noise on either side still lands in it, and a round
that lands in the window (:data:`GUARD` and :data:`TOP_GUARD` inside its edges) is measured twice more, and accepted
only if the median of the three lands there too: the ratio of two models measured on a shared machine moves between runs
by a point or two of the original (the window's width at a 30% budget), now and then by more while a neighbour holds the
machine, and a median of three is what one such measurement cannot move. Three that disagree by more than the band is
wide (:data:`AGREEMENT`) are made five (:data:`SETTLE`), whose median two cannot move. A round measured once that two
later rounds could not get past is measured again too (:func:`_look_again`), since one such measurement steers every
correction after it. Where the model predicts the budget out of reach, the nearest cut it allows is measured before
refusing (:func:`_first_cut`).
The result is the confirmed round or, where the rounds ran out first, the round closest to the budget at or under
it; no round under it is a :class:`~fxmorph.errors.BudgetError`, never a model that misses silently.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from torch import fx

from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.graph import ChannelGraph
from fxmorph.analysis.latency import LatencyBudget, LatencyFunction, RuntimeProfile, kernels_of
from fxmorph.api.budget import parse_latency
from fxmorph.api.latency_corrections import next_scale, stalled_end
from fxmorph.api.runtimes import LatencyRuntime, SteadyTimer
from fxmorph.errors import BudgetError

__all__ = ["LatencyOutcome", "LatencyStep", "meet_latency"]

logger = logging.getLogger(__name__)

ROUNDS = 6
"""At most this many cuts and measurements."""
TOLERANCE = 0.05
"""A measured result within this share under the budget meets it: the window is ``[budget * (1 - TOLERANCE),
budget]``."""
CONFIRMATIONS = 3
"""Measurements of a round whose first lands in the window's guarded band: it is accepted where their median lands
there too. Measured again after shrink returned, 18 of the 134 results in the latency benchmark's runs so far moved
by 2.5% of the budget or more (the median moved 0.55%), and a median sets one such measurement aside where a mean
follows it; two in the band already place the median of three there, and the third tells a round whose second
measurement was the odd one."""
GUARD = 0.01
"""A round is accepted only where the median of its measurements lands this share of the budget inside the window's
lower edge (and :data:`TOP_GUARD` under the budget): a later measurement of the same pair moves by about a percent
(:mod:`fxmorph.io.latency`), and a result accepted at the window's very edge would fall out of it on that measurement
about half the time."""
TOP_GUARD = 0.015
"""How far under the budget the median of a round's measurements must land to be accepted. Wider than :data:`GUARD`
because measured again after shrink returned a result moves up more often than down: in the latency benchmark's 19
results of session 24 by +0.1% of the budget in the median and up to +1.5%, and vit_b_16 cut to 50%, accepted at
98.8% of its budget, measured 100.04% (``benchmarks/RESULTS.md``)."""

AGREEMENT = 0.025
"""How far apart (max - min, a share of the budget) a round's :data:`CONFIRMATIONS` measurements may lie and still
be taken at their median; further apart, the round is measured up to :data:`SETTLE` times and taken at the median of
all of them. The width of the guarded band: three measurements that disagree by more cannot place a round in it. In
the latency benchmark's session 25 the two results that moved most when measured again after shrink returned were
the two whose confirmations disagreed most: vit_b_16 cut to 75%, accepted at the median of 166, 178 and 188 ms
(97.9% of the budget, 11.7% apart), measured 101.7% of it after, and convnext_tiny at 75% (3.1% apart), +2.6%; the
other 17 moved by 1.6% of the budget at most (``benchmarks/RESULTS.md``)."""
SETTLE = 5
"""Measurements of a round whose first :data:`CONFIRMATIONS` disagree by more than :data:`AGREEMENT`: the median of
five sets two odd ones aside, where that of three sets aside one."""

Cut = TypeVar("Cut")


@dataclass(frozen=True)
class LatencyStep:
    """One round: the latency the model (calibrated on the original) predicted for its cut, what the runtime
    measured, and the cut's FLOPs and parameters."""

    predicted_ms: float
    measured_ms: float
    flops: int
    params: int
    runs: int = 1
    """How many independent measurements ``measured_ms`` is the median of (:data:`CONFIRMATIONS`: the first landed in
    the guarded band)."""
    spread_ms: float = 0.0
    """How far apart those measurements were."""
    confirmed: bool = False
    """Whether the median of the measurements fell in the window's guarded band (the loop stops at the first such
    round)."""


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
    retaken: int = 0
    """How many measurements were taken again because the machine was busy (:class:`SteadyTimer`)."""

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
        if self.retaken:
            lines.append(f"        {self.retaken} measurement(s) taken again: the machine was busy")
        for k, s in enumerate(self.steps):
            mark = "  <- returned" if k == self.chosen else ""
            runs = f" (median of {s.runs}, {s.spread_ms:.2f} ms apart)" if s.runs > 1 else ""
            lines.append(
                f"        round {k + 1}: predicted {s.predicted_ms:.2f} ms, measured {s.measured_ms:.2f} ms{runs}, "
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


def _predicted_us(cost: CostModel, runtime: LatencyRuntime, profile: RuntimeProfile, scale: float) -> float:
    """The predicted microseconds of the graph of ``cost``."""
    return LatencyFunction(cost, _profile(runtime, cost.cg, profile), scale)(cost.widths())


def _cost(gm: fx.GraphModule) -> CostModel:
    """The cost model of a cut model (its own graph analysed)."""
    return CostModel(build_channel_graph(gm))


_NUDGES = 3
"""How often a correction whose cut repeats a measured one is pushed further before it is measured anyway."""


@dataclass
class _Rounds(Generic[Cut]):
    """What the rounds after the first steer by: the cut (``cut(latency)`` gives it and its model), its aim, the
    goal in milliseconds, and each round's calibration (``scales``) beside what it measured (``outcome.steps``)."""

    cut: Callable[[LatencyBudget], tuple[Cut, fx.GraphModule]]
    aim: LatencyBudget
    goal: float
    outcome: LatencyOutcome
    calibrated: float
    """The calibration that predicts the original's measured time (the rounds' predictions are made under it)."""
    scales: list[float] = field(default_factory=list)

    @property
    def measured(self) -> list[float]:
        """What each round measured, in milliseconds."""
        return [s.measured_ms for s in self.outcome.steps]

    def _next_scale(self) -> float:
        """:func:`~fxmorph.api.latency_corrections.next_scale` of the rounds so far, in shares of the original's
        measured time."""
        original = self.outcome.original_ms
        predicted = [s.predicted_ms / original for s in self.outcome.steps]
        measured = [m / original for m in self.measured]
        scale = next_scale(self.scales, predicted, measured, self.goal / original)
        if all(m > self.goal for m in self.measured):
            # a cut a FLOPs budget bound was predicted under the aim, and its calibration corrected by its miss still
            # leaves it there (the same cut again); the calibration under which the round nearest the goal is
            # predicted what it measured makes the latency bind (for a cut the latency bound, the same correction)
            k = min(range(len(measured)), key=measured.__getitem__)
            if predicted[k] > 0.0:
                scale = max(scale, self.calibrated * measured[k] / predicted[k])
        return scale

    def _trial(self, scale: float) -> tuple[Cut, fx.GraphModule, CostModel]:
        """The cut to the aim under calibration ``scale``, its model and its cost model."""
        result, small = self.cut(replace(self.aim, scale=scale))
        return result, small, _cost(small)

    def next_cut(self) -> tuple[Cut, fx.GraphModule, float, CostModel]:
        """The next round's cut, its calibration and its cost model. Widths move in blocks, so a corrected
        calibration can give back a cut already measured; measuring it again would spend a round learning nothing,
        so the calibration is pushed on, halfway to the round measured on the goal's other side (or 3% where there is
        none), until the cut changes."""
        measured, scales = self.measured, self.scales
        scale = self._next_scale()
        for _ in range(_NUDGES):
            result, small, cost = self._trial(scale)
            same = [k for k, s in enumerate(self.outcome.steps) if s.flops == cost.flops()]
            if not same:
                return result, small, scale, cost
            k = same[-1]
            if measured[k] < self.goal:  # that cut was too small: a lower calibration predicts less, and keeps more
                other = [scales[j] for j, m in enumerate(measured) if m > self.goal]
                scale = (scale + max(other)) / 2 if other else scale * 0.97
            else:
                other = [scales[j] for j, m in enumerate(measured) if m < self.goal]
                scale = (scale + min(other)) / 2 if other else scale * 1.03
        result, small, cost = self._trial(scale)
        return result, small, scale, cost

    def corrected_cut(self) -> tuple[Cut, fx.GraphModule, float, CostModel]:
        """The next round's cut (:meth:`next_cut`) or, where the correction asks for less than the model predicts any
        cut reaches, the cut nearest that floor (:func:`_first_cut` from the corrected calibration). The correction
        carries the model's error where the rounds measured, and its error on the smallest cuts differs (a
        mobilenet_v2 cut to a quarter of its FLOPs measured 13% under its prediction), so the floor is measured
        before the rounds give up; a floor already measured ends them (:class:`BudgetError`)."""
        try:
            return self.next_cut()
        except BudgetError:
            scale = self._next_scale()
            result, small, scale, _ = _first_cut(self.cut, self.aim.micros, self.aim.profile, scale)
            cost = _cost(small)
            if any(s.flops == cost.flops() for s in self.outcome.steps):
                raise
            return result, small, scale, cost


_RELAX = 0.85
"""Where the model predicts the budget out of reach, the calibration is lowered by this factor (up to
:data:`_RELAXATIONS` times) to find the cut it predicts nearest, which is then measured: a model that predicts
small cuts too slow must not refuse a budget they meet."""
_RELAXATIONS = 8


def _first_cut(
    cut: Callable[[LatencyBudget], tuple[Cut, fx.GraphModule]], aim_us: float, profile: RuntimeProfile, scale: float
) -> tuple[Cut, fx.GraphModule, float, BudgetError | None]:
    """The first round's cut, its calibration and, where the model predicted the budget out of reach, why."""
    refused: BudgetError | None = None
    for _ in range(_RELAXATIONS + 1):
        try:
            result, small = cut(LatencyBudget(aim_us, profile, scale))
            return result, small, scale, refused
        except BudgetError as exc:
            refused = refused or exc
            scale *= _RELAX
    assert refused is not None
    raise refused


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
    meter = _Meter(SteadyTimer(runtime), gm, inputs)
    budget_ms = parse_latency(budget, meter.original_ms)
    cost = CostModel(cg)
    predicted = LatencyFunction(cost, profile)(cost.widths())
    outcome = LatencyOutcome(runtime.describe(), budget_ms, meter.original_ms, predicted / 1e3, seconds)
    goal = budget_ms * (1.0 - TOLERANCE / 2)  # the middle of the window: noise either side still lands in it
    calibrated = scale = meter.original_ms * 1e3 / predicted  # the model then predicts the original's measured time
    rounds: _Rounds[Cut] = _Rounds(cut, LatencyBudget(goal * 1e3, profile), goal, outcome, calibrated)
    results: list[Cut] = []
    kept: list[tuple[fx.GraphModule, CostModel, list[float]]] = []  # each round's model, its cost and its runs
    refused: BudgetError | None = None
    for _ in range(ROUNDS):
        try:
            if not rounds.scales:
                result, small, scale, refused = _first_cut(cut, rounds.aim.micros, profile, scale)
                small_cost = _cost(small)
            else:
                result, small, scale, small_cost = rounds.corrected_cut()
        except BudgetError as exc:
            if not rounds.scales:
                raise _below_reach(budget, budget_ms, outcome, exc) from exc
            break  # the corrections pushed the cut out of the model's reach: what was measured decides
        # what the model calibrated on the original predicts for the cut (the rounds' scales only steer the cuts)
        predicted_ms = _predicted_us(small_cost, runtime, profile, calibrated) / 1e3
        runs = meter.round(small, budget_ms)
        step = _step(predicted_ms, runs, small_cost, budget_ms)
        outcome.steps.append(step)
        results.append(result)
        kept.append((small, small_cost, runs))
        rounds.scales.append(scale)
        logger.info("budget %.2f ms: predicted %.2f ms, measured %s ms", budget_ms, predicted_ms, runs)
        confirmed = step.confirmed or _look_again(outcome, kept, meter, goal)
        outcome.retaken = meter.timer.retaken
        if confirmed:
            break
    measured = rounds.measured
    under = [k for k, s in enumerate(outcome.steps) if s.measured_ms <= budget_ms]
    if not under:
        if refused is not None and min(measured) > budget_ms:  # even the smallest cut measured above the budget
            raise _below_reach(budget, budget_ms, outcome, refused, min(measured))
        times = ", ".join(f"{s.measured_ms:.2f}" for s in outcome.steps)
        raise BudgetError(
            f"no cut met the latency budget of {budget_ms:.2f} ms in {len(measured)} round(s) (measured {times} ms on "
            f"{outcome.runtime}): the machine may be too busy to measure steadily, or the budget is near what the "
            "model can reach. Retry on a quieter machine, or raise the budget."
        )
    # a confirmed round (the last) if any, else the round whose median came closest to the budget from under it
    outcome.chosen = max(under, key=lambda k: (outcome.steps[k].confirmed, outcome.steps[k].measured_ms))
    return results[outcome.chosen], outcome


def _step(predicted_ms: float, runs: list[float], cost: CostModel, budget_ms: float) -> LatencyStep:
    """A round's record: its cut measured ``runs`` times (milliseconds), confirmed where it was measured again and
    the median of its runs landed in the window's guarded band (:func:`_in_band`)."""
    measured = statistics.median(runs)
    confirmed = len(runs) > 1 and _in_band(measured, budget_ms)
    spread = max(runs) - min(runs)
    return LatencyStep(predicted_ms, measured, cost.flops(), cost.params(), len(runs), spread, confirmed)


def _in_band(measured_ms: float, budget_ms: float) -> bool:
    """Whether ``measured_ms`` lies in the window, :data:`GUARD` inside its lower edge and :data:`TOP_GUARD` under
    the budget."""
    return budget_ms * (1.0 - TOLERANCE + GUARD) <= measured_ms <= budget_ms * (1.0 - TOP_GUARD)


@dataclass
class _Meter:
    """Measures cuts beside the original ``gm`` on ``inputs``: each cut's ratio to it as the runtime measures them
    interleaved (so the machine's drift falls on both), times the original's own time (the faster of two
    measurements: one may fall while the machine is busy)."""

    timer: SteadyTimer
    gm: fx.GraphModule
    inputs: tuple[Any, ...]
    original_ms: float = 0.0

    def __post_init__(self) -> None:
        for _ in range(2):
            self.timer.measure({"original": self.gm}, self.inputs)
        self.original_ms = self.timer.fastest_ms

    def once(self, small: fx.GraphModule) -> float:
        """One measurement of ``small``, in milliseconds."""
        timing = self.timer.measure({"original": self.gm, "result": small}, self.inputs)
        return timing["result"].ratio * self.original_ms

    def round(self, small: fx.GraphModule, budget_ms: float) -> list[float]:
        """A round's measurements of ``small``: one, or more where the first lands in the window's guarded band
        (:meth:`confirm`)."""
        runs = [self.once(small)]
        return self.confirm(small, runs, budget_ms) if _in_band(runs[0], budget_ms) else runs

    def confirm(self, small: fx.GraphModule, runs: list[float], budget_ms: float) -> list[float]:
        """``runs`` of ``small`` measured up to :data:`CONFIRMATIONS` in all, and up to :data:`SETTLE` where those
        lie more than :data:`AGREEMENT` of the budget apart."""
        runs = runs + [self.once(small) for _ in range(CONFIRMATIONS - len(runs))]
        if max(runs) - min(runs) > AGREEMENT * budget_ms:
            logger.info("measurements %s ms disagree: measuring up to %d times", runs, SETTLE)
            runs += [self.once(small) for _ in range(SETTLE - len(runs))]
        return runs


def _look_again(
    outcome: LatencyOutcome, kept: list[tuple[fx.GraphModule, CostModel, list[float]]], meter: _Meter, goal: float
) -> bool:
    """Measure again the round whose single measurement stalled the rounds
    (:func:`~fxmorph.api.latency_corrections.stalled_end`), up to :data:`CONFIRMATIONS` in all, and record the median;
    whether that round is now confirmed in the window."""
    steps = outcome.steps
    k = stalled_end([s.measured_ms for s in steps], [s.runs for s in steps], goal)
    if k is None:
        return False
    small, cost, runs = kept[k]
    runs = meter.confirm(small, runs, outcome.budget_ms)
    kept[k] = small, cost, runs
    steps[k] = _step(steps[k].predicted_ms, runs, cost, outcome.budget_ms)
    logger.info("round %d stalled the rounds: measured again, %s ms", k + 1, runs)
    return steps[k].confirmed


def _below_reach(
    budget: object, budget_ms: float, outcome: LatencyOutcome, exc: BudgetError, smallest_ms: float | None = None
) -> BudgetError:
    """The error of a latency budget below what the model reaches (as predicted, or as the smallest cut measured)."""
    measured = "" if smallest_ms is None else f" The smallest cut the model allows measured {smallest_ms:.3g} ms."
    return BudgetError(
        f"budget_latency {budget!r} ({budget_ms:.3g} ms of the model's measured {outcome.original_ms:.3g} ms on "
        f"{outcome.runtime}) is below what this model can reach: {exc}{measured}"
    )
