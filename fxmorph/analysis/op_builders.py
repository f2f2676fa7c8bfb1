"""How the op table's entries are built: the kinds of op (activations, pointwise arithmetic, pooling, data
movement) and the specialisers that refine an entry for one call (a leaky ReLU's slope, a pad's fill).

The table itself is :mod:`fxmorph.analysis.ops`; these only spell its entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxmorph.analysis.context import RuleContext
from fxmorph.analysis.facts import Call, OpFacts, OpKind, Rule, number
from fxmorph.analysis.rules import compute as rc

__all__ = [
    "act",
    "elu",
    "hardtanh",
    "inplace_by_name",
    "leaky",
    "move",
    "nearest",
    "pad",
    "pointwise",
    "pool",
    "prelu",
    "rrelu",
    "shape_only",
    "threshold",
    "view",
]


def act(rule: Rule = rc.passthrough, slope: float | None = None, *, zero: bool = True, **more: Any) -> OpFacts:
    """A nonlinear elementwise activation; ``zero``: ``f(0) = 0``; ``slope``: autograd's ``f'(0)``."""
    return OpFacts(rule, OpKind.ACTIVATION, zero_preserving=zero, slope_at_zero=slope, **more)


def pointwise(rule: Rule = rc.elementwise, slope: float | None = None, *, zero: bool = True, **more: Any) -> OpFacts:
    """Another elementwise op (arithmetic: ``zero`` means every operand zero gives zero)."""
    return OpFacts(rule, OpKind.POINTWISE, zero_preserving=zero, slope_at_zero=slope, **more)


def pool(rule: Rule, keeps: bool = False, slope: float | None = 1.0, **more: Any) -> OpFacts:
    """Pooling, padding, interpolation, reductions: zero stays zero; ``keeps``: so does any constant."""
    return OpFacts(rule, OpKind.POOL, zero_preserving=True, slope_at_zero=slope, keeps_constant=keeps, **more)


def move(rule: Rule) -> OpFacts:
    """Data movement: values are only rearranged, so zero stays zero and the slope is 1."""
    return OpFacts(rule, OpKind.MOVE, zero_preserving=True, slope_at_zero=1.0)


def view(rule: Rule) -> OpFacts:
    """Data movement that a runtime does without copying (a reshape, a new unit dim): :func:`move` that costs
    no time."""
    return move(rule).replace(copies=False)


def leaky(facts: OpFacts, call: Call) -> OpFacts:
    """Autograd takes the ``x <= 0`` side at 0: the slope is ``negative_slope`` (PyTorch's default 0.01)."""
    return facts.replace(slope_at_zero=number(call.arg("negative_slope", 1, 0.01)))


def elu(facts: OpFacts, call: Call) -> OpFacts:
    """``alpha * (exp(x) - 1)`` below 0, whose slope autograd uses at 0: ``alpha``."""
    return facts.replace(slope_at_zero=number(call.arg("alpha", 1, 1.0)))


def rrelu(facts: OpFacts, call: Call) -> OpFacts:
    """Out of training, ``rrelu`` is a leaky ReLU of slope ``(lower + upper) / 2``."""
    lower, upper = number(call.arg("lower", 1, 1 / 8)), number(call.arg("upper", 2, 1 / 3))
    return facts.replace(slope_at_zero=None if lower is None or upper is None else (lower + upper) / 2)


def hardtanh(facts: OpFacts, call: Call) -> OpFacts:
    """``clamp(x, min_val, max_val)``: autograd passes the gradient only strictly inside the bounds."""
    lo, hi = number(call.arg("min_val", 1, -1.0)), number(call.arg("max_val", 2, 1.0))
    if lo is None or hi is None:  # bounds computed in the graph: nothing is known
        return facts.replace(zero_preserving=False, slope_at_zero=None)
    return facts.replace(zero_preserving=lo <= 0 <= hi, slope_at_zero=1.0 if lo < 0 < hi else 0.0)


def threshold(facts: OpFacts, call: Call) -> OpFacts:
    """``x if x > threshold else value``."""
    limit, value = number(call.arg("threshold", 1, None)), number(call.arg("value", 2, None))
    if limit is None or value is None:
        return facts.replace(zero_preserving=False, slope_at_zero=None)
    # 0 passes through only if it lies above the threshold; otherwise it becomes ``value``
    return facts.replace(zero_preserving=limit < 0 or value == 0, slope_at_zero=1.0 if limit < 0 else 0.0)


def prelu(facts: OpFacts, call: Call) -> OpFacts:
    """Autograd's slope at 0 is the learned slope itself (the ``x <= 0`` side): the smallest in magnitude."""
    weight = getattr(call.module, "weight", None)
    # a meta or empty weight has no value to read: the entry's unknown slope stands
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return facts
    # one fact for every channel: the weakest slope, so a zero slope anywhere is seen
    return facts.replace(slope_at_zero=float(weight.detach().abs().min()))


def pad(facts: OpFacts, call: Call) -> OpFacts:
    """``F.pad`` with a nonzero constant fill does not keep zeros."""
    mode, value = call.arg("mode", 2, "constant"), call.arg("value", 3, None)
    # reflect, replicate and circular copy existing values; a constant fill of None means 0
    return facts.replace(zero_preserving=mode != "constant" or value in (None, 0, 0.0))


def nearest(facts: OpFacts, call: Call) -> OpFacts:
    """Nearest upsampling repeats values, so a constant channel stays that constant."""
    return facts.replace(keeps_constant=call.arg("mode", 1, "nearest") == "nearest")


def shape_only(ctx: RuleContext, node: fx.Node) -> None:
    """``x.dim()``: a number that no width changes."""
    return None


def inplace_by_name(table: dict[Any, OpFacts]) -> None:
    """Mark the ops PyTorch names in place (``relu_``, ``torch.sigmoid_``, ``x.add_``)."""
    for key, facts in table.items():
        name = key if isinstance(key, str) else getattr(key, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # ``relu_`` is in place; dunders such as ``__add__`` are not
            table[key] = facts.replace(inplace=True)
