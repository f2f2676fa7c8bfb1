"""Rules for the helpers torchvision's MViT wraps as graph leaves (``torch.fx.wrap``).

MViT's pooled attention works per head on ``[B, heads, tokens, head dim]`` tensors: ``_unsqueeze`` and
``_squeeze`` add and remove a heads dim around the pooling, ``_add_rel_pos`` adds decomposed relative
position terms (the query contracted with one table per axis over the head dim), ``_add_shortcut``
adds the pooled query back in place. The head dim is the only channel dim they touch.
"""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.rules._static import static_value
from fxmorph.analysis.rules._util import norm_dim
from fxmorph.analysis.rules.compute import elementwise, no_rule

__all__ = ["MVIT_RULES", "add_rel_pos", "add_shortcut", "squeeze_heads", "unsqueeze_heads"]

_REL_POS_ARGS = ("attn", "q", "q_thw", "k_thw", "rel_pos_h", "rel_pos_w", "rel_pos_t")


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The node's arguments by parameter name, ``names`` giving the positional order."""
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def unsqueeze_heads(ctx: RuleContext, node: fx.Node) -> tuple[Spaces, None] | None:
    """``_unsqueeze(x, target_dim, expand_dim)``: ``(x.unsqueeze(expand_dim), x.dim())`` when ``x`` has
    one dim fewer than the target, else ``(x, x.dim())``; the dim count carries no channels."""
    a = _bound(node, ("x", "target_dim", "expand_dim"))
    shape, target, expand = ctx.shape(a.get("x")), a.get("target_dim"), a.get("expand_dim")
    if shape is None or not isinstance(target, int) or not isinstance(expand, int):
        return no_rule(ctx, node)
    sp = ctx.spaces(a["x"])
    if len(shape) == target:
        return dict(sp), None
    if len(shape) != target - 1:
        return no_rule(ctx, node)
    d = norm_dim(expand, target)
    return {(k + 1 if k >= d else k): layout for k, layout in sp.items()}, None


def squeeze_heads(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``_squeeze(x, target_dim, expand_dim, tensor_dim)``: undoes ``_unsqueeze``, which the
    propagated shapes tell (the dim count ``tensor_dim`` is not known to the analysis)."""
    a = _bound(node, ("x", "target_dim", "expand_dim", "tensor_dim"))
    ins, outs, expand = ctx.shape(a.get("x")), ctx.shape(node), a.get("expand_dim")
    if ins is None or outs is None or not isinstance(expand, int):
        return no_rule(ctx, node)
    sp = ctx.spaces(a["x"])
    if outs == ins:  # _unsqueeze added no dim, so there is none to remove
        return dict(sp)
    d = norm_dim(expand, len(ins))
    if len(outs) != len(ins) - 1 or ins[d] != 1:
        return no_rule(ctx, node)
    if d in sp:
        ctx.pin(sp[d], "squeeze removes a one-channel dim")
    return {(k - 1 if k > d else k): layout for k, layout in sp.items() if k != d}


def add_rel_pos(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``_add_rel_pos(attn, q, q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t)``: adds to the logits
    the query (``[B, heads, 1 + t*h*w, head dim]``, class token first) contracted over the head dim
    with one relative position table per axis (``[distances, head dim]``).

    The tables' columns are the query's head dim, so they are bound to it; their rows are distances
    and keep their count. The logits come out with the channels they had (none, normally).
    """
    a = _bound(node, _REL_POS_ARGS)
    attn, q = a.get("attn"), a.get("q")
    sa, sq = ctx.shape(attn), ctx.shape(q)
    q_thw, k_thw = static_value(ctx, a.get("q_thw")), static_value(ctx, a.get("k_thw"))
    tables = [a.get(k) for k in ("rel_pos_h", "rel_pos_w", "rel_pos_t")]
    table_shapes = [ctx.shape(t) for t in tables]
    # the layout this rule understands: a class token plus the t x h x w grid, and tables as wide as the head dim
    if (
        sa is None
        or sq is None
        or len(sq) != 4
        or not _grid(q_thw)
        or not _grid(k_thw)
        or sq[2] != 1 + math.prod(q_thw)
        or sa[-2:] != (sq[2], 1 + math.prod(k_thw))
        or any(s is None or len(s) != 2 or s[1] != sq[3] for s in table_shapes)
    ):
        return no_rule(ctx, node)
    sp_q = ctx.spaces(q)
    for d, layout in sp_q.items():
        if d != 3:  # dim 3 is the head dim; the others index batch, heads and tokens
            ctx.pin(layout, "relative position terms over a channel dim")
    for t in tables:
        if 0 in ctx.spaces(t):
            ctx.pin(ctx.spaces(t)[0], "relative position table: one row per distance")
    head = _head(ctx, [sp_q.get(3), *(ctx.spaces(t).get(1) for t in tables)], sq[3])
    (qt, qh, qw), (kt, kh, kw) = q_thw, k_thw
    # Two einsums (height, width) and one matmul (time), each contracting the head dim.
    ctx.cost(2 * sq[0] * sq[1] * qt * qh * qw * (kh + kw + kt), head)
    return dict(ctx.spaces(attn))


def _grid(value: Any) -> bool:
    """True for a ``thw`` grid: three positive integers (time, height, width)."""
    return isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)


def _head(ctx: RuleContext, layouts: list[Layout | None], width: int) -> Layout | int:
    """One layout for the query's head dim and the tables' columns, or the fixed width if any is fixed."""
    present = [layout for layout in layouts if layout is not None]
    if len(present) == len(layouts):
        merged = ctx.unify(present, "relative position tables do not line up with the head dim")
        if merged is not None:
            ctx.no_grow(merged, "new head dims would change the relative position terms")
            return merged
        return width
    for layout in present:
        ctx.pin(layout, "relative position terms combine channels with a fixed-width dim")
    return width


def add_shortcut(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``_add_shortcut(x, shortcut, residual_with_cls_embed)``: adds the pooled query to the attention
    output in place, every token or all but the class token (a slice of the tokens dim, which must
    then carry no channels). Channels are unified as for ``+``."""
    a = _bound(node, ("x", "shortcut", "residual_with_cls_embed"))
    x, shortcut, with_cls = a.get("x"), a.get("shortcut"), a.get("residual_with_cls_embed")
    sx, ss = ctx.shape(x), ctx.shape(shortcut)
    if sx is None or sx != ss or len(sx) != 4 or not isinstance(with_cls, bool):
        return no_rule(ctx, node)
    if not with_cls:
        for t in (x, shortcut):
            if 2 in ctx.spaces(t):
                ctx.pin(ctx.spaces(t)[2], "a slice of the tokens dim that carries channels")
    return elementwise(ctx, node)


def _mvit_rules() -> dict[Any, Any]:
    """The rules keyed by torchvision's helper functions (none where torchvision does not import)."""
    try:
        from torchvision.models.video import mvit
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return {
        mvit._unsqueeze: unsqueeze_heads,
        mvit._squeeze: squeeze_heads,
        mvit._add_rel_pos: add_rel_pos,
        mvit._add_shortcut: add_shortcut,
    }


MVIT_RULES = _mvit_rules()
