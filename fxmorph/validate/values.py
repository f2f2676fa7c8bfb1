"""Checks of scalar and named arguments: callables, numbers, counts, seeds, module path prefixes, output
paths, export tolerances and option names."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxmorph.errors import InputError
from fxmorph.validate.model import model_dtype

__all__ = [
    "check_callable",
    "check_count",
    "check_number",
    "check_options",
    "check_out_path",
    "check_prefixes",
    "check_seed",
    "check_tolerances",
]


def check_callable(name: str, value: Any) -> None:
    """``value`` is None or callable."""
    if value is not None and not callable(value):
        raise InputError(
            f"{name} must be callable, got {type(value).__name__}: pass a function such as "
            "torch.nn.functional.cross_entropy."
        )


def check_number(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False
) -> float:
    """``value`` as a finite float (not a bool) within ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lower = "" if low is None else f"{'above' if open_low else 'at least'} {low:g}"
        upper = "" if high is None else f"at most {high:g}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise InputError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}.")
    return float(value)


def check_seed(seed: Any) -> int:
    """``seed`` as an int that ``torch.manual_seed`` takes (0 to 2**63 - 1; NumPy integers too)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**63:
        raise InputError(f"seed must be an int from 0 to 2**63 - 1, got {seed!r}.")
    return int(seed)


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int of at least {minimum}, got {value!r}.")
    return value


def check_prefixes(name: str, value: Any) -> tuple[str, ...]:
    """A sequence of module path prefixes (a lone string is refused: it would be read letter by letter)."""
    if isinstance(value, str):
        raise InputError(
            f"{name} must be a list of module path prefixes, got the string {value!r}: pass {name}=[{value!r}]."
        )
    prefixes = tuple(value) if isinstance(value, Iterable) else None
    if prefixes is None or not all(isinstance(v, str) for v in prefixes):
        raise InputError(f"{name} must be a list of module path prefixes (strings), got {value!r}.")
    return prefixes


def check_out_path(path: Any, what: str, *, error: type[Exception] = InputError) -> Path:
    """``path`` as a Path to a file that can be created: not a directory, its parent creatable."""
    if not isinstance(path, str | os.PathLike):
        raise error(f"{what} must be a path (str or pathlib.Path), got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory: pass a file path inside it, such as {path / 'model'}.")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise error(f"{what} {path} cannot be created: {blocker} is a file, not a directory.")
    return path


def check_tolerances(model: nn.Module, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``export_onnx``'s ``(rtol, atol)``: as given (finite, >= 0, not both 0), or the defaults for the model's
    dtype (float16 gets a few of its rounding steps); a bfloat16 model is refused."""
    half = model_dtype(model) == torch.float16
    if model_dtype(model) == torch.bfloat16:
        raise InputError(
            "the model is bfloat16: onnxruntime's CPU provider, which checks the file, lacks bfloat16 kernels for "
            "most operators, and numpy has no bfloat16. Export a float32 copy (`model.float()` with float32 "
            "inputs), or a float16 one."
        )
    # The float16 eps is 2**-10 (~1e-3): its default is ten of those steps.
    rtol = (1e-2 if half else 1e-4) if rtol is None else check_number("rtol", rtol, low=0.0)
    atol = (1e-3 if half else 1e-5) if atol is None else check_number("atol", atol, low=0.0)
    if rtol == 0 and atol == 0:
        raise InputError(
            "rtol and atol are both 0: onnxruntime and torch round differently, so no file would "
            "match; pass for example rtol=1e-4, atol=1e-5 (the float32 defaults)."
        )
    return rtol, atol


def check_options(name: str, given: Iterable[str], allowed: Callable[[str], bool], choices: Sequence[str]) -> None:
    """Every key of ``given`` is allowed; otherwise name the first unknown one and the choices."""
    for key in given:
        if not allowed(key):
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown {name} option {key!r}{hint}: choose from {', '.join(choices)}.")
