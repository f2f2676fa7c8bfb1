"""Channel rules for parametrized weights: ``torch._weight_norm(v, g, dim)``, which
``torch.nn.utils.parametrizations.weight_norm`` computes on every access of a layer's weight (the call symbolic
tracing records inside a weight-normed layer, and ``aten._weight_norm`` in an exported graph).

``weight = g * v / ||v||``: ``v`` (``parametrizations.weight.original1``) has the weight's shape; ``g``
(``original0``) has the weight's size along ``dim`` and size one elsewhere (a scalar for ``dim=None``, which
torch writes ``-1``); the norm runs over every dim but ``dim`` (over all of them for ``-1``). The weight's
channels are ``v``'s (the ``get_attr`` of ``v`` gives each dim its channels, which the layer reading the weight
then unifies with its input and output), and along ``dim`` also ``g``'s: the two are one set, sliced together.

Removing channels along a normed dim renormalises the rest over the channels kept (the mask oracle's meaning of
removal for every normalisation over channels: LayerNorm, GroupNorm, this). New channels would change the
function: a new slice along ``dim`` has no norm of its own to divide by (``0 / 0`` for zero values), and nonzero
values along a normed dim change the norm of every existing slice, so each channel dim of the weight may shrink
but not grow.

A parametrized layer kept whole (named in ``leaf_modules``, or a recurrent layer, which the tracer never
enters) derives its weight inside one call, where no binding can reach ``g`` and ``v``:
:func:`parametrized_leaf` pins its channels and says how to free them.
"""

from __future__ import annotations

from torch import fx

from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.rules.compute import no_rule

__all__ = ["parametrized_leaf", "weight_norm"]

_GROW = "a new channel of a weight_norm'd weight would change its norm (g * v / ||v||)"


def _dim(node: fx.Node) -> int | None:
    """The call's ``dim`` (ATen's default 0 where the graph leaves it out); None when it is not a plain int."""
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def weight_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``torch._weight_norm(v, g, dim)``: the weight has ``v``'s channels, ``g``'s along ``dim`` are the same
    ones, and none may grow (see the module docstring)."""
    v = node.args[0] if node.args else node.kwargs.get("v")
    g = node.args[1] if len(node.args) > 1 else node.kwargs.get("g")
    dim, sv, sg, so = _dim(node), ctx.shape(v), ctx.shape(g), ctx.shape(node)
    if dim is None or sv is None or sg is None or so != sv or not -len(sv) <= dim < len(sv):
        return no_rule(ctx, node)
    # -1 is the whole tensor (``dim=None``), as torch reads it; any other negative dim counts from the end
    kept = None if dim == -1 else dim % len(sv)
    vs, gs = ctx.spaces(v), ctx.spaces(g)
    out: Spaces = {}
    for d, layout in vs.items():
        if d == kept and d in gs:
            merged = ctx.unify([layout, gs[d]], "weight_norm's g and v do not line up along its dim")
            layout = merged if merged is not None else layout  # (pinned where they do not)
        ctx.no_grow(layout, _GROW)
        out[d] = layout
    for d, layout in gs.items():
        if d != kept or d not in vs:  # g broadcast against v along a dim it should not hold: nothing to slice by
            ctx.pin(layout, "weight_norm's g has a dim that v does not index alike")
    return out


def parametrized_leaf(ctx: RuleContext, node: fx.Node) -> None:
    """A parametrized layer called whole: its weight is derived inside the call, from stored tensors no binding
    reaches, so every channel it touches keeps its width."""
    ctx.pin_all(
        (node.args, node.kwargs),
        f"layer '{node.target}' derives its weight from a parametrization inside one call (a leaf), where its "
        "stored tensors cannot be sliced (one named in leaf_modules: leave it out, so that the trace enters it)",
    )
    return None
