"""Channel rules for the functional forms of layers: norms, embeddings, PReLU, GLU, softmax variants.

A layer whose module has a rule (``nn.BatchNorm2d``) often reaches the graph in its functional form
instead: a module with its own forward (timm's ``BatchNormAct2d``, ``LayerNorm2d``, ``GroupNormAct``)
is traced through, and its parameters arrive as ``get_attr`` nodes passed to ``F.batch_norm`` and
friends. These rules give those forms the module rules' meaning: the parameters are tied to the
channels they scale by unifying their spaces (the ``get_attr`` rule binds each parameter axis, so
surgery slices it), and a parameter whose axis carries no channels pins the input's channels. The
``torch.*`` aliases (``torch.batch_norm`` takes its arguments in another order) share the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ArgSlot, RuleContext, Spaces
from fxmorph.analysis.rules._util import norm_dim
from fxmorph.analysis.rules.compute import no_rule
from fxmorph.analysis.rules.reshape import reshape

__all__ = [
    "batch_norm",
    "embedding",
    "glu",
    "group_norm",
    "layer_norm",
    "module_softmax",
    "normalize",
    "prelu",
    "reshape_as",
]

_Rule = Callable[[RuleContext, fx.Node], Any]

# Parameter names of every functional form, in positional order.
_SIGNATURES: dict[Any, tuple[str, ...]] = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled",
    ),
    F.instance_norm: (
        "input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps",
    ),
    torch.instance_norm: (
        "input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
        "cudnn_enabled",
    ),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    torch.group_norm: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    torch.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    torch.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    torch.embedding: ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
    torch.prelu: ("input", "weight"),
    F.glu: ("input", "dim"),
    F.normalize: ("input", "p", "dim", "eps", "out"),
}  # fmt: skip

_STATS = ("weight", "bias", "running_mean", "running_var")


def _bound(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by parameter name (positional and keyword)."""
    names = _SIGNATURES.get(node.target, ())
    values = dict(zip(names, node.args, strict=False))  # not strict: trailing arguments may be left out
    values.update(node.kwargs)
    return values


def _where(node: fx.Node, name: str) -> int | str:
    """Where argument ``name`` sits in ``node``: its position, or its keyword."""
    if name in node.kwargs:
        return name
    return _SIGNATURES[node.target].index(name)


def _tie(ctx: RuleContext, layout: Layout | None, params: Sequence[Any], what: str) -> Layout | None:
    """Unify ``layout`` (an input's channel axis) with dim 0 of every parameter in ``params``.

    A fixed-width input pins the parameters' channels; a parameter whose axis carries no channels
    (computed from constants, say) pins the input's. Returns the unified layout, or ``None``.
    """
    nodes = [p for p in params if isinstance(p, fx.Node)]  # None (no weight, no bias) ties nothing
    own = [ctx.spaces(p).get(0) for p in nodes]
    if layout is None:
        for lay in own:
            if lay is not None:
                ctx.pin(lay, f"{what} over a fixed-width dim")
        return None
    if any(lay is None for lay in own):
        ctx.pin(layout, f"{what} with a parameter whose width is fixed")
        return None
    return ctx.unify([layout, *[lay for lay in own if lay is not None]], f"{what} parameters do not line up")


def _batch_statistics(node: fx.Node, a: dict[str, Any]) -> bool:
    """True if the norm computes its statistics from the input rather than its running buffers."""
    if a.get("running_mean") is None or a.get("running_var") is None:
        return True
    # the defaults are those of the signatures: instance norm uses input statistics, batch norm does not
    if node.target in (F.instance_norm, torch.instance_norm):
        return bool(a.get("use_input_stats", True))
    return bool(a.get("training", False))


def batch_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.batch_norm``/``F.instance_norm`` (and ``torch.*``): per-channel on dim 1, with parameters and
    running statistics tied to the channels. Statistics taken from the input (training mode, no running
    buffers, instance norm) average over every other dim (dims 2 and up for instance norm): channels
    there would change them, so they are pinned (weight standardisation reaches this with a weight's
    input channels)."""
    a = _bound(node)
    x = a.get("input")
    shape = ctx.shape(x)
    if shape is None or len(shape) < 2:
        return no_rule(ctx, node)
    out = dict(ctx.spaces(x))
    if _batch_statistics(node, a):
        # batch norm averages over the batch and spatial dims; instance norm per sample, over spatial only
        first = 2 if node.target in (F.instance_norm, torch.instance_norm) else 0
        for d in range(first, len(shape)):
            if d != 1 and d in out:
                ctx.pin(out[d], "norm statistics averaged over channels")
    _tie(ctx, out.get(1), [a.get(k) for k in _STATS], "batch norm")
    return out


def group_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.group_norm``: channels removed uniformly in every group (the group count is a constant)."""
    a = _bound(node)
    x, groups = a.get("input"), a.get("num_groups")
    shape = ctx.shape(x)
    if shape is None or len(shape) < 2 or not isinstance(groups, int):
        return no_rule(ctx, node)
    out = dict(ctx.spaces(x))
    for d in range(2, len(shape)):  # each group's statistics average over these dims too
        if d in out:
            ctx.pin(out[d], "norm statistics averaged over channels")
    lin = out.get(1)
    if lin is not None:
        ctx.no_grow(lin, "new channels would change a GroupNorm's statistics")
        # the groups are consecutive chunks; unified, every group loses the same channels and the count stays
        parts = ctx.atoms.chunks(lin, groups)
        if not parts or ctx.unify(parts, "group norm groups do not line up") is None:
            ctx.pin(lin, "group norm whose groups do not line up with its channels")
    _tie(ctx, lin, [a.get("weight"), a.get("bias")], "group norm")
    return out


def layer_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.layer_norm``/``F.rms_norm`` (and ``torch.*``) over the last dim: the parameters follow its
    channels and surgery rewrites ``normalized_shape``; over several dims, their channels are pinned."""
    a = _bound(node)
    x, normalized = a.get("input"), a.get("normalized_shape")
    sx = ctx.shape(x)
    if sx is None or not isinstance(normalized, list | tuple | torch.Size) or not normalized:
        return no_rule(ctx, node)
    out = dict(ctx.spaces(x))
    params = [a.get("weight"), a.get("bias")]
    what = "rms norm" if node.target in (F.rms_norm, torch.rms_norm) else "layer norm"
    if len(normalized) != 1:
        for d in range(len(sx) - len(normalized), len(sx)):
            if d in out:
                ctx.pin(out[d], f"{what} over several dims")
        ctx.pin_all([p for p in params if isinstance(p, fx.Node)], f"{what} over several dims")
        return out
    d = len(sx) - 1
    if out.get(d) is not None:
        ctx.no_grow(out[d], f"new channels would change a {what}'s statistics")
    merged = _tie(ctx, out.get(d), params, what)
    # normalized_shape's one entry follows the new width where it is a constant; one the forward computes (from
    # ``x.shape``) follows it by itself, and stays computed, so the user's own code still expresses the result
    if merged is not None and not isinstance(normalized[0], fx.Node):
        where = _where(node, "normalized_shape")
        ctx.rewrite(ArgSlot(where, 0), lambda measure: measure(merged))
    return out


def embedding(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.embedding``/``torch.embedding``: the output's last dim is the weight's columns; its rows are
    chosen by index values, so they keep their count."""
    a = _bound(node)
    idx, w = a.get("input"), a.get("weight")
    so, sw = ctx.shape(node), ctx.shape(w)
    if so is None or sw is None or len(sw) != 2:
        return no_rule(ctx, node)
    ws = ctx.spaces(w)
    if 0 in ws:
        ctx.pin(ws[0], "embedding rows are chosen by index values")
    out = dict(ctx.spaces(idx))
    lout = ws.get(1)
    if lout is not None:
        if a.get("max_norm") is not None:
            ctx.pin(lout, "embedding with max_norm renormalises over its channels")
        out[len(so) - 1] = lout
    return out


def prelu(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.prelu``/``torch.prelu``/``Tensor.prelu``: one slope per channel (dim 1, or dim 0 of a 1-D input)
    tied to the channels, or a single shared slope."""
    a = _bound(node) if node.op == "call_function" else dict(zip(("input", "weight"), node.args, strict=False))
    x, w = a.get("input"), a.get("weight")
    shape, sw = ctx.shape(x), ctx.shape(w)
    if shape is None or sw is None:
        return no_rule(ctx, node)
    out = dict(ctx.spaces(x))
    # one slope per channel (a single shared slope applies at any width); the channels sit on dim 1, or on
    # dim 0 of a 1-D input
    if int(torch.Size(sw).numel()) > 1 or 0 in ctx.spaces(w):
        _tie(ctx, out.get(1 if len(shape) > 1 else 0), [w], "prelu")
    return out


def glu(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.glu(x, dim)``: the two halves of ``dim`` are multiplied, so they keep the same channels."""
    a = _bound(node)
    x = a.get("input")
    shape = ctx.shape(x)
    if shape is None:
        return no_rule(ctx, node)
    d = norm_dim(int(a.get("dim", -1)), len(shape))
    out = dict(ctx.spaces(x))
    layout = out.pop(d, None)
    if layout is not None:
        # glu(x) = a * sigmoid(b) for the halves a, b: channel i of one meets channel i of the other
        halves = ctx.atoms.chunks(layout, 2)
        merged = ctx.unify(halves, "glu halves do not line up") if halves else None
        if merged is None:
            ctx.pin(layout, "glu halves do not line up")
        else:
            out[d] = merged
    return out


def normalize(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``F.normalize`` over a dim: removed channels are zeros, which no p-norm sees, so removal is exact;
    new channels would change the norm."""
    a = _bound(node)
    x = a.get("input")
    shape = ctx.shape(x)
    if shape is None or a.get("out") is not None:
        return no_rule(ctx, node)
    out = dict(ctx.spaces(x))
    d = norm_dim(int(a.get("dim", 1)), len(shape))
    if d in out:
        ctx.no_grow(out[d], "new channels would change the norm F.normalize divides by")
    return out


def reshape_as(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``x.reshape_as(y)``/``x.view_as(y)``: a reshape to ``y``'s shape, which surgery changes with
    ``y``, so the output's channels and ``y``'s must be the same; where only one side carries channels,
    they are pinned."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not isinstance(other, fx.Node) or ctx.shape(other) != ctx.shape(node):
        return no_rule(ctx, node)
    out = reshape(ctx, node) or {}
    theirs = ctx.spaces(other)
    for d in set(out) | set(theirs):
        mine, their = out.get(d), theirs.get(d)
        if mine is not None and their is not None:
            if ctx.unify([mine, their], "reshape_as of channels that do not line up") is None:
                out.pop(d)
        else:  # one side fixed: surgery would change y's width there but not x's, or the reverse
            ctx.pin(mine or their, "reshape_as between a channel dim and a fixed-width dim")  # type: ignore[arg-type]
            out.pop(d, None)
    return out


def module_softmax(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.Softmax``/``nn.Softmin``/``nn.LogSoftmax`` (dim from the module) and ``nn.Softmax2d``
    (over dim -3): channels along the softmax dim are pinned, the others pass."""
    m = ctx.module()
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    shape = ctx.shape(x)
    if shape is None:
        return no_rule(ctx, node)
    # Softmax2d has no ``dim`` attribute: it always normalises over dim -3, the channels of (N,) C, H, W
    dim = -3 if isinstance(m, nn.Softmax2d) else getattr(m, "dim", None)
    if dim is None:  # legacy implicit dim: pin, as a guess could be wrong
        ctx.pin_all(node.args, "softmax with an implicit dim")
        return None
    out = dict(ctx.spaces(x))
    d = norm_dim(int(dim), len(shape))
    if d in out:
        ctx.pin(out.pop(d), "softmax over channels")
    return out
