"""Rules for functions torchvision wraps as graph leaves (``torch.fx.wrap``)."""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.rules_compute import no_rule, passthrough
from fxmorph.analysis.rules_modules import rescale_query

__all__ = ["TORCHVISION_RULES", "patch_merging_pad", "shifted_window_attention"]

_SWIN_ARGS = (
    "input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
    "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training",
)  # fmt: skip


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def shifted_window_attention(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """Swin's windowed attention: the channels are heads x head dim, as in ``nn.MultiheadAttention``.

    Query, key and value projections and the output projection are parameters passed in directly,
    so they are unified with the stream; Swin V1 scales queries by the head dim, so surgery rescales
    the query rows to keep the original softmax temperature (V2's cosine attention needs nothing).
    """
    a = _bound(node, _SWIN_ARGS)
    x, heads, window = a["input"], a["num_heads"], a["window_size"]
    shape = ctx.shape(x)
    if shape is None or not isinstance(heads, int) or not all(isinstance(w, int) for w in window):
        return no_rule(ctx, node)
    # The head count of the position bias and the logit scale stays; so do their channels.
    ctx.pin_all([a.get("relative_position_bias"), a.get("logit_scale")], "per-head tensor of windowed attention")
    head = ctx.fresh(shape[-1] // heads)
    embed = head * heads
    ctx.no_grow(head, "new query and key dims would change the attention logits")
    sources = [ctx.spaces(x).get(len(shape) - 1)]
    sources += [ctx.spaces(a[k]).get(d) for k, d in (("qkv_weight", 1), ("proj_weight", 0), ("proj_weight", 1))]
    sources += [ctx.spaces(a.get("proj_bias")).get(0)]
    triple = [ctx.spaces(a.get(k)).get(0) for k in ("qkv_weight", "qkv_bias")]
    for d, layout in ctx.spaces(x).items():
        if d != len(shape) - 1:
            ctx.pin(layout, "windowed attention over a channel dim")
    if ctx.unify([embed, *[s for s in sources if s]], "windowed attention channels do not line up") is None:
        return None
    if ctx.unify([embed * 3, *[t for t in triple if t]], "windowed attention q/k/v do not line up") is None:
        return None
    if a.get("logit_scale") is None:
        paths = [str(a[k].target) for k in ("qkv_weight", "qkv_bias") if isinstance(a.get(k), fx.Node)]
        old = shape[-1] // heads
        ctx.rewrite(("!rescale_query", None), lambda measure: rescale_query(paths, measure(head), old))
    _swin_cost(ctx, shape, window, heads, embed, head)
    return {len(shape) - 1: embed}


def _swin_cost(ctx: RuleContext, shape: tuple[int, ...], window: list[int], heads: int, embed: Any, head: Any) -> None:
    b, h, w = shape[0], shape[1], shape[2]
    ph, pw = math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1]
    tokens, n = b * ph * pw, window[0] * window[1]
    windows = tokens // n
    ctx.cost(6 * tokens, embed, embed)  # packed q, k, v projection
    ctx.cost(4 * windows * heads * n * n, head)  # q k^T and attn v
    ctx.cost(2 * tokens, embed, embed)  # output projection


def patch_merging_pad(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """Swin's patch merging: the 2x2 neighbours are concatenated, so channels appear four times."""
    x = node.args[0]
    shape, out = ctx.shape(x), ctx.shape(node)
    if shape is None or out is None or out[-1] != 4 * shape[-1]:
        return no_rule(ctx, node)
    sp = ctx.spaces(x)
    last = len(shape) - 1
    for d, layout in sp.items():
        if d != last:
            ctx.pin(layout, "patch merging over a channel dim")
    return {last: sp[last] * 4} if last in sp else {}


def _torchvision_rules() -> dict[Any, Any]:
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return {
        stochastic_depth: passthrough,
        swin_transformer.shifted_window_attention: shifted_window_attention,
        swin_transformer._patch_merging_pad: patch_merging_pad,
    }


TORCHVISION_RULES = _torchvision_rules()
