"""Channel rule for ``torch.addmm(bias, x, w)``: ``bias + x @ w`` of two matrices.

Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) is a linear layer whose weight is stored
as ``(in, out)``: its forward computes ``torch.addmm(self.bias, x.view(-1, nx), self.weight)``, which
``torch.export`` writes as ``aten.addmm.default`` and symbolic tracing as ``torch.addmm`` with its parameters
used directly. The weight's dim 0 is contracted with the input's channels (``K``), its dim 1 makes the
output's (``N``) and the bias, broadcast against the ``(M, N)`` product as in any addition, lines up with the
product's dims. Surgery slices each parameter along the dims bound here, so the weight loses rows where
the input loses channels and columns where the output does.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.rules._util import rows_kernel
from fxmorph.analysis.rules.compute import contract, no_rule

__all__ = ["addmm"]

_NAMES = ("input", "mat1", "mat2")
"""``torch.addmm``'s (and ATen's) names of its three tensor arguments, for calls that pass them by keyword."""


def _operands(node: fx.Node) -> tuple[Any, ...]:
    """The bias, the input and the weight of an ``addmm`` call, by position or keyword."""
    return tuple(node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in enumerate(_NAMES))


def _with_bias(ctx: RuleContext, bias: Any, d: int, layout: Layout | None, out: tuple[int, ...]) -> Layout | None:
    """The channels of output dim ``d`` once ``bias`` (broadcast to the output's shape) is added to the
    product's, which carry ``layout`` there: both the same channels, or neither."""
    shape = ctx.shape(bias)
    k = d - (len(out) - len(shape)) if shape is not None else -1
    if shape is None or k < 0:  # no tensor, or one of lower rank: nothing of it lies along this dim
        return layout
    own = ctx.spaces(bias).get(k)
    if shape[k] == 1 and out[d] != 1:  # broadcast from one: a one-channel bias must stay one channel
        if own is not None:
            ctx.pin(own, "a one-channel addmm bias is broadcast against a wider product")
        return layout
    if own is not None and layout is not None:
        return ctx.unify([layout, own], "addmm adds a bias whose channels do not line up with the product's")
    for fixed in (own, layout):
        if fixed is not None:
            ctx.pin(fixed, "addmm adds channels to a fixed-width tensor")
    return None


def addmm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``torch.addmm(bias, x, w)`` (``beta`` and ``alpha`` scale values, not channels): ``x`` is ``(M, K)``,
    ``w`` is ``(K, N)``; ``K`` is contracted, ``M`` and ``N`` pass to the output with the bias's channels.

    Its FLOPs are ``2 * M * K * N``, the product alone, as ``torch.utils.flop_counter`` counts them."""
    bias, x, w = _operands(node)
    sx, sw, so = ctx.shape(x), ctx.shape(w), ctx.shape(node)
    if sx is None or sw is None or so is None or len(sx) != 2 or len(sw) != 2 or len(so) != 2:
        return no_rule(ctx, node)
    k = contract(ctx, (x, 1), (w, 0), "addmm")
    out: Spaces = {}
    for d, layout in ((0, ctx.spaces(x).get(0)), (1, ctx.spaces(w).get(1))):
        merged = _with_bias(ctx, bias, d, layout, so)
        if merged is not None:
            out[d] = merged
    rows = out.get(0, so[0])
    kernel = rows_kernel([rows]) if isinstance(w, fx.Node) and w.op == "get_attr" else None  # a weight, not activations
    ctx.cost(2, rows, k, out.get(1, so[1]), kernel=kernel, axes=(k, out.get(1, so[1])))
    return out
