"""Parsing FLOPs budgets: absolute numbers, fractions of the model, percentages and suffixes."""

from __future__ import annotations

import math
import numbers
import re

from fxmorph.errors import BudgetError

__all__ = ["parse_any_budget", "parse_budget"]

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT%]?)\s*(?:FLOPS?)?\s*$", re.IGNORECASE)
_HELP = 'use a fraction (0.5), a percentage ("50%"), or absolute FLOPs (3.5e8, "1.2G")'


def parse_budget(budget: float | int | str, model_flops: int) -> int:
    """Absolute FLOPs for ``budget`` given the model's FLOPs.

    A number in (0, 1] is a fraction of ``model_flops``; a number above 1 is absolute FLOPs; a string
    may be a percentage (``"50%"``), a number with a K/M/G/T suffix (``"1.2G"``) or a plain number.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real | str):  # NumPy scalars are Real
        raise BudgetError(f"budget_flops must be a number or a string, got {type(budget).__name__}: {_HELP}.")
    if isinstance(budget, str):
        match = _PATTERN.match(budget)
        if not match:
            raise BudgetError(f"cannot parse budget '{budget}': {_HELP}.")
        value, suffix = float(match.group(1)), match.group(2).upper()
        if suffix == "%":
            return _check(value / 100.0, model_flops, budget, percent=True)
        return _check(value * _SUFFIX[suffix], model_flops, budget, percent=False)
    return _check(float(budget), model_flops, budget, percent=False)


def _check(value: float, model_flops: int, raw: object, percent: bool) -> int:
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise BudgetError(f"budget {raw!r} must be a positive, finite amount: {_HELP}.")
    if percent:
        if value > 1:
            raise BudgetError(f"budget {raw!r} is above 100%: shrink needs a budget at most the model's FLOPs.")
        return math.floor(value * model_flops)
    return math.floor(value * model_flops) if value <= 1 else int(value)


def parse_any_budget(budget_flops: float | int | str, flops: int) -> int:
    """Like :func:`parse_budget`, but percentages may exceed 100% (``"150%"``), as growth needs."""
    if isinstance(budget_flops, str) and budget_flops.strip().endswith("%"):
        try:
            value = float(budget_flops.strip()[:-1])
        except ValueError as exc:
            raise BudgetError(f"cannot parse budget '{budget_flops}': use for example '150%' or 1.2e9.") from exc
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"budget {budget_flops!r} must be a positive, finite percentage.")
        return math.floor(value / 100.0 * flops)
    return parse_budget(budget_flops, flops)
