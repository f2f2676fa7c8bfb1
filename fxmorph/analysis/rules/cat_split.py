"""Channel rules for joining and splitting tensors: ``cat``, ``split``, ``tensor_split``, ``chunk`` and ``unbind``.

The rules follow :mod:`fxmorph.analysis.rules.shape`'s conventions (which re-exports them): each takes the
:class:`RuleContext` and the node and returns the node's channel spaces, a tuple of them for the splits.
Along the joined or split dim the channels are segments of the inputs' layouts; constant split sizes and
points on a channel dim are recorded as rewrites for surgery.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ArgSlot, RuleContext, Spaces
from fxmorph.analysis.rules._util import norm_dim

__all__ = ["cat", "chunk", "join_dim", "split", "tensor_split", "unbind"]


def _dim_arg(node: fx.Node, position: int, default: int = 0) -> int:
    """The ``dim`` argument, at ``position`` or by keyword."""
    if len(node.args) > position:
        return int(node.args[position])
    return int(node.kwargs.get("dim", default))


def join_dim(node: fx.Node) -> int:
    """The dim a ``cat`` node joins along, as given (possibly negative)."""
    return _dim_arg(node, 1)


def _unify_other_dims(ctx: RuleContext, parts: list[Spaces], skip: int, ndim: int) -> Spaces:
    """Unify each dim but ``skip`` across the joined tensors: all must carry the same channels there."""
    out: Spaces = {}
    for d in range(ndim):
        if d == skip:
            continue
        layouts = [p[d] for p in parts if d in p]
        if not layouts:
            continue
        if len(layouts) < len(parts):
            for layout in layouts:
                ctx.pin(layout, "joined with a tensor of fixed width")
            continue
        merged = ctx.unify(layouts, "joined tensors whose channels do not line up")
        if merged is not None:
            out[d] = merged
    return out


def cat(ctx: RuleContext, node: fx.Node) -> Spaces:
    """``cat``: segments along the cat dim; other channel dims are unified across inputs."""
    tensors = list(node.args[0])
    shape = ctx.shape(node) or ()
    d = norm_dim(_dim_arg(node, 1), len(shape))
    parts = [ctx.spaces(t) for t in tensors]
    out = _unify_other_dims(ctx, parts, d, len(shape))
    if any(d in p for p in parts):
        segments: list[Layout] = []
        for t, p in zip(tensors, parts, strict=True):
            # a fixed-width input still takes up positions along the cat dim: a fresh pinned segment
            layout = p.get(d) or ctx.fresh((ctx.shape(t) or ())[d])
            if d not in p:
                ctx.pin(layout, "fixed-width input of cat")
            segments.append(layout)
        out[d] = tuple(piece for seg in segments for piece in seg)
    return out


def _split_outputs(ctx: RuleContext, node: fx.Node, d: int, sizes: list[int]) -> tuple[Spaces, ...]:
    """The spaces of each consecutive piece of ``sizes`` along dim ``d``; other dims pass to every piece."""
    sp = ctx.spaces(node.args[0])
    rest = {k: v for k, v in sp.items() if k != d}
    if d not in sp:
        return tuple(dict(rest) for _ in sizes)
    outs: list[Spaces] = []
    start = 0
    for n in sizes:
        sub = ctx.atoms.slice(sp[d], start, start + n)
        start += n
        if sub is None:
            ctx.pin(sp[d], "split boundary inside a block of channels")
            return tuple(dict(rest) for _ in sizes)
        outs.append({**rest, d: sub})
    return tuple(outs)


def _out_sizes(node: fx.Node, d: int) -> list[int] | None:
    """Sizes along ``d`` of a tuple-valued node's pieces, from propagated shapes (so any argument form works)."""
    metas = node.meta.get("tensor_meta")
    if not isinstance(metas, list | tuple):
        return None
    return [int(m.shape[d]) for m in metas]


def split(ctx: RuleContext, node: fx.Node) -> tuple[Spaces, ...] | None:
    """``split``: slices along a dim; constant sizes on a channel dim are recomputed by surgery."""
    ndim = len(ctx.shape(node.args[0]) or ())
    d = norm_dim(_dim_arg(node, 2), ndim)
    sizes = _out_sizes(node, d)
    if sizes is None:
        ctx.pin_all(node.args, "split of unknown sizes")
        return None
    outs = _split_outputs(ctx, node, d, sizes)
    if d in ctx.spaces(node.args[0]) and all(d in o for o in outs):
        layouts = [o[d] for o in outs]
        given = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
        ctx.rewrite(ArgSlot(1), lambda measure: _split_arg([measure(x) for x in layouts], given))
        if isinstance(given, int):  # one size for every piece (a shorter last one aside): the class states one
            ctx.keep_equal([x for x, size in zip(layouts, sizes, strict=True) if size == given])
    return outs


def _split_arg(widths: list[int], given: Any) -> int | list[int]:
    """The size argument of a split into pieces of ``widths``: one split size where the model passed one and the
    pieces still have it (all but a shorter last one: the same call, as a class that states it can make), else
    the list (new widths need not be equal)."""
    if isinstance(given, int) and all(w == widths[0] for w in widths[:-1]) and widths[-1] <= widths[0]:
        return widths[0]
    return widths


def tensor_split(ctx: RuleContext, node: fx.Node) -> tuple[Spaces, ...] | None:
    """``tensor_split(x, indices, dim)``: slices along a dim. Along a channel dim only explicit split
    points are understood (recomputed by surgery as running widths); a section count pins."""
    ndim = len(ctx.shape(node.args[0]) or ())
    d = norm_dim(_dim_arg(node, 2), ndim)
    sizes = _out_sizes(node, d)
    if sizes is None:
        ctx.pin_all(node.args, "tensor_split of unknown sizes")
        return None
    if d in ctx.spaces(node.args[0]) and sum(sizes) != (ctx.shape(node.args[0]) or ())[d]:
        ctx.pin(ctx.spaces(node.args[0])[d], "tensor_split into overlapping or unordered pieces")
        return tuple({k: v for k, v in ctx.spaces(node.args[0]).items() if k != d} for _ in sizes)
    outs = _split_outputs(ctx, node, d, sizes)
    if d not in ctx.spaces(node.args[0]) or not all(d in o for o in outs):
        return outs
    # the keyword differs between tensor_split's overloads
    key = next((k for k in ("indices", "tensor_indices_or_sections", "sections") if k in node.kwargs), None)
    points = node.args[1] if len(node.args) > 1 else node.kwargs.get(key) if key else None
    if not isinstance(points, list | tuple) or not all(isinstance(p, int) for p in points):
        for o in outs:
            ctx.pin(o[d], "tensor_split into sections of a channel dim")
        return outs
    layouts = [o[d] for o in outs]

    def split_points(measure: Any) -> tuple[int, ...]:
        ends = [sum(measure(x) for x in layouts[: k + 1]) for k in range(len(layouts) - 1)]
        return tuple(ends)

    ctx.rewrite(ArgSlot(1) if len(node.args) > 1 else ArgSlot(str(key)), split_points)
    return outs


def chunk(ctx: RuleContext, node: fx.Node) -> tuple[Spaces, ...] | None:
    """``chunk(n)``: equal slices; on a channel dim the chunks are unified so they stay equal, which
    keeps ``n`` pieces only if there were ``n`` to begin with (``chunk(3)`` of 4 channels gives 2)."""
    ndim = len(ctx.shape(node.args[0]) or ())
    d = norm_dim(_dim_arg(node, 2), ndim)
    sizes = _out_sizes(node, d)
    if sizes is None:
        ctx.pin_all(node.args, "chunk of unknown sizes")
        return None
    outs = _split_outputs(ctx, node, d, sizes)
    layouts = [o[d] for o in outs if d in o]
    requested = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    if layouts and (
        len(set(sizes)) != 1
        or len(sizes) != requested
        # last, as unify merges atoms: only once the pieces are known to be equal and as many as asked
        or ctx.unify(layouts, "chunks must keep equal widths") is None
    ):
        for layout in layouts:
            ctx.pin(layout, "chunk whose piece count depends on the width")
    return outs


def unbind(ctx: RuleContext, node: fx.Node) -> tuple[Spaces, ...] | None:
    """``unbind``: drops a dim; allowed when that dim carries no channels."""
    shape = ctx.shape(node.args[0]) or ()
    d = norm_dim(_dim_arg(node, 1), len(shape))
    sp = ctx.spaces(node.args[0])
    if d in sp:
        ctx.pin(sp[d], "unbind along a channel dim")
    rest = {(k - 1 if k > d else k): v for k, v in sp.items() if k != d}
    return tuple(dict(rest) for _ in range(shape[d]))
