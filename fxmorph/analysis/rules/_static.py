"""Python values of graph nodes that depend only on propagated shapes (window sizes, ``thw`` tuples).

Shape propagation records tensor shapes, not the Python numbers a model computes from them. Some
rules need those numbers to count FLOPs (the window size of a Swin block, the token grid of a pooled
attention). :func:`static_value` recomputes them from constants, tensor shapes and a short list of
pure helpers; anything else is :data:`UNKNOWN`, and the rule that asked pins instead of guessing.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

from torch import fx

from fxmorph.analysis.context import RuleContext

__all__ = ["UNKNOWN", "static_value"]

UNKNOWN: Any = object()
"""A value :func:`static_value` could not compute."""

_ARITHMETIC: set[Callable[..., Any]] = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
}  # fmt: skip


def static_value(ctx: RuleContext, arg: Any, pure: frozenset[Any] = frozenset(), depth: int = 0) -> Any:
    """The Python value of ``arg`` (a node argument) computed from constants and propagated shapes.

    Understood: literals and containers of them, ``x.shape``/``x.size()``/``x.size(d)``, indexing and
    integer arithmetic of those, and calls of the functions in ``pure`` (called on copies of their
    arguments, so helpers that mutate a list argument, as torchvision's ``_get_window_and_shift_size``
    does, cannot alter the graph). The size of a dim that carries channels is unknown: it changes
    with the plan. Returns :data:`UNKNOWN` for anything else, and for any value that depends on one.
    """
    value = _value(ctx, arg, pure, depth)
    return UNKNOWN if _has_unknown(value) else value


def _has_unknown(value: Any) -> bool:
    """True if ``value`` is :data:`UNKNOWN` or a list or tuple holding it at any depth."""
    if isinstance(value, list | tuple):
        return any(_has_unknown(v) for v in value)
    return value is UNKNOWN


def _shape(ctx: RuleContext, tensor: Any) -> Any:
    """A tensor's shape with the sizes of channel dims unknown."""
    shape = ctx.shape(tensor)
    if shape is None:
        return UNKNOWN
    channels = ctx.spaces(tensor)
    return tuple(UNKNOWN if d in channels else n for d, n in enumerate(shape))


def _value(ctx: RuleContext, arg: Any, pure: frozenset[Any], depth: int) -> Any:
    """The value of ``arg``, possibly a container that holds :data:`UNKNOWN` parts (a shape with a channel
    dim), which indexing may still pick known items from; :func:`static_value` rejects what remains."""
    if depth > 32:  # a chain this long is not a shape computation; give up rather than recurse
        return UNKNOWN
    if isinstance(arg, list | tuple):
        values = [static_value(ctx, a, pure, depth + 1) for a in arg]
        return list(values) if isinstance(arg, list) else tuple(values)  # plain: fx's containers are immutable
    if not isinstance(arg, fx.Node):
        return arg
    if arg.op == "call_method" and arg.target == "size":
        shape = _shape(ctx, arg.args[0])
        dims = [static_value(ctx, a, pure, depth + 1) for a in [*arg.args[1:], *arg.kwargs.values()]]
        if shape is UNKNOWN or any(not isinstance(d, int) for d in dims):
            return UNKNOWN
        return shape[dims[0]] if dims else shape  # ``x.size(d)``, or ``x.size()`` whole
    if arg.op != "call_function":
        return UNKNOWN
    if arg.target is getattr and arg.args[1:] == ("shape",):
        return _shape(ctx, arg.args[0])
    # _value, not static_value: a shape with unknown channel sizes must survive to the getitem below
    args = [_value(ctx, a, pure, depth + 1) for a in arg.args]
    kwargs = {k: static_value(ctx, v, pure, depth + 1) for k, v in arg.kwargs.items()}
    if arg.target is operator.getitem and not kwargs and len(args) == 2 and not _has_unknown(args[1]):
        try:  # indexing may pick known sizes out of a shape whose channel sizes are unknown
            return args[0][args[1]]
        except (TypeError, IndexError, KeyError):
            return UNKNOWN
    if _has_unknown(args) or _has_unknown(list(kwargs.values())):
        return UNKNOWN
    if arg.target in _ARITHMETIC and not kwargs:
        try:
            return arg.target(*args)
        except (TypeError, ZeroDivisionError):
            return UNKNOWN
    if arg.target in pure:
        try:
            return arg.target(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        except Exception:  # a helper that fails on these values tells the caller nothing: unknown
            return UNKNOWN
    return UNKNOWN
