"""Channel rules for leaf modules: convolutions, linears, norms, embeddings, attention, shuffles."""

from __future__ import annotations

import math
from typing import Any

from torch import fx, nn

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import ModuleAttr, Role, RuleContext, ScaleRows, Spaces
from fxmorph.analysis.kernels import conv_kernel, gemm_kernel
from fxmorph.analysis.rules._util import pin_positions, rows_kernel
from fxmorph.analysis.rules.compute import no_rule

__all__ = [
    "batch_norm",
    "channel_shuffle",
    "conv",
    "conv_transpose",
    "embedding",
    "group_norm",
    "layer_norm",
    "linear",
    "multihead_attention",
    "pixel_shuffle",
    "pixel_unshuffle",
    "prelu",
]


def _path(ctx: RuleContext, name: str) -> str:
    """The path from the root of attribute ``name`` of the called module (``layer1.conv.weight``)."""
    assert ctx.node is not None
    return f"{ctx.node.target}.{name}"


def _bind(ctx: RuleContext, names: tuple[str, ...], dim: int, layout: Layout | None, role: Role) -> None:
    """Bind ``dim`` of each of the module's tensors ``names`` that exists (``bias=False`` leaves it None)."""
    module = ctx.module()
    for name in names:
        if getattr(module, name, None) is not None:
            ctx.bind(_path(ctx, name), dim, layout, role)


def _attr(ctx: RuleContext, name: str, layout: Layout | None, scale: int = 1, wrap: Any = None) -> None:
    """Record a module attribute that equals ``scale`` x the width of ``layout``."""
    if layout is None:
        return

    def value(measure: Any) -> Any:
        width = scale * measure(layout)
        return wrap(width) if wrap is not None else width

    ctx.rewrite(ModuleAttr(name), value)


def _repeat(layout: Layout, times: int) -> Layout:
    """The same channels ``times`` over, one copy after the other (the groups or heads of a layer)."""
    return layout * times


def _scale_inner(ctx: RuleContext, layout: Layout, factor: int) -> Layout:
    """Each channel repeated ``factor`` times in a row (a depthwise multiplier, a pixel unshuffle)."""
    return tuple((a, inner * factor) for a, inner in ctx.atoms.expand(layout))


def _channel_dim(ctx: RuleContext, node: fx.Node, spatial: int) -> int | None:
    """The input's channel dim, the one before its ``spatial`` dims: 1 with a batch dim, 0 without."""
    shape = ctx.shape(node.args[0])
    return None if shape is None else len(shape) - spatial - 1


def _positions(ctx: RuleContext, shape: tuple[int, ...], sp: Spaces, skip: int) -> list[Layout | int]:
    """Cost factors of every dim but ``skip``: a layout where channels live, else the fixed size."""
    return [sp.get(d, shape[d]) for d in range(len(shape)) if d != skip]


def conv(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.Conv{1,2,3}d``: producer of its output channels, consumer of its input channels.

    Depthwise convolutions (one input channel per group) pass their channels through, with a
    multiplier; other grouped convolutions keep their group count and remove channels uniformly
    in every group.
    """
    m = ctx.module()
    assert isinstance(m, nn.modules.conv._ConvNd)
    spatial = len(m.kernel_size)
    cd = _channel_dim(ctx, node, spatial)
    out_shape = ctx.shape(node)
    if cd is None or out_shape is None:
        return no_rule(ctx, node)
    sp = ctx.spaces(node.args[0])
    pin_positions(ctx, sp, cd, "a convolution")
    lin, groups = sp.get(cd), m.groups
    cin_g, cout = m.in_channels // groups, m.out_channels
    if groups == 1:
        fan_in: Layout | int = lin if lin is not None else cin_g
        lout: Layout | None = ctx.fresh(cout)
    elif cin_g == 1:  # depthwise: output channel j reads input channel j // multiplier
        fan_in, lout = 1, _depthwise_out(ctx, lin, groups, cout // groups)
    else:
        fan_in = _grouped_in(ctx, lin, groups, cin_g)
        # one atom repeated per group: every group's outputs lose the same positions, so groups stay equal
        lout = _repeat(ctx.fresh(cout // groups), groups)
    if groups == 1 or cin_g > 1:  # (a depthwise weight's input dim has one channel: nothing to bind)
        ctx.bind(_path(ctx, "weight"), 1, None if isinstance(fan_in, int) else fan_in, Role.IN)
    if not isinstance(fan_in, int):
        _attr(ctx, "in_channels", fan_in, groups)  # fan_in is one group's input: in_channels is groups x it
    _bind(ctx, ("weight", "bias"), 0, lout, Role.OUT)
    _attr(ctx, "out_channels", lout)
    if groups > 1 and cin_g == 1:  # depthwise: the group count is the input width and changes with it
        _attr(ctx, "in_channels", lin)
        _attr(ctx, "groups", lin)
    out = {d: lay for d, lay in sp.items() if d < cd}
    if lout is not None:
        out[cd] = lout
    positions = _positions(ctx, out_shape, out, cd)
    # FLOPs: 2 x kernel x output positions x one group's inputs x all outputs (right for any group count)
    kernel = None
    if m.padding_mode == "zeros" and cd == 1:
        kernel = conv_kernel(ctx.shape(node.args[0]) or (), m.weight.shape, m.stride, m.padding, m.dilation, groups)
    if kernel is not None and not isinstance(positions[0], int):
        kernel = None  # channels in the batch dim: the kernel's batch is not fixed
    axes = (lin or m.in_channels,) if groups > 1 and cin_g == 1 else (lin or m.in_channels, lout or cout)
    ctx.cost(2 * math.prod(m.kernel_size), *positions, fan_in, lout or cout, kernel=kernel, axes=axes)
    return out


def _depthwise_out(ctx: RuleContext, lin: Layout | None, groups: int, mult: int) -> Layout | None:
    """Output layout of a depthwise layer: each input channel's ``mult`` outputs, in a row. With a fixed
    input, the multiplier's outputs may still shrink alike in every group; a multiplier of one is fixed."""
    if lin is not None:
        return _scale_inner(ctx, lin, mult)
    return _repeat(ctx.fresh(mult), groups) if mult > 1 else None


def _grouped_in(ctx: RuleContext, lin: Layout | None, groups: int, cin_g: int) -> Layout | int:
    """One group's input layout, with the input's ``groups`` chunks unified (so they stay equal), or the
    fixed per-group width where the input is fixed or its chunks cannot be unified."""
    if lin is None:
        return cin_g
    parts = ctx.atoms.chunks(lin, groups)
    merged = ctx.unify(parts, "grouped convolution needs the same channels in every group") if parts else None
    if merged is None:
        ctx.pin(lin, "grouped convolution whose groups do not line up with its input channels")
        return cin_g
    return merged


def conv_transpose(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.ConvTranspose{1,2,3}d`` with ``groups == 1`` or depthwise; weight is ``[in, out/g, k]``."""
    m = ctx.module()
    assert isinstance(m, nn.modules.conv._ConvTransposeNd)
    spatial = len(m.kernel_size)
    cd = _channel_dim(ctx, node, spatial)
    in_shape = ctx.shape(node.args[0])
    if cd is None or in_shape is None or (m.groups != 1 and m.in_channels != m.groups):
        return no_rule(ctx, node)
    sp = ctx.spaces(node.args[0])
    pin_positions(ctx, sp, cd, "a transposed convolution")
    lin = sp.get(cd)
    if m.groups == 1:  # the transposed weight is [in, out, k]: dim 0 reads, dim 1 makes
        ctx.bind(_path(ctx, "weight"), 0, lin, Role.IN)
        lout: Layout | None = ctx.fresh(m.out_channels)
        ctx.bind(_path(ctx, "weight"), 1, lout, Role.OUT)
        per_group_out: Layout | int = lout
    else:  # depthwise: weight dim 0 follows the channels through, like a norm's parameters
        lout = _depthwise_out(ctx, lin, m.groups, m.out_channels // m.groups)
        ctx.bind(_path(ctx, "weight"), 0, lin, Role.OUT)
        per_group_out = m.out_channels // m.groups
    _bind(ctx, ("bias",), 0, lout, Role.OUT)
    _attr(ctx, "in_channels", lin)
    _attr(ctx, "out_channels", lout)
    if m.groups != 1:
        _attr(ctx, "groups", lin)
    out = {d: lay for d, lay in sp.items() if d < cd}
    if lout is not None:
        out[cd] = lout
    # a transposed convolution's work goes by input position: 2 x kernel x input positions x C_in x one
    # group's outputs
    positions = _positions(ctx, in_shape, out, cd)
    ctx.cost(2 * math.prod(m.kernel_size), *positions, lin or m.in_channels, per_group_out)
    return out


def linear(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.Linear``: consumer of the last dim of its input, producer of the last dim of its output."""
    m = ctx.module()
    assert isinstance(m, nn.Linear)
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    if in_shape is None or out_shape is None:
        return no_rule(ctx, node)
    sp = ctx.spaces(node.args[0])
    last = len(in_shape) - 1
    lin = sp.get(last)
    ctx.bind(_path(ctx, "weight"), 1, lin, Role.IN)
    lout = ctx.fresh(m.out_features)
    _bind(ctx, ("weight", "bias"), 0, lout, Role.OUT)
    _attr(ctx, "in_features", lin)
    _attr(ctx, "out_features", lout)
    out = {d: lay for d, lay in sp.items() if d < last}
    out[last] = lout
    rows = _positions(ctx, out_shape, out, last)
    fan_in = lin if lin is not None else m.in_features
    ctx.cost(2, *rows, fan_in, lout, kernel=rows_kernel(rows), axes=(fan_in, lout))
    return out


def batch_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """BatchNorm and InstanceNorm: per-channel, so channels pass through with their statistics."""
    m = ctx.module()
    shape = ctx.shape(node.args[0])
    if shape is None:
        return no_rule(ctx, node)
    # an unbatched input to an instance norm, (C, L) or (C, H, W), has its channels on dim 0
    # an unbatched input (C, *spatial) has its channels first; the class tells its spatial rank, by hierarchy
    instance = isinstance(m, nn.modules.instancenorm._InstanceNorm)
    cd = 0 if instance and len(shape) == m._get_no_batch_dim() else 1
    sp = dict(ctx.spaces(node.args[0]))
    _bind(ctx, ("weight", "bias", "running_mean", "running_var"), 0, sp.get(cd), Role.OUT)
    _attr(ctx, "num_features", sp.get(cd))
    return sp


def layer_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.LayerNorm``/``nn.RMSNorm``: normalise the last dims; their parameters follow their channels."""
    m = ctx.module()
    assert isinstance(m, nn.LayerNorm | nn.RMSNorm)
    shape = ctx.shape(node.args[0])
    if shape is None:
        return no_rule(ctx, node)
    sp = dict(ctx.spaces(node.args[0]))
    k = len(m.normalized_shape)
    if k != 1:
        ctx.pin_all(node.args[0], "layer norm over several dims")
        return sp
    if len(shape) - 1 in sp:
        ctx.no_grow(sp[len(shape) - 1], "new channels would change a LayerNorm's statistics")
    _bind(ctx, ("weight", "bias"), 0, sp.get(len(shape) - 1), Role.OUT)
    _attr(ctx, "normalized_shape", sp.get(len(shape) - 1), wrap=lambda w: (w,))  # a tuple, as LayerNorm stores it
    return sp


def group_norm(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.GroupNorm``: channels removed uniformly in every group, so the group count is kept."""
    m = ctx.module()
    assert isinstance(m, nn.GroupNorm)
    sp = dict(ctx.spaces(node.args[0]))
    lin = sp.get(1)
    if lin is not None:
        ctx.no_grow(lin, "new channels would change a GroupNorm's statistics")
        parts = ctx.atoms.chunks(lin, m.num_groups)
        if not parts or ctx.unify(parts, "group norm groups do not line up") is None:
            ctx.pin(lin, "group norm whose groups do not line up with its channels")
    _bind(ctx, ("weight", "bias"), 0, lin, Role.OUT)
    _attr(ctx, "num_channels", lin)
    return sp


def prelu(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.PReLU``: one slope per channel (dim 1) or a single shared slope."""
    m = ctx.module()
    assert isinstance(m, nn.PReLU)
    sp = dict(ctx.spaces(node.args[0]))
    if m.num_parameters > 1:  # one shared slope applies at any width: nothing to bind
        shape = ctx.shape(node.args[0]) or ()
        _bind(ctx, ("weight",), 0, sp.get(1 if len(shape) > 1 else 0), Role.OUT)
        _attr(ctx, "num_parameters", sp.get(1 if len(shape) > 1 else 0))
    return sp


def embedding(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.Embedding``: produces a new channel dim, the columns of its weight; the index dims keep theirs (a
    lookup per index: channels carried by the index tensor stay on the same dims)."""
    m = ctx.module()
    assert isinstance(m, nn.Embedding)
    out_shape = ctx.shape(node)
    if out_shape is None:
        return no_rule(ctx, node)
    lout = ctx.fresh(m.embedding_dim)
    ctx.bind(_path(ctx, "weight"), 1, lout, Role.OUT)
    _attr(ctx, "embedding_dim", lout)
    return {**ctx.spaces(node.args[0]), len(out_shape) - 1: lout}


def _factor(ctx: RuleContext, node: fx.Node, name: str) -> int | None:
    """The module attribute ``name``, or for the functional form (``F.pixel_shuffle(x, r)``) its second
    argument; ``None`` if it is not a constant."""
    # the keyword of the functional form is ``name`` too (F.pixel_shuffle(x, upscale_factor=2))
    value = getattr(ctx.module(), name) if node.op == "call_module" else (node.args[1:2] or [node.kwargs.get(name)])[0]
    return value if isinstance(value, int) else None


def pixel_shuffle(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.PixelShuffle(r)``/``F.pixel_shuffle``: each output channel is a block of ``r*r`` input channels."""
    r = _factor(ctx, node, "upscale_factor")
    if r is None:
        return no_rule(ctx, node)
    sp = ctx.spaces(node.args[0])
    shape = ctx.shape(node.args[0]) or ()
    cd = len(shape) - 3  # (..., C, H, W): any number of batch dims
    pin_positions(ctx, sp, cd, "a pixel shuffle")
    out = {d: lay for d, lay in sp.items() if d < cd}
    if cd in sp:
        block = ctx.atoms.unchunk(sp[cd], r**2)
        if block is None:
            ctx.pin(sp[cd], "pixel shuffle blocks straddle channel groups")
        else:
            out[cd] = block
    return out


def pixel_unshuffle(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.PixelUnshuffle(r)``/``F.pixel_unshuffle``: each input channel becomes ``r*r`` consecutive output
    channels."""
    r = _factor(ctx, node, "downscale_factor")
    if r is None:
        return no_rule(ctx, node)
    sp = ctx.spaces(node.args[0])
    shape = ctx.shape(node.args[0]) or ()
    cd = len(shape) - 3
    pin_positions(ctx, sp, cd, "a pixel unshuffle")
    out = {d: lay for d, lay in sp.items() if d < cd}
    if cd in sp:
        out[cd] = _scale_inner(ctx, sp[cd], r**2)
    return out


def channel_shuffle(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``nn.ChannelShuffle(g)``/``F.channel_shuffle``: the ``g`` groups must keep the same channels; output
    interleaves them."""
    groups = _factor(ctx, node, "groups")
    if groups is None:
        return no_rule(ctx, node)
    sp = dict(ctx.spaces(node.args[0]))
    if 1 in sp:
        parts = ctx.atoms.chunks(sp[1], groups)
        merged = ctx.unify(parts, "channel shuffle groups do not line up") if parts else None
        if merged is None:
            ctx.pin(sp.pop(1), "channel shuffle groups do not line up")
        else:
            # output position k * groups + g is channel k of group g: each of the (equal) groups' channels
            # appears ``groups`` times in a row
            sp[1] = _scale_inner(ctx, merged, groups)
    return sp


def multihead_attention(ctx: RuleContext, node: fx.Node) -> Any:
    """``nn.MultiheadAttention`` (packed q/k/v): the head dim is one group shared by every head.

    The embedding dim seen outside equals heads x head dim, so the residual stream is unified with
    the head dim repeated per head and widths stay divisible by the head count. Surgery rescales the
    query projection so the softmax temperature of the original head dim is kept.
    """
    m = ctx.module()
    assert isinstance(m, nn.MultiheadAttention)
    args = [*node.args, *(node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs)]
    q, k, v = args[:3]
    # separate q/k/v weights (kdim or vdim given) and masked calls are left to no_rule, which pins
    if not m._qkv_same_embed_dim or any(node.kwargs.get(n) is not None for n in ("attn_mask", "key_padding_mask")):
        return no_rule(ctx, node)
    sq, sk = ctx.shape(q), ctx.shape(k)
    if sq is None or sk is None:
        return no_rule(ctx, node)
    head = ctx.fresh(m.head_dim)
    embed = _repeat(head, m.num_heads)
    ctx.no_grow(head, "new query and key dims would change the attention logits")
    for t in {q, k, v}:  # a set: self-attention passes one node three times
        sp = ctx.spaces(t)
        for d in range(len(sq) - 1):
            if d in sp:
                ctx.pin(sp[d], "attention over a channel dim")
        lay = sp.get(len(sq) - 1)
        if lay is None or not ctx.atoms.unify(lay, embed):
            ctx.pin(embed, "multi-head attention input of fixed width")
            if lay is not None:
                ctx.pin(lay, "multi-head attention input of fixed width")
    # the packed projection's rows are [q; k; v], each one embed wide
    ctx.bind(_path(ctx, "in_proj_weight"), 0, embed * 3, Role.OUT)
    ctx.bind(_path(ctx, "in_proj_weight"), 1, embed, Role.IN)
    _bind(ctx, ("in_proj_bias",), 0, embed * 3, Role.OUT)
    _bind(ctx, ("bias_k", "bias_v"), 2, embed, Role.OUT)  # shaped (1, 1, embed)
    ctx.bind(_path(ctx, "out_proj.weight"), 0, embed, Role.OUT)
    ctx.bind(_path(ctx, "out_proj.weight"), 1, embed, Role.IN)
    if m.out_proj.bias is not None:
        ctx.bind(_path(ctx, "out_proj.bias"), 0, embed, Role.OUT)
    for name in ("embed_dim", "kdim", "vdim", "out_proj.in_features", "out_proj.out_features"):
        _attr(ctx, name, embed)
    _attr(ctx, "head_dim", head)
    packed = [_path(ctx, "in_proj_weight"), _path(ctx, "in_proj_bias")]
    rescale_query(ctx, packed, head, m.head_dim)
    _attention_cost(ctx, m, sq, sk, head)
    return ({len(sq) - 1: embed}, None)  # (output, attention weights): the weights carry no channels


def _attention_cost(
    ctx: RuleContext, m: nn.MultiheadAttention, sq: tuple[int, ...], sk: tuple[int, ...], head: Layout
) -> None:
    """FLOPs of the unfused path (the one fxmorph counts, :mod:`fxmorph.capture.flops`)."""
    tokens_q, tokens_k = math.prod(sq[:-1]), math.prod(sk[:-1])
    embed = head * m.num_heads
    for tokens in (tokens_q, tokens_k, tokens_k):  # q, k and v projections
        ctx.cost(2 * tokens, embed, embed, kernel=gemm_kernel(tokens), axes=(embed, embed))
    batch = tokens_q // sq[1 if m.batch_first else 0] if len(sq) == 3 else 1  # an unbatched (L, E) has one
    length_q, length_k = sq[1 if m.batch_first else 0], sk[1 if m.batch_first else 0]
    ctx.cost(4 * batch * m.num_heads * length_q * length_k, head)  # q k^T and attn v
    ctx.cost(2 * tokens_q, embed, embed, kernel=gemm_kernel(tokens_q), axes=(embed, embed))  # output projection


def rescale_query(ctx: RuleContext, paths: list[str], head: Layout, old_head: int) -> None:
    """Record the fix-up that scales the query rows of packed q/k/v projections (the first third of each
    tensor in ``paths``) by ``sqrt(new head dim / old_head)``, so the softmax keeps the temperature of the
    original head dim after it changed. Analysis only describes it; surgery multiplies the rows."""
    ctx.rewrite(ScaleRows(tuple(paths)), lambda measure: math.sqrt(measure(head) / old_head))
