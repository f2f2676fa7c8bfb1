"""Channel rules for data-movement ops: permute, indexing, cat, split, size queries (reshapes live in
:mod:`fxmorph.analysis.rules.reshape`).

Every rule takes the :class:`RuleContext` and the node, and returns the node's channel spaces: a dict
``{dim: Layout}`` for a tensor, a tuple of those for a tuple-valued node, a :class:`Taint` for a number
computed from channel sizes, or ``None``. Reshapes are decided from the propagated shapes, not from
the arguments, so dynamic sizes (``x.size(1) // 2``) and constant sizes are handled alike; constant
sizes of channel dims are recorded as rewrites for surgery.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ArgSlot, RuleContext, Spaces, Taint
from fxmorph.analysis.rules._util import norm_dim, pin_unknown
from fxmorph.analysis.rules.reshape import flatten_module, reshape

__all__ = [
    "cat",
    "chunk",
    "expand",
    "flatten_module",
    "getattr_rule",
    "getitem",
    "number_op",
    "permute",
    "repeat_interleave",
    "reshape",
    "size",
    "split",
    "squeeze",
    "tensor_split",
    "transpose",
    "unbind",
    "unsqueeze",
]


# -- dim moves -------------------------------------------------------------------------------------
def _dims_arg(node: fx.Node) -> list[int]:
    """The permutation of ``x.permute(0, 2, 1)``, ``x.permute([0, 2, 1])`` or ``torch.permute(x, dims=...)``."""
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], list | tuple):
        return list(rest[0])
    if "dims" in node.kwargs:
        return list(node.kwargs["dims"])
    return list(rest)


def permute(ctx: RuleContext, node: fx.Node) -> Spaces:
    """``permute``: output dim k is input dim perm[k]."""
    sp = ctx.spaces(node.args[0])
    perm = _dims_arg(node)
    n = len(perm)
    return {k: sp[norm_dim(p, n)] for k, p in enumerate(perm) if norm_dim(p, n) in sp}


def transpose(ctx: RuleContext, node: fx.Node) -> Spaces:
    """``transpose``/``swapaxes``: swap two dims."""
    sp = ctx.spaces(node.args[0])
    shape = ctx.shape(node) or ()
    d0, d1 = (norm_dim(int(d), len(shape)) for d in node.args[1:3])
    swap = {d0: d1, d1: d0}
    return {swap.get(d, d): layout for d, layout in sp.items()}


def unsqueeze(ctx: RuleContext, node: fx.Node) -> Spaces:
    """``unsqueeze(d)``: dims at or after d move up by one."""
    sp = ctx.spaces(node.args[0])
    # a negative dim counts from the end of the output, which has the new dim
    d = norm_dim(int(node.args[1] if len(node.args) > 1 else node.kwargs["dim"]), len(ctx.shape(node) or ()))
    return {(k + 1 if k >= d else k): layout for k, layout in sp.items()}


def squeeze(ctx: RuleContext, node: fx.Node) -> Spaces:
    """``squeeze``: dims of size one disappear (a one-channel layout there is pinned)."""
    sp = ctx.spaces(node.args[0])
    ins = ctx.shape(node.args[0]) or ()
    dims = node.args[1:] or list(node.kwargs.values())
    if dims and isinstance(dims[0], list | tuple):
        dims = list(dims[0])
    chosen = {norm_dim(int(d), len(ins)) for d in dims} if dims else set(range(len(ins)))
    gone = {d for d in chosen if ins[d] == 1}  # squeeze leaves a named dim that is not of size one
    out: Spaces = {}
    for k, layout in sp.items():
        if k in gone:
            ctx.pin(layout, "squeeze removes a one-channel dim")
        else:
            out[k - sum(1 for g in gone if g < k)] = layout
    return out


def expand(ctx: RuleContext, node: fx.Node) -> Spaces:
    """``expand``: broadcast dims; a channel layout broadcast from width one is pinned."""
    sp = ctx.spaces(node.args[0])
    ins, outs = ctx.shape(node.args[0]) or (), ctx.shape(node) or ()
    lead = len(outs) - len(ins)  # expand may add leading dims
    out: Spaces = {}
    for k, layout in sp.items():
        if ins[k] != outs[k + lead]:
            ctx.pin(layout, "expand broadcasts a channel dim")
        else:
            out[k + lead] = layout
    return out


def repeat_interleave(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``repeat_interleave(x, repeats, dim)`` with one repeat count: every entry along ``dim`` is repeated
    in place, so channels there stay, each ``repeats`` times over (as after a flatten); other dims pass.
    A count computed from a channel width, a tensor of counts or no ``dim`` pins what it touches."""
    x = node.args[0]
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    ins, outs = ctx.shape(x), ctx.shape(node)
    value = ctx.env.get(repeats) if isinstance(repeats, fx.Node) else None
    if isinstance(value, Taint):
        ctx.pin_all(repeats, "a channel count used as a repeat count")
    tensor_count = isinstance(repeats, fx.Node) and ctx.shape(repeats) is not None  # a tensor of per-entry counts
    if ins is None or outs is None or not isinstance(dim, int) or len(ins) != len(outs) or tensor_count:
        pin_unknown(ctx, node, "repeat_interleave of this form")
        return None
    d = norm_dim(dim, len(ins))
    out = dict(ctx.spaces(x))
    if d in out and ins[d] > 0:  # an empty dim gives no repeat count to read
        count = outs[d] // ins[d]
        # each channel now fills ``count`` consecutive positions: exactly what a piece's ``inner`` says
        out[d] = tuple((a, inner * count) for a, inner in ctx.atoms.expand(out[d]))
    return out


# -- indexing --------------------------------------------------------------------------------------
def getitem(ctx: RuleContext, node: fx.Node) -> Any:
    """``x[i]`` on a tuple value selects; on a tensor maps slices of channel dims (or pins)."""
    src, index = node.args[0], node.args[1]
    value = ctx.env.get(src) if isinstance(src, fx.Node) else None
    # a tuple-valued node (split, x.size(), an attention's (output, weights)): pick its items' spaces
    if isinstance(value, tuple) and isinstance(index, int | slice):
        return value[index]
    if ctx.shape(src) is None:
        ctx.pin_all(node.args, "indexing of a value with channel sizes")
        return None
    return _index_tensor(ctx, node, ctx.spaces(src), ctx.shape(src) or ())


def index_select(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``index_select(x, dim, index)`` choosing along the last dim of ``x``, a dim without channels
    (a model input's features), with ``index`` a 1-D buffer read by ``get_attr``: the output's dim
    is the index's channel space, so removing channels there drops entries of the index (features no
    longer read). New channels would have to invent features, so that space does not grow. Any
    other use pins what it touches."""
    src = node.args[0]
    index = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
    shape = ctx.shape(src)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if shape is None or not isinstance(dim, int) or not isinstance(index, fx.Node) or index.op != "get_attr":
        ctx.pin_all((node.args, node.kwargs), "index_select with a computed index or dim")
        return None
    sp, chosen = ctx.spaces(src), ctx.spaces(index).get(0)
    d = norm_dim(dim, len(shape))
    if d in sp or d != len(shape) - 1 or chosen is None:
        ctx.pin_all((node.args, node.kwargs), "index_select along a channel dim or an inner dim")
        return None
    ctx.no_grow(chosen, "index_select: new entries would read features the model never chose")
    return {**sp, d: chosen}


def _index_tensor(ctx: RuleContext, node: fx.Node, sp: Spaces, shape: tuple[int, ...]) -> Spaces | None:
    """Basic indexing ``x[...]`` with ints, slices, ``None`` and ``...``: map the input's channel dims to
    the output's (``d`` walks the input's dims, ``o`` the output's)."""
    raw = node.args[1]
    packed = isinstance(raw, tuple)
    items = list(raw) if packed else [raw]
    if any(isinstance(i, fx.Node) for i in items):
        ctx.pin_all(node.args, "tensor indexing")
        return None
    if Ellipsis in items:
        k = items.index(Ellipsis)
        # ``...`` stands for every input dim that no other item (``None`` takes none) consumes
        fill = len(shape) - (len(items) - 1 - items.count(None))
        items[k : k + 1] = [slice(None)] * fill
    out: Spaces = {}
    d = o = 0
    for pos, item in enumerate(items):
        if item is None:  # a new output dim of size one, reading no input dim
            o += 1
            continue
        layout = sp.get(d)
        if isinstance(item, int):  # consumes the input dim and drops it from the output
            if layout is not None:
                ctx.pin(layout, "indexing picks a single channel")
            d += 1
            continue
        if layout is not None:
            sub = _slice_layout(ctx, node, layout, item, shape[d], ArgSlot(1, pos if packed else None))
            if sub is not None:
                out[o] = sub
        d, o = d + 1, o + 1
    out.update({o + k - d: sp[k] for k in range(d, len(shape)) if k in sp})  # dims the index does not reach, shifted
    return out


def _slice_layout(
    ctx: RuleContext, node: fx.Node, layout: Layout, item: slice, size: int, location: ArgSlot
) -> Layout | None:
    """The channels a constant slice of a channel dim keeps, with a rewrite of its bounds for surgery."""
    start, stop, step = item.start, item.stop, item.step
    if item == slice(None):
        return layout
    if step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (start, stop)):
        ctx.pin(layout, "strided or dynamic slice of a channel dim")
        return None
    lo, hi, _ = item.indices(size)
    sub = ctx.atoms.slice(layout, lo, hi)
    # the channels before the slice: their new width is where the rewritten slice starts
    head = ctx.atoms.slice(layout, 0, lo) if lo else ()
    if sub is None or head is None:
        ctx.pin(layout, "slice boundary inside a block of channels")
        return None

    def new_slice(measure: Any, head: Layout = head, sub: Layout = sub) -> slice:
        begin = measure(head) if head else 0
        return slice(begin, begin + measure(sub), None)

    ctx.rewrite(location, new_slice)
    return sub


# -- cat and split ---------------------------------------------------------------------------------
def _dim_arg(node: fx.Node, position: int, default: int = 0) -> int:
    """The ``dim`` argument, at ``position`` or by keyword."""
    if len(node.args) > position:
        return int(node.args[position])
    return int(node.kwargs.get("dim", default))


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
        # always a list of sizes, even where the model passed one split size: new widths need not be equal
        ctx.rewrite(ArgSlot(1), lambda measure: [measure(x) for x in layouts])
    return outs


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


# -- sizes as numbers ------------------------------------------------------------------------------
def size(ctx: RuleContext, node: fx.Node) -> Any:
    """``x.size()``/``x.size(d)``: numbers tainted by the channel layouts they measure."""
    sp = ctx.spaces(node.args[0])
    ndim = len(ctx.shape(node.args[0]) or ())
    dims = node.args[1:] or tuple(node.kwargs.values())
    if dims:
        d = norm_dim(int(dims[0]), ndim)
        return Taint((sp[d],)) if d in sp else None  # the size of a fixed dim is a plain constant
    return tuple(Taint((sp[d],)) if d in sp else None for d in range(ndim))


def getattr_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """``getattr(x, 'shape')`` is ``x.size()``; other attributes carry no channels."""
    if len(node.args) > 1 and node.args[1] == "shape":
        sp = ctx.spaces(node.args[0])
        ndim = len(ctx.shape(node.args[0]) or ())
        return tuple(Taint((sp[d],)) if d in sp else None for d in range(ndim))
    return None


def number_op(ctx: RuleContext, node: fx.Node) -> Taint | None:
    """Arithmetic on Python numbers: the result is tainted by its operands.

    ``size // k`` keeps an exact divisor, so a reshape can relate it to the channels it sizes.
    """
    layouts = tuple(ctx.layouts_in((node.args, node.kwargs)))
    if not layouts:
        return None
    first = ctx.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if (
        node.target is operator.floordiv
        and isinstance(first, Taint)
        and first.divisor is not None
        and isinstance(node.args[1], int)
    ):
        return Taint(first.layouts, first.divisor * node.args[1])
    return Taint(layouts, None)
