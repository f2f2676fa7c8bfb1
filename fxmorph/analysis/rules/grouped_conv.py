"""``F.conv*d`` / ``torch.conv*d`` with parameters used directly, any group count: what an exported graph (or a
model calling the functional form) has where symbolic tracing has an ``nn.Conv2d`` module.

``groups == 1`` is :func:`~fxmorph.analysis.rules.compute.functional_conv`. A depthwise call (one input channel
per group) passes its channels through, each with its multiplier of outputs, and its ``groups`` argument is the
input width, rewritten with it. Another grouped call keeps its group count and loses the same positions in
every group, as :func:`~fxmorph.analysis.rules.modules.conv` does for the module.
"""

from __future__ import annotations

import math

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ArgSlot, RuleContext, Spaces
from fxmorph.analysis.rules._util import call_conv_kernel, pin_positions
from fxmorph.analysis.rules.compute import functional_conv, no_rule
from fxmorph.analysis.rules.modules import _depthwise_out, _grouped_in, _repeat

__all__ = ["any_conv"]


def _groups(node: fx.Node) -> tuple[int | None, ArgSlot]:
    """The group count of the call (None when it is not a plain int) and where it is written."""
    if len(node.args) > 6:
        value, slot = node.args[6], ArgSlot(6)
    else:
        value, slot = node.kwargs.get("groups", 1), ArgSlot("groups")
    return (value if isinstance(value, int) and not isinstance(value, bool) else None), slot


def _tie(ctx: RuleContext, layout: Layout | None, other: Layout | None, reason: str) -> Layout | None:
    """``layout`` and ``other`` (a weight's or bias's dim) as one layout; a fixed ``layout`` pins ``other``."""
    if other is None:
        return layout
    if layout is None:
        ctx.pin(other, reason)
        return None
    return ctx.unify([layout, other], reason)


def any_conv(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``conv*d(x, w, b, stride, padding, dilation, groups)`` on tensors (see the module docstring)."""
    groups, slot = _groups(node)
    if groups == 1:
        return functional_conv(ctx, node)
    x, w = node.args[0], node.args[1]
    sx, so, sw = ctx.shape(x), ctx.shape(node), ctx.shape(w)
    if groups is None or sx is None or so is None or sw is None or len(sx) != len(sw) or not isinstance(w, fx.Node):
        return no_rule(ctx, node)
    pin_positions(ctx, ctx.spaces(x), 1, "a convolution")
    ws = ctx.spaces(w)
    for d in range(2, len(sw)):  # kernel positions are not channels
        if d in ws:
            ctx.pin(ws[d], "kernel dim of a convolution weight used directly")
    lin, cin_g, cout = ctx.spaces(x).get(1), sw[1], sw[0]
    fan_in: Layout | int
    if cin_g == 1:  # depthwise: output channel j reads input channel j // multiplier
        fan_in, lout = 1, _depthwise_out(ctx, lin, groups, cout // groups)
        if 1 in ws:
            ctx.pin(ws[1], "a depthwise weight's input dim (one channel per group)")
        if lin is not None:
            ctx.rewrite(slot, lambda measure: measure(lin))  # the group count is the input width
    else:
        fan_in = _grouped_in(ctx, lin, groups, cin_g)
        if 1 in ws:
            tied = _tie(ctx, None if isinstance(fan_in, int) else fan_in, ws[1], "grouped convolution's fan-in")
            fan_in = fan_in if tied is None else tied
        elif not isinstance(fan_in, int):  # a weight of fixed fan-in (computed, say) reads a fixed width
            ctx.pin(fan_in, "a grouped convolution's weight has a fixed input width")
            fan_in = cin_g
        lout = _repeat(ctx.fresh(cout // groups), groups)
    if 0 not in ws and lout is not None:  # a weight of fixed output width makes a fixed width
        ctx.pin(lout, "a convolution's weight has a fixed output width")
        lout = None
    lout = _tie(ctx, lout, ws.get(0), "convolution output channels do not line up with its weight")
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(b, fx.Node):
        lout = _tie(ctx, lout, ctx.spaces(b).get(0), "convolution bias does not line up")
    out = {d: lay for d, lay in ctx.spaces(x).items() if d == 0}
    if lout is not None:
        out[1] = lout
    # 2 x output positions x kernel size x batch x one group's inputs x all outputs
    batch = out.get(0, so[0])
    kernel = call_conv_kernel(node, sx, sw, groups) if isinstance(batch, int) else None
    axes = (lin or sx[1],) if cin_g == 1 else (lin or sx[1], lout or so[1])
    ctx.cost(2 * math.prod(so[2:]) * math.prod(sw[2:]), batch, fan_in, lout or so[1], kernel=kernel, axes=axes)
    return out
