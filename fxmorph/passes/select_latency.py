"""Choosing among latency selections: the one that keeps the most FLOPs, and more parameters than a FLOPs budget.

Under a latency budget a step's take of the model is its share of the FLOPs plus ``param_value`` times its share of
the parameters (:func:`~fxmorph.passes.select.greedy_widths`), and which ``param_value`` serves a model best is not
one number: where two kinds of cut run alike (densenet121's whole dense layers against thinner ones) the selection
swings between them with a small change of the value, or of the latency tables' noise. Cut to 48.75% of its
predicted latency, densenet121 kept 51.5% of its FLOPs and 21% of its parameters at a value of 0, 49.2% and 39% at
0.05, 47.5% and 54% at 0.06; the FLOPs budget keeps 35% and 33% there. efficientnet_b0 cut to 29% kept 26.2% and 38%
at 0.08 and 28.4% and 55% at 0.16, more of both.

So a latency budget selects at every value of :data:`DEFAULT_PARAM_VALUES` and keeps the selection with the most
FLOPs among those that keep as many parameters as the FLOPs budget does at the same latency (:func:`pick`): the FLOPs
budget is what a latency budget must beat, and its FLOPs are what it is for. The FLOPs budget's cut at that latency
is found by bisection over its budget (:func:`flops_reference`), with the pass's own FLOPs settings, where the model
predicts it as fast as the selection.

The FLOPs budget's own cut at the latency budget is a candidate too, and keeps its place against selections that keep
the same FLOPs and parameters as far as the model can tell (:data:`FLOPS_TIE`): a latency budget departs from the even
cut only for a gain its model can see. vit_b_16's time follows its FLOPs in every shape of cut, and the selection's
uneven shape of it (the stream thinned to 60 channels a head) kept 0.1 to 1.0 points fewer FLOPs than the FLOPs budget
at the same measured latency in all six of session 25's comparisons (``benchmarks/RESULTS.md``).

Until the latency tables were timed by wall clock (``benchmarks/RESULTS.md``, session 21) the reference was taken 4% of
the original's time slower than the selection, because the profiler's tables predicted the FLOPs budget's evenly thinned
cuts slower than they ran. Timed by wall clock they predict them up to 5.5% faster than they run at 60 to 90% of the
FLOPs and 3.4 to 8.6% faster at 30% (six models), so the FLOPs budget's cut that measures as fast as the selection is
the one predicted a little faster than it, a deeper cut that keeps fewer parameters than the reference: the comparison
at equal prediction asks a little more of the selection than the measured one would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fxmorph.analysis.cost import CostModel
from fxmorph.errors import InputError

__all__ = [
    "DEFAULT_PARAM_VALUES",
    "FLOPS_TIE",
    "KEEPS",
    "Candidate",
    "LatencyKeep",
    "Reference",
    "flops_reference",
    "latency_widths",
    "pick",
]

logger = logging.getLogger(__name__)

DEFAULT_PARAM_VALUES = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.12, 0.16, 0.32)
"""The parameter values a latency budget selects at (``param_value`` of
:func:`~fxmorph.passes.select.greedy_widths`): denser where densenet121's cut turns from removing dense layers to
thinning them (0.04 to 0.06)."""

LatencyKeep = Literal["model", "flops"]
"""What a latency budget keeps the most of: ``"model"`` (the default), the most FLOPs among the cuts that keep at least
the parameters a FLOPs budget keeps at the same latency (:func:`pick` over :data:`DEFAULT_PARAM_VALUES`); ``"flops"``,
the most FLOPs, parameters not valued (a parameter value of 0). They differ where whole layers run slower than their
FLOPs say: densenet121 cut to half its latency keeps 48.6% of its FLOPs and 53.8% of its parameters under ``"model"``
(measured at 49.3% of its latency, session 26), 51.3% and 24.5% under ``"flops"`` (48.6%, 37 of its 58 dense layers
removed, session 25), where a FLOPs budget keeps 39.5 to 40.9% and 34.8 to 35.3% (``benchmarks/LATENCY_BUDGET.md``)."""

KEEPS: dict[LatencyKeep, tuple[float, ...]] = {"model": DEFAULT_PARAM_VALUES, "flops": (0.0,)}
"""The parameter values each :data:`LatencyKeep` selects at."""

FLOPS_TIE = 0.01
"""Selections whose FLOPs lie within this share of the FLOPs they keep of each other keep the same FLOPs as far as the
latency model can tell: the one with more parameters is kept. The tie is relative, as the model's errors are (a few
percent of a cut's time): a point of the model's FLOPs is 1.4% of a cut to 75% and 3.6% of one to 28%. Taken as a
point of the model's FLOPs until session 26, it let resnet50 cut to 29% of its predicted latency trade 0.96 points of
FLOPs for 19 of parameters (26.9% and 40.7% at a value of 0.12 against 27.9% and 21.9% at 0.04); its eleven cuts,
predicted alike, measured alike within their runs' noise (29.3 to 30.8% of the original's latency, 3 runs,
``benchmarks/RESULTS.md``), so what the trade gave up was FLOPs at the same latency."""

_BISECTIONS = 10
"""Halvings of the FLOPs budget's bracket: its last interval is a thousandth of the model's FLOPs."""


@dataclass(frozen=True)
class Candidate:
    """One selection: its parameter value (``None``: the FLOPs budget's cut), widths and predicted cost, and the shares
    of the model's FLOPs and parameters it keeps beside the parameters the FLOPs budget keeps at the same predicted
    latency."""

    param_value: float | None
    widths: np.ndarray
    spent: float
    flops: float
    params: float
    reference_params: float

    @property
    def leads(self) -> bool:
        """Whether it keeps as many parameters as the FLOPs budget."""
        return self.params >= self.reference_params

    @property
    def even(self) -> bool:
        """Whether it is the FLOPs budget's cut."""
        return self.param_value is None

    @property
    def label(self) -> str:
        """What the log calls it."""
        return "the FLOPs budget's cut" if self.even else f"at parameter value {self.param_value:g}"


def pick(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the most FLOPs among those that lead the FLOPs budget in parameters (of those within
    :data:`FLOPS_TIE` of the most, the one with the most parameters), or, where none does, the one with the most
    parameters over the FLOPs budget's.

    The FLOPs budget's cut, where it is a candidate, keeps its place against a selection within :data:`FLOPS_TIE` of it
    in both FLOPs and parameters: the latency model cannot tell such cuts apart, and where it cannot, the even cut runs
    at least as fast per FLOP (vit_b_16 cut to 72.5% of its FLOPs: 0.978 of the FLOPs per share of the latency by the
    FLOPs budget, 0.970 in the shape of the selection, 60 channels a head; `benchmarks/VIT_STRUCTURES.md`)."""
    if not candidates:
        raise InputError("no latency selection to choose from: pass at least one parameter value (param_values).")
    leading = [c for c in candidates if c.leads]
    if not leading:
        return max(candidates, key=lambda c: c.params / max(c.reference_params, 1e-12))
    most = max(c.flops for c in leading)
    tied = [c for c in leading if c.flops >= most * (1 - FLOPS_TIE)]
    chosen = max(tied, key=lambda c: (c.params, c.flops))
    even = next((c for c in tied if c.even), None)
    if even is not None and chosen.params <= even.params * (1 + FLOPS_TIE):
        return even  # tied with the even cut in FLOPs (it is among the tied) and in parameters
    return chosen


@dataclass(frozen=True)
class Reference:
    """The FLOPs budget at the latency a selection predicts: the share of the model's parameters it keeps as a function
    of the predicted cost (``params_at``), and its deepest cut predicted at or under the target (``widths``, ``None``
    where none is)."""

    params_at: Callable[[float], float]
    widths: np.ndarray | None


def flops_reference(cost: CostModel, flops_widths: Callable[[float], np.ndarray], target: float) -> Reference:
    """The FLOPs budget about ``target``: its cuts (``flops_widths(budget in FLOPs)``) at FLOPs budgets bisected until
    their predicted cost (``cost.spent``) brackets ``target``, the parameters they keep interpolated between them, and
    the cut at the bracket's lower end."""
    total, params = float(cost.flops()), max(float(cost.params()), 1.0)  # a model without weights keeps none
    points = {cost.spent(): 1.0}
    low, high = 0.0, total
    under: np.ndarray | None = None
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        widths = flops_widths(middle)
        spent = cost.spent(widths)
        points[spent] = cost.params(widths) / params
        if spent > target:
            high = middle
        else:
            low, under = middle, widths
    spents = sorted(points)
    kept = [points[s] for s in spents]
    return Reference(lambda spent: float(np.interp(spent, spents, kept)), under)


def latency_widths(
    cost: CostModel,
    widths_at: Callable[[float], np.ndarray],
    flops_widths: Callable[[float], np.ndarray],
    budget: float,
    param_values: Sequence[float] = DEFAULT_PARAM_VALUES,
) -> np.ndarray:
    """The widths :func:`pick` keeps among ``widths_at(value)`` for every value of ``param_values`` (``cost`` priced
    in predicted latency, ``budget`` in its units) and the FLOPs budget's cut at the budget, against the FLOPs budget's
    cuts ``flops_widths(budget in FLOPs)``."""
    if len(param_values) == 1:
        return widths_at(param_values[0])
    reference = flops_reference(cost, flops_widths, budget)
    flops, params = max(float(cost.flops()), 1.0), max(float(cost.params()), 1.0)

    def candidate(value: float | None, widths: np.ndarray) -> Candidate:
        spent = cost.spent(widths)
        kept = cost.flops(widths) / flops, cost.params(widths) / params
        return Candidate(value, widths, spent, *kept, reference.params_at(spent))

    candidates = [candidate(value, widths_at(value)) for value in param_values]
    if reference.widths is not None:
        candidates.append(candidate(None, reference.widths))
    for c in candidates:
        logger.debug(
            "latency candidate %s: %.2f%% of the FLOPs, %.2f%% of the parameters (the FLOPs budget: %.2f%%)",
            c.label,
            100 * c.flops,
            100 * c.params,
            100 * c.reference_params,
        )
    chosen = pick(candidates)
    logger.info(
        "latency selection %s: %.1f%% of the FLOPs, %.1f%% of the parameters (the FLOPs budget at the same latency: "
        "%.1f%% of the parameters)",
        chosen.label,
        100 * chosen.flops,
        100 * chosen.params,
        100 * chosen.reference_params,
    )
    return chosen.widths
