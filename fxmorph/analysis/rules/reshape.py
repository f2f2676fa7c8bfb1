"""Channel rules for reshapes (``view``, ``reshape``, ``flatten``), decided from propagated shapes.

The input and output shapes are aligned into blocks of dims with equal products; within a block the
channels either stay the outer dim (``flatten`` of C x H x W, and its inverse) or become the
innermost dim with every chunk unified (heads of an attention block, the groups of a channel
shuffle). Constant sizes of channel dims are recorded as rewrites; dynamic sizes computed from
another tensor's channel count are related to the channels they size.
"""

from __future__ import annotations

import math

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import RuleContext, Spaces, Taint
from fxmorph.analysis.rules._util import pin_unknown

__all__ = ["flatten_module", "reshape"]


def _align(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Blocks of input dims and output dims with equal products, ignoring dims of size 1."""
    a = [i for i, s in enumerate(ins) if s != 1]
    b = [j for j, s in enumerate(outs) if s != 1]
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        bi, bj = [a[i]], [b[j]]
        pi, pj = ins[a[i]], outs[b[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(a):
                bi.append(a[i])
                pi *= ins[a[i]]
                i += 1
            elif pj < pi and j < len(b):
                bj.append(b[j])
                pj *= outs[b[j]]
                j += 1
            else:
                return None
        blocks.append((bi, bj))
    return blocks if i == len(a) and j == len(b) else None


def _merge(ctx: RuleContext, dims: list[int], shape: tuple[int, ...], sp: Spaces) -> Layout | None:
    """Layout of the row-major merge of ``dims``, when exactly one of them carries channels."""
    carrying = [d for d in dims if d in sp]
    if len(carrying) != 1:
        return None
    d = carrying[0]
    k = dims.index(d)
    outer = math.prod(shape[e] for e in dims[:k])
    inner = math.prod(shape[e] for e in dims[k + 1 :])
    return tuple((a, i * inner) for a, i in ctx.atoms.expand(sp[d])) * outer


def _split_dims(ctx: RuleContext, layout: Layout, dims: list[int], shape: tuple[int, ...]) -> Spaces | None:
    """Spread a layout over output ``dims``: the channels stay outer, or become the innermost dim."""
    if len(dims) == 1:
        return {dims[0]: layout}
    block = math.prod(shape[e] for e in dims[1:])
    pieces = ctx.atoms.expand(layout)
    if all(inner % block == 0 for _, inner in pieces):
        return {dims[0]: tuple((a, inner // block) for a, inner in pieces)}
    count = math.prod(shape[e] for e in dims[:-1])
    parts = ctx.atoms.chunks(layout, count)
    if parts is not None:
        merged = ctx.unify(list(parts), "reshape splits channels into blocks that do not line up")
        return None if merged is None else {dims[-1]: merged}
    coarse = ctx.atoms.unchunk(layout, block)
    return None if coarse is None else {dims[0]: coarse}


def reshape(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``view``/``reshape``/``flatten``: map channel layouts through the row-major reshape."""
    src = node.args[0]
    ins, outs = ctx.shape(src), ctx.shape(node)
    sp = ctx.spaces(src)
    if ins is None or outs is None:
        pin_unknown(ctx, node, "reshape of an unknown shape")
        return None
    for d, layout in sp.items():
        if ins[d] == 1:
            ctx.pin(layout, "reshape drops a one-channel dim")
    blocks = _align(ins, outs)
    if blocks is None:
        ctx.pin_all(src, "reshape mixes dims in a way no rule covers")
        return None
    result: Spaces = {}
    for in_dims, out_dims in blocks:
        if not any(d in sp for d in in_dims):
            continue
        merged = _merge(ctx, in_dims, ins, sp)
        mapped = None if merged is None else _split_dims(ctx, merged, out_dims, outs)
        if mapped is None:
            for d in in_dims:
                if d in sp:
                    ctx.pin(sp[d], "reshape mixes channels with other dims")
            continue
        result.update(mapped)
    _record_size_rewrites(ctx, node, result)
    return result


def _record_size_rewrites(ctx: RuleContext, node: fx.Node, result: Spaces) -> None:
    if node.op != "call_method" or node.target not in ("view", "reshape"):
        return
    packed = len(node.args) == 2 and isinstance(node.args[1], list | tuple)
    sizes = node.args[1] if packed else node.args[1:]
    for j, value in enumerate(sizes):
        taint = ctx.env.get(value) if isinstance(value, fx.Node) else None
        if isinstance(taint, Taint):
            _relate_size(ctx, taint, result.get(j))
        if j in result and isinstance(value, int) and value != -1:
            layout = result[j]
            location = (1, j) if packed else (1 + j, None)
            ctx.rewrite(location, lambda measure, layout=layout: measure(layout))


def _relate_size(ctx: RuleContext, taint: Taint, layout: Layout | None) -> None:
    """A dynamic size ``width(T) // k`` used for a dim with ``layout``: make that hold for every plan.

    ``T`` is cut into ``k`` chunks, all unified with ``layout`` (so ``T`` is ``k`` copies of it, as the
    residual stream of an attention block is heads x head dim). Anything else pins both sides.
    """
    source = taint.layouts[0] if len(taint.layouts) == 1 else None
    if layout is not None and source is not None and taint.divisor is not None:
        parts = ctx.atoms.chunks(source, taint.divisor)
        if parts is not None and ctx.unify([layout, *parts], "a dynamic size does not match its channels"):
            return
    for t in taint.layouts:
        ctx.pin(t, "a channel count sizes a reshape in a way no rule covers")
    if layout is not None:
        ctx.pin(layout, "a reshape is sized by another tensor's channel count")


def flatten_module(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.Flatten``/``torch.flatten``: a reshape."""
    return reshape(ctx, node)
