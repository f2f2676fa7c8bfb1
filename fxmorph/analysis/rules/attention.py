"""Channel rule for ``F.scaled_dot_product_attention``: heads, grouped-query attention, masks, the scale.

Shapes are ``q (..., Hq, L, E)``, ``k (..., Hk, S, E)``, ``v (..., Hk, S, Ev)`` and a mask broadcast to
``(..., Hq, L, S)``. Every dim before the last two is a batch dim (batch, heads), the same channels in
q, k, v and the mask; ``E`` is contracted; ``Ev`` passes to the output. With ``enable_gqa`` each key and
value head serves ``Hq / Hk`` query heads in a row, so the query heads are the key heads, each repeated:
a plan that removes a key/value head removes its whole group of query heads, and the model stays valid
for any number of groups kept. Where q, k and v come from reshapes into heads, whole heads are pruned
and the head width is kept (see :func:`fxmorph.analysis.graph.build_channel_graph`). Where the head width changes
anyway under the default softmax scale, the original scale is folded into the parameters that make the query
(:mod:`fxmorph.analysis.rules.query_fold`), or else passed as ``scale=``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ArgSlot, RuleContext, Spaces
from fxmorph.analysis.rules.compute import contract, no_rule
from fxmorph.analysis.rules.query_fold import query_fold

__all__ = ["sdpa"]

_SCHEMA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
"""The arguments of ``F.scaled_dot_product_attention`` in order: a call may pass any prefix by position."""


def _bound(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name, positional ones included."""
    return {**dict(zip(_SCHEMA, node.args, strict=False)), **node.kwargs}


def _repeated(ctx: RuleContext, layout: Layout, times: int) -> Layout:
    """Each channel of ``layout`` repeated ``times`` in a row (``repeat_interleave``, as GQA reads heads)."""
    return tuple((atom, inner * times) for atom, inner in ctx.atoms.expand(layout))


def _batch(ctx: RuleContext, operands: list[tuple[fx.Node, int]], out: tuple[int, ...]) -> Spaces:
    """Unify the batch dims (all but the last two) of the operands, each given with how many times its heads
    are repeated; a dim broadcast from one keeps its one channel, and a fixed dim pins the channels met there."""
    n = len(out) - 2
    result: Spaces = {}
    for d in range(n):
        layouts: list[Layout] = []
        fixed = False
        for arg, repeat in operands:
            shape = ctx.shape(arg) or ()
            k = d - (n - (len(shape) - 2))  # shapes align at the right
            if k < 0:
                continue
            layout = ctx.spaces(arg).get(k)
            times = repeat if d == n - 1 else 1  # only the heads dim (-3) is repeated
            if shape[k] * times != out[d]:  # broadcast from one
                if layout is not None:
                    ctx.pin(layout, "a one-channel operand is broadcast in attention")
            elif layout is None:
                fixed = True
            else:
                layouts.append(_repeated(ctx, layout, times) if times > 1 else layout)
        if fixed and layouts:  # e.g. a per-head bias of fixed width added to heads that could change
            for layout in layouts:
                ctx.pin(layout, "attention batches channels with a fixed-width dim")
            if d == n - 1:
                _rather_heads(ctx, operands)
            continue
        merged = ctx.unify(layouts, "attention heads that do not line up")
        if merged is not None:
            result[d] = merged
    return result


def _rather_heads(ctx: RuleContext, operands: list[tuple[fx.Node, int]]) -> None:
    """Some operands' heads carry channels and some do not: those that do not shared their head width across
    fixed heads, which the others' heads cannot meet; ask for their heads whole (see ``prefer_whole``)."""
    for arg, _ in operands:
        shape = ctx.shape(arg) or ()
        width = ctx.spaces(arg).get(len(shape) - 1)
        if len(shape) >= 3 and len(shape) - 3 not in ctx.spaces(arg) and width is not None:
            ctx.prefer_whole(width, "the other operands of attention change their heads")


def _pin_dims(ctx: RuleContext, arg: fx.Node, dims: range, reason: str) -> None:
    """Pin the channels ``arg`` carries at ``dims`` (negative dims count from the end)."""
    ndim = len(ctx.shape(arg) or ())
    for d in dims:
        layout = ctx.spaces(arg).get(ndim + d)
        if layout is not None:
            ctx.pin(layout, reason)


def _keep_default_scale(ctx: RuleContext, node: fx.Node, q: fx.Node, e: Layout, width: int) -> None:
    """The default scale is ``1/sqrt(E)`` of the E it is given: once E changes, keep the original one by scaling the
    query's producer by ``sqrt(E_new / E_old)`` (which the class's own forward then computes), else pass it as
    ``scale=`` (which gives back a GraphModule where the class does not pass one)."""
    fold = query_fold(ctx, node, q)
    if fold is not None:
        ctx.rewrite(fold, lambda measure: math.sqrt(measure(e) / width))
        return
    original = 1.0 / math.sqrt(width)
    where = ArgSlot(6) if len(node.args) > 6 else ArgSlot("scale")  # where the call passed None, if it did
    ctx.rewrite(where, lambda measure: original)


def sdpa(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``scaled_dot_product_attention`` (see the module docstring): the heads are batch dims shared by q, k, v
    and the mask, E is contracted, Ev passes; with the default scale, a changed E keeps the original scale."""
    a = _bound(node)
    q, k, v, mask = a.get("query"), a.get("key"), a.get("value"), a.get("attn_mask")
    if not all(isinstance(t, fx.Node) for t in (q, k, v)) or not isinstance(mask, fx.Node | None):
        return no_rule(ctx, node)
    sq, sk, sv, so = ctx.shape(q), ctx.shape(k), ctx.shape(v), ctx.shape(node)
    if sq is None or sk is None or sv is None or so is None or len(sq) < 3 or len(sk) != len(sv):
        return no_rule(ctx, node)
    for t in (q, k, v):  # the sequence dims (-2) are what attention mixes: no channels may live there
        _pin_dims(ctx, t, range(-2, -1), "attention over a channel dim")
    operands = [(q, 1)]
    repeat = sq[-3] // sk[-3] if a.get("enable_gqa") and len(sk) >= 3 and sk[-3] and sq[-3] != sk[-3] else 1
    operands += [(k, repeat), (v, repeat)]
    if mask is not None:
        _pin_dims(ctx, mask, range(-2, 0), "an attention mask over a channel dim")
        operands.append((mask, 1))
    out = _batch(ctx, operands, so)
    e = contract(ctx, (q, len(sq) - 1), (k, len(sk) - 1), "attention")  # marks E no-grow
    ev = ctx.spaces(v).get(len(sv) - 1)
    if ev is not None:
        out[len(so) - 1] = ev
    for width in (e, ev):
        # A class states one head width for q, k and v (and often its softmax scale from it), while pruning
        # whole heads changes only a head count, which the class computes or states once: where q, k and v
        # come from reshapes into heads, the analysis runs again keeping the heads whole (see reshape).
        if width is not None and not isinstance(width, int):
            ctx.prefer_whole(width, "a class states one head width")
    if not isinstance(e, int) and a.get("scale") is None:
        _keep_default_scale(ctx, node, q, e, sq[-1])
    batch = [out.get(d, so[d]) for d in range(len(so) - 2)]
    ctx.cost(2, *batch, sq[-2], sk[-2], e)
    ctx.cost(2, *batch, sq[-2], sk[-2], ev or sv[-1])
    return out
