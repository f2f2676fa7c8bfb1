"""Channel rules for data-movement ops: permute, indexing, size queries. Reshapes live in
:mod:`fxmorph.analysis.rules.reshape`, cat and split in :mod:`fxmorph.analysis.rules.cat_split`; both are
re-exported here, where the op table finds every data-movement rule.

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
from fxmorph.analysis.rules.cat_split import cat, chunk, split, tensor_split, unbind
from fxmorph.analysis.rules.reshape import flatten_module, record_size_rewrites, reshape

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
    record_size_rewrites(ctx, node, out)  # a size written as a number (an exported graph's) follows its channels
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


def _is_buffer(ctx: RuleContext, src: Any) -> bool:
    """Whether ``src`` reads a buffer of the graph's module (not a parameter) by ``get_attr``."""
    if not isinstance(src, fx.Node) or src.op != "get_attr":
        return False
    try:
        ctx.gm.get_buffer(str(src.target))
    except AttributeError:
        return False
    return True


def _slice_layout(
    ctx: RuleContext, node: fx.Node, layout: Layout, item: slice, size: int, location: ArgSlot
) -> Layout | None:
    """The channels a constant slice of a channel dim keeps, with a rewrite of its bounds for surgery."""
    start, stop, step = item.start, item.stop, item.step
    if item == slice(None):
        return layout
    if _is_buffer(ctx, node.args[0]):
        # a buffer sliced by constants is a table of positions (position ids, a rotary cache): an input of
        # another length reads other rows, so neither the rows read nor the rows dropped may go
        ctx.pin(layout, "a slice of a stored buffer (a table of positions)")
        return None
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

    to_end = hi >= size  # the slice runs to the end: keep the bounds the source wrote

    def new_slice(measure: Any, head: Layout = head, sub: Layout = sub) -> slice:
        begin = measure(head) if head else 0
        end = begin + measure(sub)
        if to_end and (stop is None or stop >= size):
            # ``x[..., k:]`` stays open-ended and ``x[..., -k:]`` stays negative, as the source
            # wrote them, so that write-back compares the rewritten graph with the class's own code
            first = -measure(sub) if isinstance(start, int) and start < 0 else (None if start is None else begin)
            return slice(first, stop, None)
        return slice(None if start is None and not begin else begin, end, None)

    ctx.rewrite(location, new_slice)
    return sub


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
