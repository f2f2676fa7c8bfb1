"""Small helpers shared by the rule modules."""

from __future__ import annotations

from typing import Any

from torch import fx

from fxmorph.analysis.context import RuleContext

__all__ = ["norm_dim", "op_name", "pin_unknown"]


def norm_dim(dim: int, ndim: int) -> int:
    """A possibly negative dim as a non-negative index."""
    return dim + ndim if dim < 0 else dim


def op_name(target: Any) -> str:
    """Readable name of a node target."""
    return getattr(target, "__name__", str(target))


def pin_unknown(ctx: RuleContext, node: fx.Node, why: str) -> None:
    """Pin everything a node touches, naming the op."""
    ctx.pin_all((node.args, node.kwargs), f"{why} in {node.op} '{op_name(node.target)}'")
