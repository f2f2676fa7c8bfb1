"""Parsing budgets: FLOPs (absolute numbers, fractions of the model, percentages and suffixes) and latency
(fractions and percentages of the measured model, or times with a unit)."""

from __future__ import annotations

import math
import numbers
import re

from fxmorph.errors import BudgetError

__all__ = ["parse_any_budget", "parse_budget", "parse_latency"]

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


_TIME_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%|s|ms|us|µs)?\s*$", re.IGNORECASE)
_LATENCY_HELP = 'use a fraction of the measured latency (0.6), a percentage ("60%") or a time ("12ms", "800us")'


def parse_latency(budget: float | int | str, model_ms: float) -> float:
    """Milliseconds for the latency ``budget`` given the model's measured ``model_ms``.

    A number in (0, 1] or a percentage (``"60%"``) is a share of the model's latency; a string with a unit (``"12ms"``,
    ``"0.5s"``, ``"800us"``) a time. A bare number above 1 has no unit and is refused."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real | str):
        raise BudgetError(f"budget_latency must be a number or a string, got {type(budget).__name__}: {_LATENCY_HELP}.")
    if isinstance(budget, str):
        match = _TIME.match(budget)
        if not match:
            raise BudgetError(f"cannot parse budget_latency {budget!r}: {_LATENCY_HELP}.")
        value, unit = float(match.group(1)), (match.group(2) or "").lower()
        if not unit:  # a plain number, as a command line gives it: a share, or a time without its unit
            return _plain(value, budget, model_ms)
        if unit == "%":
            return _share(value / 100.0, budget, model_ms)
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"budget_latency {budget!r} must be a positive, finite time: {_LATENCY_HELP}.")
        return value * _TIME_UNITS[unit]
    return _plain(float(budget), budget, model_ms)


def _plain(value: float, raw: object, model_ms: float) -> float:
    """A number without a unit: a share of ``model_ms`` up to 1, refused above (a time needs its unit)."""
    if value > 1:
        raise BudgetError(f"budget_latency {raw!r} has no unit: {_LATENCY_HELP}.")
    return _share(value, raw, model_ms)


def _share(value: float, raw: object, model_ms: float) -> float:
    """``value`` of ``model_ms``, for a share in (0, 1]."""
    if not math.isfinite(value) or value <= 0 or value > 1:
        raise BudgetError(
            f"budget_latency {raw!r} must be a share of the model's latency in (0, 100%]: shrink cannot make a model "
            f"slower; {_LATENCY_HELP}."
        )
    return value * model_ms
