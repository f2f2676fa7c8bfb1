"""Channel rules for reshapes (``view``, ``reshape``, ``flatten``), decided from propagated shapes.

The input and output shapes are aligned into blocks of dims with equal products; within a block the
channels either stay the outer dim (``flatten`` of C x H x W, and its inverse) or become the
innermost dim with every chunk unified (heads of an attention block, the groups of a channel
shuffle). Constant sizes of channel dims are recorded as rewrites; dynamic sizes computed from
another tensor's channel count are related to the channels they size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ArgSlot, RuleContext, Spaces, Taint
from fxmorph.analysis.rules._util import op_name, pin_unknown

__all__ = ["flatten_module", "reshape"]


def _align(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Blocks of input dims and output dims with equal products, ignoring dims of size 1."""
    a = [i for i, s in enumerate(ins) if s != 1]
    b = [j for j, s in enumerate(outs) if s != 1]
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    # Greedy: grow whichever side's running product is smaller until the two meet. A row-major reshape
    # only regroups consecutive dims, so the smallest blocks with equal products are exactly its groups.
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
            else:  # the products never meet: possible only with a dim of size 0
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
    # row-major: the dims after it repeat each channel ``inner`` times in a row, and the dims before it
    # repeat the whole channel sequence ``outer`` times
    return tuple((a, i * inner) for a, i in ctx.atoms.expand(sp[d])) * outer


def _split_dims(ctx: RuleContext, layout: Layout, dims: list[int], shape: tuple[int, ...]) -> Spaces | None:
    """Spread a layout over output ``dims``: the channels stay outer, or become the innermost dim."""
    if len(dims) == 1:
        return {dims[0]: layout}
    block = math.prod(shape[e] for e in dims[1:])
    pieces = ctx.atoms.expand(layout)
    # 1. Every channel fills whole blocks (the inverse of a flatten): the channels stay the outer dim.
    if all(inner % block == 0 for _, inner in pieces):
        return {dims[0]: tuple((a, inner // block) for a, inner in pieces)}
    # 2. The channels become the innermost dim (E -> heads x head dim): every chunk must hold the same
    #    channels, and the outer dims (the head count) keep their size. Where the analysis asks for whole
    #    blocks (the head width is pinned, as rotary embeddings pin it), step 3 comes first: whole heads go.
    if ctx.here() in ctx.whole_blocks:
        whole = _whole_blocks(ctx, layout, dims, shape)
        if whole is not None:
            return whole
    count = math.prod(shape[e] for e in dims[:-1])
    parts = ctx.atoms.chunks(layout, count)
    if parts is not None:
        merged = ctx.unify(list(parts), "reshape splits channels into blocks that do not line up")
        if merged is not None:
            ctx.split_choice(merged)
        return None if merged is None else {dims[-1]: merged}
    # 3. Blocks of consecutive channels move together (C*k -> C x k): coarsen, and the outer dim carries them.
    coarse = ctx.atoms.unchunk(layout, block)
    return None if coarse is None else {dims[0]: coarse}


def _whole_blocks(ctx: RuleContext, layout: Layout, dims: list[int], shape: tuple[int, ...]) -> Spaces | None:
    """The channels as whole blocks of the innermost dim (heads of their head width), carried by the dim before
    it; dims further out (the 3 of a packed ``qkv`` split into 3 x heads x head width) hold the same blocks."""
    outer = math.prod(shape[e] for e in dims[:-2])
    parts = ctx.atoms.chunks(layout, outer) if outer > 1 else [layout]
    if parts is None:
        return None
    merged = ctx.unify(list(parts), "reshape splits channels into blocks that do not line up")
    coarse = None if merged is None else ctx.atoms.unchunk(merged, shape[dims[-1]])
    return None if coarse is None else {dims[-2]: coarse}


def reshape(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``view``/``reshape``/``flatten``: map channel layouts through the row-major reshape."""
    src = node.args[0]
    ins, outs = ctx.shape(src), ctx.shape(node)
    sp = ctx.spaces(src)
    if ins is None or outs is None:
        pin_unknown(ctx, node, "reshape of an unknown shape")
        return None
    for d, layout in sp.items():
        if ins[d] == 1:  # _align skips dims of size one, so such a channel dim has nowhere to go
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
    record_size_rewrites(ctx, node, result)
    return result


def record_size_rewrites(ctx: RuleContext, node: fx.Node, result: Spaces) -> None:
    """Relate the sizes a reshape is given (``x.view(...)``, ``x.reshape(...)``, ``torch.reshape(x, ...)``)
    to the output's channels: a constant size of a channel dim becomes a rewrite, a size computed from
    channel widths a constraint. Sizes that cannot be located pin the output's channels."""
    located = _size_slots(node)
    out_dims = len(ctx.shape(node) or ())
    if located is not None and len(located) != out_dims and out_dims:
        # sizes built elsewhere (``x.view(x.size()[:-1] + (self.nf,))`` passes one tuple): not located
        located = None
    if located is None:
        if node.target in ("view", "reshape") or node.target is torch.reshape:
            for layout in result.values():
                ctx.pin(layout, f"the sizes of {op_name(node)} cannot be located to rewrite")
        return
    for j, (value, location) in enumerate(located):
        taint = ctx.env.get(value) if isinstance(value, fx.Node) else None
        if isinstance(taint, Taint):
            _relate_size(ctx, taint, result.get(j))
        if j in result and isinstance(value, int) and value != -1:  # -1 is inferred again at the new width
            layout = result[j]
            # layout=layout binds this iteration's layout: the lambda runs after the loop, in surgery
            ctx.rewrite(location, lambda measure, layout=layout: measure(layout))


def _size_slots(node: fx.Node) -> list[tuple[Any, ArgSlot]] | None:
    """Each size a reshape node is given, with where it sits in the node's arguments; None when the node
    is not a sized reshape or its sizes are not where a reshape's signature puts them."""
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        first = 1  # x.view(n, c) or x.view([n, c]): sizes follow the tensor (x.expand's too)
    elif node.op == "call_function" and node.target is torch.reshape:
        first = 1  # torch.reshape(x, (n, c))
    else:
        return None
    for key in ("shape", "size"):  # the keyword forms: torch.reshape(x, shape=...), x.view(size=...)
        if isinstance(node.kwargs.get(key), list | tuple):
            return [(v, ArgSlot(key, j)) for j, v in enumerate(node.kwargs[key])]
    rest = node.args[first:]
    if len(rest) == 1 and isinstance(rest[0], list | tuple):  # packed: x.view([n, c])
        return [(v, ArgSlot(first, j)) for j, v in enumerate(rest[0])]
    if node.target is torch.reshape or not rest:
        return None
    return [(v, ArgSlot(first + j)) for j, v in enumerate(rest)]


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
