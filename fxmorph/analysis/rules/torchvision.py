"""Rules for functions torchvision wraps as graph leaves (``torch.fx.wrap``)."""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.rules._static import static_value
from fxmorph.analysis.rules.compute import no_rule, passthrough
from fxmorph.analysis.rules.modules import rescale_query
from fxmorph.analysis.rules.mvit import MVIT_RULES

__all__ = [
    "TORCHVISION_RULES",
    "patch_merging_pad",
    "relative_position_bias",
    "shifted_window_attention",
    "shifted_window_attention_3d",
]

_SWIN_ARGS = (
    "input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
    "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training",
)  # fmt: skip
_SWIN_3D_ARGS = (
    "input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
    "attention_dropout", "dropout", "qkv_bias", "proj_bias", "training",
)  # fmt: skip


def _window_helpers() -> frozenset[Any]:
    """Pure functions whose results size the windows (recomputed by :func:`static_value`)."""
    try:
        from torchvision.models.video import swin_transformer as video_swin
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return frozenset()
    return frozenset({video_swin._get_window_and_shift_size})


_PURE = _window_helpers()


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The node's arguments by parameter name, ``names`` giving the positional order."""
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def shifted_window_attention(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """Swin's windowed attention (2-D): the channels are heads x head dim, as in ``nn.MultiheadAttention``.

    Query, key and value projections and the output projection are parameters passed in directly,
    so they are unified with the stream; Swin V1 scales queries by the head dim, so surgery rescales
    the query rows to keep the original softmax temperature (V2's cosine attention needs nothing).
    """
    return _window_attention(ctx, node, _bound(node, _SWIN_ARGS))


def shifted_window_attention_3d(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """Video Swin's windowed attention (3-D windows over time, height and width): as the 2-D rule.

    Its window size is the value of ``_get_window_and_shift_size`` (the window shrinks to inputs
    smaller than it), recomputed here from the propagated shapes for the FLOPs count.
    """
    return _window_attention(ctx, node, _bound(node, _SWIN_3D_ARGS))


def _window_attention(ctx: RuleContext, node: fx.Node, a: dict[str, Any]) -> Spaces | None:
    """The rule shared by the 2-D and 3-D forms, given the call's arguments by name."""
    x, heads = a["input"], a["num_heads"]
    window = static_value(ctx, a["window_size"], _PURE)
    shape = ctx.shape(x)
    if (
        shape is None
        or not isinstance(heads, int)
        or not isinstance(window, list | tuple)
        or len(window) != len(shape) - 2
        or not all(isinstance(w, int) and w > 0 for w in window)
        or shape[-1] % heads
    ):
        return no_rule(ctx, node)
    # The head count of the position bias and the logit scale stays; so do their channels.
    ctx.pin_all([a.get("relative_position_bias"), a.get("logit_scale")], "per-head tensor of windowed attention")
    head = ctx.fresh(shape[-1] // heads)
    embed = head * heads  # heads x head dim, one atom repeated: all heads keep the same dims
    ctx.no_grow(head, "new query and key dims would change the attention logits")
    # Everything embed wide: the input's channels, the qkv weight's columns, both dims of the output
    # projection and its bias. The qkv weight's rows and bias are q, k and v stacked: three embeds.
    sources = [ctx.spaces(x).get(len(shape) - 1)]
    sources += [ctx.spaces(a[k]).get(d) for k, d in (("qkv_weight", 1), ("proj_weight", 0), ("proj_weight", 1))]
    sources += [ctx.spaces(a.get("proj_bias")).get(0)]
    triple = [ctx.spaces(a.get(k)).get(0) for k in ("qkv_weight", "qkv_bias")]
    for d, layout in ctx.spaces(x).items():
        if d != len(shape) - 1:
            ctx.pin(layout, "windowed attention over a channel dim")
    # on failure unify has pinned everything involved; the output then carries no channels
    if ctx.unify([embed, *[s for s in sources if s]], "windowed attention channels do not line up") is None:
        return None
    if ctx.unify([embed * 3, *[t for t in triple if t]], "windowed attention q/k/v do not line up") is None:
        return None
    if a.get("logit_scale") is None:
        # The function scales queries by (C // heads) ** -0.5 of the width it is given.
        paths = [str(a[k].target) for k in ("qkv_weight", "qkv_bias") if isinstance(a.get(k), fx.Node)]
        old = shape[-1] // heads
        rescale_query(ctx, paths, head, old)
    _swin_cost(ctx, shape, list(window), heads, embed, head)
    return {len(shape) - 1: embed}


def _swin_cost(ctx: RuleContext, shape: tuple[int, ...], window: list[int], heads: int, embed: Any, head: Any) -> None:
    """FLOPs of windowed attention on a ``[B, *spatial, C]`` input, as the function runs it."""
    # Inputs are padded up to whole windows in every spatial dim before the projections run.
    padded = [math.ceil(s / w) * w for s, w in zip(shape[1:-1], window, strict=True)]
    tokens, n = shape[0] * math.prod(padded), math.prod(window)
    windows = tokens // n
    ctx.cost(6 * tokens, embed, embed)  # packed q, k, v projection
    ctx.cost(4 * windows * heads * n * n, head)  # q k^T and attn v
    ctx.cost(2 * tokens, embed, embed)  # output projection


def relative_position_bias(ctx: RuleContext, node: fx.Node) -> Spaces:
    """Swin's ``_get_relative_position_bias`` (2-D and 3-D): gathers a ``[positions, heads]`` table into
    a ``[1, heads, N, N]`` bias. It holds one entry per head and position, none per channel, and the
    head count stays, so what it reads keeps its width and its output carries no channels."""
    ctx.pin_all((node.args, node.kwargs), "relative position bias: one entry per head and position")
    return {}


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
    """The rules keyed by torchvision's wrapped functions (none where torchvision does not import)."""
    try:
        from torchvision.models import swin_transformer
        from torchvision.models.video import swin_transformer as video_swin
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return {
        stochastic_depth: passthrough,
        swin_transformer.shifted_window_attention: shifted_window_attention,
        swin_transformer._patch_merging_pad: patch_merging_pad,
        swin_transformer._get_relative_position_bias: relative_position_bias,
        video_swin.shifted_window_attention_3d: shifted_window_attention_3d,
        video_swin._get_relative_position_bias: relative_position_bias,
        **MVIT_RULES,
    }


TORCHVISION_RULES = _torchvision_rules()
