"""Small helpers shared by the rule modules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.kernels import Kernel, conv_kernel, gemm_kernel

__all__ = ["call_conv_kernel", "norm_dim", "op_name", "pin_positions", "pin_unknown", "rows_kernel"]


def norm_dim(dim: int, ndim: int) -> int:
    """A possibly negative dim as a non-negative index."""
    return dim + ndim if dim < 0 else dim


def op_name(target: Any) -> str:
    """Readable name of a node target."""
    return getattr(target, "__name__", str(target))


def pin_unknown(ctx: RuleContext, node: fx.Node, why: str) -> None:
    """Pin everything a node touches, naming the op."""
    ctx.pin_all((node.args, node.kwargs), f"{why} in {node.op} '{op_name(node.target)}'")


def pin_positions(ctx: RuleContext, spaces: Spaces, channel_dim: int, what: str) -> None:
    """Pin the channels on the dims after ``channel_dim`` of a layer's input (its spatial dims).

    A convolution or pixel shuffle reads those dims as positions: a window slides over them, so an output
    position mixes several input positions (or moves to another dim) and no output dim carries their
    channels. Left out of the output unpinned, they would leave the output's spatial size fixed while a
    plan changes the input's (a block's attention matrix multiplied into the spatial dims, timm's BAT).
    """
    for d, layout in spaces.items():
        if d > channel_dim:
            ctx.pin(layout, f"{what} reads channels on a spatial dim as positions")


def call_conv_kernel(node: fx.Node, sx: Sequence[int], sw: Sequence[int], groups: int) -> Kernel | None:
    """The kernel of a call ``conv2d(x, w, b, stride, padding, dilation, groups)`` of input and weight shapes
    ``sx`` and ``sw`` (see :func:`~fxmorph.analysis.kernels.conv_kernel`)."""
    named = dict(zip(("stride", "padding", "dilation"), node.args[3:6], strict=False)) | dict(node.kwargs)
    return conv_kernel(sx, sw, named.get("stride", 1), named.get("padding", 0), named.get("dilation", 1), groups)


def rows_kernel(rows: Sequence[Layout | int]) -> Kernel | None:
    """The GEMM kernel of a product with a weight whose output rows are ``rows`` (None where channels live in
    them: a batch the plan can change is not a fixed kernel)."""
    if not all(isinstance(r, int) for r in rows):
        return None
    return gemm_kernel(math.prod(rows))  # type: ignore[arg-type]
