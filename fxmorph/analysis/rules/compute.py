"""Channel rules for computing ops: elementwise, reductions, matmul, attention, functional layers."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import Role, RuleContext, Spaces, Taint
from fxmorph.analysis.rules._util import call_conv_kernel, norm_dim, op_name, pin_positions, rows_kernel
from fxmorph.analysis.rules.shape import number_op

__all__ = [
    "attribute",
    "contract",
    "elementwise",
    "functional_conv",
    "functional_linear",
    "matmul",
    "no_rule",
    "output",
    "passthrough",
    "placeholder",
    "reduce",
    "softmax",
    "spatial",
    "statistic",
]


def no_rule(ctx: RuleContext, node: fx.Node) -> None:
    """Anything without a rule pins every group it touches; its output carries no channels."""
    what = type(ctx.module()).__name__ if node.op == "call_module" else op_name(node.target)
    ctx.pin_all((node.args, node.kwargs), f"no channel rule for {node.op} '{what}'")
    return None


def placeholder(ctx: RuleContext, node: fx.Node) -> None:
    """Model inputs have fixed widths."""
    return None


def output(ctx: RuleContext, node: fx.Node) -> None:
    """Model outputs keep their widths."""
    ctx.pin_all(node.args, "model output")
    return None


def attribute(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``get_attr``: a parameter or buffer used directly; each dim wider than one is a channel space."""
    value = _fetch(ctx.gm, str(node.target))
    if not isinstance(value, torch.Tensor) or not node.users:
        return None  # a tensor the graph holds but never reads (a buffer kept for other uses) has no channels
    spaces: Spaces = {}
    for d, n in enumerate(value.shape):
        # a dim of one is broadcast, not indexed; every wider dim may meet channels, and the rules that
        # use the tensor unify or pin each of them
        if n > 1:
            spaces[d] = ctx.fresh(int(n))
            ctx.bind(str(node.target), d, spaces[d], Role.OUT)
    return spaces


def _fetch(root: torch.nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` below ``root``, or ``None`` where the path breaks."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def passthrough(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """Shape-preserving ops of one tensor (activations, dropout, ``contiguous``, ``clone``)."""
    src = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if ctx.shape(node) is None:  # not a tensor: tainted by the channel sizes that went into it
        return number_op(ctx, node)
    if ctx.shape(src) != ctx.shape(node):  # not the one-tensor, same-shape op this rule describes
        return no_rule(ctx, node)
    return dict(ctx.spaces(src))


def spatial(count: int | None) -> Any:
    """Pooling, interpolation, padding of the last ``count`` dims: leading dims pass through."""

    def rule(ctx: RuleContext, node: fx.Node) -> Spaces | None:
        src = node.args[0]
        ins, outs = ctx.shape(src), ctx.shape(node)
        if ins is None or outs is None or len(ins) != len(outs):
            return no_rule(ctx, node)
        lead = len(ins) - (count if count is not None else len(ins) - 2)  # None: every dim after N and C
        out: Spaces = {}
        for d, layout in ctx.spaces(src).items():
            # a leading dim passes only at its own size: a long F.pad list can reach the channel dim too
            if d < lead and ins[d] == outs[d]:
                out[d] = layout
            else:
                ctx.pin(layout, f"'{op_name(node.target)}' changes a channel dim")
        return out

    return rule


def elementwise(ctx: RuleContext, node: fx.Node) -> Spaces | Taint | None:
    """Broadcasting elementwise ops: operands' channel dims are unified unless broadcast from 1."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return number_op(ctx, node)
    operands = [a for a in [*node.args, *node.kwargs.values()] if isinstance(a, fx.Node)]
    for a in operands:
        if isinstance(ctx.env.get(a), Taint):  # ``x * x.size(1)``: the value itself would change with a plan
            ctx.pin_all(a, "channel count used as a value in tensor arithmetic")
    # New channels start at zero, where these ops give inf or nan (1/0, log 0, the slope of sqrt); for a
    # division only the divisor is at risk.
    if node.target in _GROWTH_UNSAFE and operands:
        risky = operands[1:] if node.target in _DIVISIONS else operands
        _no_grow_all(ctx, risky, op_name(node.target))
    n = len(out_shape)
    result: Spaces = {}
    for d in range(n):
        layouts, fixed = _operand_layouts(ctx, operands, d, out_shape)
        if not layouts:
            continue
        if fixed:  # an operand without channels here has a width no plan changes: the others must keep it
            for layout in layouts:
                ctx.pin(layout, f"'{op_name(node.target)}' combines channels with a fixed-width tensor")
            continue
        merged = ctx.unify(layouts, f"'{op_name(node.target)}' combines channels that do not line up")
        if merged is not None:
            result[d] = merged
    return result


def _no_grow_all(ctx: RuleContext, values: list[fx.Node], op: str) -> None:
    """Mark every group reachable from ``values`` as removable but not growable, naming ``op``."""
    for layout in ctx.layouts_in(values):
        ctx.no_grow(layout, f"new channels could make '{op}' produce non-finite values")


# Functions and method names alike: elementwise serves both, and a method node's target is its name.
_DIVISIONS = {operator.truediv, operator.itruediv, operator.floordiv, torch.div, "div", "div_"}
_GROWTH_UNSAFE = _DIVISIONS | {
    operator.pow, torch.pow, torch.sqrt, torch.rsqrt, torch.log, torch.reciprocal,
    "sqrt", "rsqrt", "log", "pow", "reciprocal",
}  # fmt: skip


def _operand_layouts(
    ctx: RuleContext, operands: list[fx.Node], d: int, out_shape: tuple[int, ...]
) -> tuple[list[Layout], bool]:
    """The layouts the operands carry at output dim ``d`` (broadcasting aligns shapes at the right), and
    whether an operand without channels has that dim at full size."""
    layouts: list[Layout] = []
    fixed = False
    for a in operands:
        shape = ctx.shape(a)
        if shape is None:
            continue
        k = d - (len(out_shape) - len(shape))
        if k < 0:
            continue
        layout = ctx.spaces(a).get(k)
        if shape[k] == 1 and out_shape[d] != 1:
            # broadcast: a one-channel group there must stay one channel, or broadcasting would stop
            if layout is not None:
                ctx.pin(layout, "a one-channel tensor is broadcast against a wider one")
            continue
        if layout is None:
            fixed = True
        else:
            layouts.append(layout)
    return layouts, fixed


def _reduced_dims(node: fx.Node, ndim: int) -> set[int] | None:
    """The dims a reduction's ``dim`` argument names (non-negative); ``None`` when it reduces all."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return {norm_dim(int(d), ndim) for d in dims}


def reduce(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``amax`` (any reduction but a sum or mean) over dims: channel dims may not be reduced; the others pass."""
    return _reduce(ctx, node, statistic=False)


def statistic(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``sum``/``mean`` over dims: over channels, taken over the channels kept, which is what removing the
    others means (the mean of squares of an RMSNorm written out, as Llama's is); growth would change it."""
    # a dtype or out argument is not read here: such a call reduces as reduce() does
    return _reduce(ctx, node, statistic=not set(node.kwargs) - {"dim", "keepdim"})


def _reduce(ctx: RuleContext, node: fx.Node, statistic: bool) -> Spaces | None:
    """A reduction over dims: the dims kept pass; a reduced channel dim is pinned, or for a statistic, may shrink."""
    src = node.args[0]
    ins, outs = ctx.shape(src), ctx.shape(node)
    if ins is None or outs is None:
        return no_rule(ctx, node)
    dims = _reduced_dims(node, len(ins))
    if dims is None:
        dims = set(range(len(ins)))
    keep = len(outs) == len(ins)  # keepdim=True
    out: Spaces = {}
    for d, layout in ctx.spaces(src).items():
        if d in dims and statistic:
            ctx.no_grow(layout, f"new channels would change the '{op_name(node.target)}' over them")
        elif d in dims:
            ctx.pin(layout, f"'{op_name(node.target)}' reduces over channels")
        else:  # without keepdim, each reduced dim before d shifts it down by one
            out[d if keep else d - sum(1 for r in dims if r < d)] = layout
    return out


def softmax(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """Softmax along a fixed dim passes channels; along a channel dim it pins them."""
    src = node.args[0]
    ndim = len(ctx.shape(src) or ())
    raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if raw is None:
        return no_rule(ctx, node)
    d = norm_dim(int(raw), ndim)
    sp = dict(ctx.spaces(src))
    if d in sp:
        ctx.pin(sp.pop(d), "softmax over channels")
    return sp


def _batch_dims(ctx: RuleContext, node: fx.Node, operands: list[fx.Node], tail: int) -> Spaces:
    """Unify the broadcast batch dims (all but the last ``tail``) of matmul-like operands."""
    out_shape = ctx.shape(node) or ()
    n = len(out_shape) - tail
    result: Spaces = {}
    for d in range(n):
        layouts: list[Layout] = []
        fixed = False
        for a in operands:
            shape = ctx.shape(a) or ()
            k = d - (n - (len(shape) - tail))  # the operand's own dim at batch dim d (shapes align at the right)
            if k < 0:
                continue
            layout = ctx.spaces(a).get(k)
            if shape[k] != out_shape[d]:  # broadcast from one: its channel (if any) cannot change
                if layout is not None:
                    ctx.pin(layout, "a one-channel operand is broadcast in a batched matmul")
            elif layout is None:
                fixed = True
            else:
                layouts.append(layout)
        if fixed and layouts:  # e.g. per-head weights mixed by a Linear, batched with fixed heads
            for layout in layouts:
                ctx.pin(layout, "batched matmul of channels with a fixed-width dim")
            continue
        merged = ctx.unify(layouts, "batched matmul over channels that do not line up")
        if merged is not None:
            result[d] = merged
    return result


def contract(ctx: RuleContext, a: tuple[fx.Node, int], b: tuple[fx.Node, int], what: str) -> Layout | int:
    """The contracted dim of a product: both sides must carry the same channels, or neither."""
    la, lb = ctx.spaces(a[0]).get(a[1]), ctx.spaces(b[0]).get(b[1])
    if la is not None and lb is not None:
        merged = ctx.unify([la, lb], f"{what} contracts channels that do not line up")
        if merged is not None:
            # the product itself consumes these channels, with no weight whose new columns could be zero
            ctx.no_grow(merged, f"new channels contracted by {what} of two activations would change it")
            return merged
    for layout in (la, lb):
        if layout is not None:
            ctx.pin(layout, f"{what} contracts channels with a fixed-width dim")
    return int((ctx.shape(a[0]) or ())[a[1]])  # a fixed K: the cost term takes the number


def matmul(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``a @ b`` for operands of rank two or more: K is contracted, M and N pass through."""
    a, b = node.args[0], node.args[1]
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        return no_rule(ctx, node)
    out = _batch_dims(ctx, node, [a, b], 2)
    k = contract(ctx, (a, len(sa) - 1), (b, len(sb) - 2), "matmul")
    m, n = ctx.spaces(a).get(len(sa) - 2), ctx.spaces(b).get(len(sb) - 1)
    if m is not None:
        out[len(so) - 2] = m
    if n is not None:
        out[len(so) - 1] = n
    batch = [out.get(d, so[d]) for d in range(len(so) - 2)]
    ctx.cost(2, *batch, m or so[-2], k, n or so[-1])  # 2 x batch x M x K x N, as FlopCounterMode counts
    return out


def _param_spaces(ctx: RuleContext, arg: Any) -> Spaces:
    return ctx.spaces(arg) if isinstance(arg, fx.Node) else {}


def functional_linear(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.linear(x, w, b)`` with parameters used directly (by position or by keyword)."""
    bound = dict(zip(("input", "weight", "bias"), node.args, strict=False)) | dict(node.kwargs)
    x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
    sx, so = ctx.shape(x) if isinstance(x, fx.Node) else None, ctx.shape(node)
    if sx is None or so is None or w is None:
        return no_rule(ctx, node)
    ws = _param_spaces(ctx, w)
    k = contract(ctx, (x, len(sx) - 1), (w, 1), "linear") if ws.get(1) else _fixed_in(ctx, x, sx)
    out = {d: lay for d, lay in ctx.spaces(x).items() if d < len(sx) - 1}
    lout = ws.get(0)
    if lout is not None and b is not None:
        lout = ctx.unify([lout, _param_spaces(ctx, b).get(0) or lout], "linear bias does not line up")
    if lout is not None:
        out[len(so) - 1] = lout
    rows = [out.get(d, so[d]) for d in range(len(so) - 1)]
    ctx.cost(2, *rows, k, lout or so[-1], kernel=rows_kernel(rows), axes=(k, lout or so[-1]))
    return out


def _fixed_in(ctx: RuleContext, x: fx.Node, sx: tuple[int, ...]) -> int:
    """The input width a weight without channel spaces fixes: the last dim of shape ``sx``, pinned."""
    layout = ctx.spaces(x).get(len(sx) - 1)
    if layout is not None:
        ctx.pin(layout, "read by a layer whose weight has a fixed width")
    return sx[-1]


def functional_conv(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.conv*d(x, w, b, ...)`` with ``groups == 1`` and parameters used directly."""
    x, w = node.args[0], node.args[1]
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    sx, so, sw = ctx.shape(x), ctx.shape(node), ctx.shape(w)
    if sx is None or so is None or sw is None or groups != 1 or len(sx) != len(sw):
        return no_rule(ctx, node)
    pin_positions(ctx, ctx.spaces(x), 1, "a convolution")
    ws = _param_spaces(ctx, w)
    for d in range(2, len(sw)):  # kernel positions are not channels (a parameter's every dim gets a space)
        if d in ws:
            ctx.pin(ws[d], "kernel dim of a convolution weight used directly")
    # the (N, C) prefix of the shape makes the channel dim _fixed_in's last dim
    k = contract(ctx, (x, 1), (w, 1), "convolution") if ws.get(1) else _fixed_in(ctx, x, (sx[0], sx[1]))
    lout = ws.get(0)
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if lout is not None and isinstance(b, fx.Node) and _param_spaces(ctx, b).get(0):
        lout = ctx.unify([lout, _param_spaces(ctx, b)[0]], "convolution bias does not line up")
    out = {d: lay for d, lay in ctx.spaces(x).items() if d == 0}
    if lout is not None:
        out[1] = lout
    # 2 x output positions x kernel size x batch x C_in x C_out
    batch = out.get(0, so[0])
    kernel = call_conv_kernel(node, sx, sw, 1) if isinstance(batch, int) else None
    ctx.cost(2 * math.prod(so[2:]) * math.prod(sw[2:]), batch, k, lout or so[1], kernel=kernel, axes=(k, lout or so[1]))
    return out
