"""The op table: for every supported module type, function and Tensor method, one :class:`OpFacts`.

Each entry holds the channel rule (how the op moves channels) and what the passes and surgery ask of
the op: its kind, whether ``f(0) = 0`` and the slope there, whether pooling keeps a constant, the
default value of a new channel of each parameter. Rules, remove-dead, growth and surgery's defaults
all read this one table.

Module types are matched through the class hierarchy (MRO), everywhere. A subclass shares its base's
rule and behaviour only if it also keeps the base's ``forward``; one with its own ``forward`` (timm's
``BatchNormAct2d``) gets no rule (its channels are pinned, or it is traced through) but its parameters
keep their meaning, so a new channel of its ``weight`` still starts at 1. Anything missing has
:func:`~fxmorph.analysis.rules.compute.no_rule`, which pins every group the op touches and names it.
ATen overloads (``torch.ops.aten.relu.default``, what ``torch.export`` writes) are read as the torch calls of
this table when a graph is captured (:data:`fxmorph.capture.aten.ALIASES`): one vocabulary, one set of rules.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxmorph.analysis.context import RuleContext
from fxmorph.analysis.facts import Call, OpFacts, OpKind, Rule, ShapeAttr, number
from fxmorph.analysis.rules import compute as rc
from fxmorph.analysis.rules import functional as rf
from fxmorph.analysis.rules import modules as rm
from fxmorph.analysis.rules import shape as rs
from fxmorph.analysis.rules.einsum import einsum
from fxmorph.analysis.rules.grouped_conv import any_conv
from fxmorph.analysis.rules.torchvision import TORCHVISION_RULES

__all__ = [
    "FUNCTION_OPS",
    "METHOD_OPS",
    "MODULE_OPS",
    "Call",
    "OpFacts",
    "OpKind",
    "Rule",
    "function_facts",
    "lookup",
    "method_facts",
    "module_facts",
    "node_facts",
]

# New channels of a norm: scale 1 and shift 0 (the identity map of a fresh layer), running statistics of
# a standard normal (a zero variance would divide by sqrt(eps)).
_STATS = (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))
_AFFINE = (("weight", 1.0), ("bias", 0.0))
# The attributes that state tensor sizes (write-back sets them on a subclass whose forward is traced through)
_NUM_FEATURES = (ShapeAttr("num_features", ("weight", "running_mean"), 0),)
_LINEAR_SIZES = (ShapeAttr("out_features", ("weight",), 0), ShapeAttr("in_features", ("weight",), 1))


def _depthwise(m: nn.Module) -> bool:
    """A depthwise convolution (one input channel per group; its group count is its input width)."""
    return m.groups > 1 and m.groups == m.in_channels


def _conv_groups(m: nn.Module) -> int:
    """A convolution's group count as its weight states it: a depthwise one has one group per input channel,
    another keeps its count."""
    if not _depthwise(m):
        return m.groups
    rows = int(m.weight.shape[0])
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return rows  # weight [in, out/groups, k]: one group per input channel
    return rows // (m.out_channels // m.groups)  # weight [out, 1, k]: out/groups outputs per group


# A convolution's sizes, restated in this order from its weight: the group count first (the others read it)
_CONV_SIZES = (
    ShapeAttr("groups", derive=_conv_groups),
    ShapeAttr("in_channels", derive=lambda m: int(m.weight.shape[1]) * m.groups),
    ShapeAttr("out_channels", ("weight",), 0),
)
_CONV_T_SIZES = (
    ShapeAttr("groups", derive=_conv_groups),
    ShapeAttr("in_channels", ("weight",), 0),
    ShapeAttr("out_channels", derive=lambda m: int(m.weight.shape[1]) * m.groups),
)
_SELU_SLOPE = 1.0507009873554805 * 1.6732632423543772  # scale * alpha: autograd's slope at 0 (the x <= 0 side)
_MISH_SLOPE = 0.6  # tanh(softplus(0)) = tanh(ln 2) = 3/5
_ERF_SLOPE = 2 / math.sqrt(math.pi)


# -- builders and specialisers -------------------------------------------------------------------------
def _act(rule: Rule = rc.passthrough, slope: float | None = None, *, zero: bool = True, **more: Any) -> OpFacts:
    """A nonlinear elementwise activation; ``zero``: ``f(0) = 0``; ``slope``: autograd's ``f'(0)``."""
    return OpFacts(rule, OpKind.ACTIVATION, zero_preserving=zero, slope_at_zero=slope, **more)


def _pointwise(rule: Rule = rc.elementwise, slope: float | None = None, *, zero: bool = True, **more: Any) -> OpFacts:
    """Another elementwise op (arithmetic: ``zero`` means every operand zero gives zero)."""
    return OpFacts(rule, OpKind.POINTWISE, zero_preserving=zero, slope_at_zero=slope, **more)


def _pool(rule: Rule, keeps: bool = False, slope: float | None = 1.0, **more: Any) -> OpFacts:
    """Pooling, padding, interpolation, reductions: zero stays zero; ``keeps``: so does any constant."""
    return OpFacts(rule, OpKind.POOL, zero_preserving=True, slope_at_zero=slope, keeps_constant=keeps, **more)


def _move(rule: Rule) -> OpFacts:
    """Data movement: values are only rearranged, so zero stays zero and the slope is 1."""
    return OpFacts(rule, OpKind.MOVE, zero_preserving=True, slope_at_zero=1.0)


def _leaky(facts: OpFacts, call: Call) -> OpFacts:
    """Autograd takes the ``x <= 0`` side at 0: the slope is ``negative_slope`` (PyTorch's default 0.01)."""
    return facts.replace(slope_at_zero=number(call.arg("negative_slope", 1, 0.01)))


def _elu(facts: OpFacts, call: Call) -> OpFacts:
    """``alpha * (exp(x) - 1)`` below 0, whose slope autograd uses at 0: ``alpha``."""
    return facts.replace(slope_at_zero=number(call.arg("alpha", 1, 1.0)))


def _rrelu(facts: OpFacts, call: Call) -> OpFacts:
    """Out of training, ``rrelu`` is a leaky ReLU of slope ``(lower + upper) / 2``."""
    lower, upper = number(call.arg("lower", 1, 1 / 8)), number(call.arg("upper", 2, 1 / 3))
    return facts.replace(slope_at_zero=None if lower is None or upper is None else (lower + upper) / 2)


def _hardtanh(facts: OpFacts, call: Call) -> OpFacts:
    """``clamp(x, min_val, max_val)``: autograd passes the gradient only strictly inside the bounds."""
    lo, hi = number(call.arg("min_val", 1, -1.0)), number(call.arg("max_val", 2, 1.0))
    if lo is None or hi is None:  # bounds computed in the graph: nothing is known
        return facts.replace(zero_preserving=False, slope_at_zero=None)
    return facts.replace(zero_preserving=lo <= 0 <= hi, slope_at_zero=1.0 if lo < 0 < hi else 0.0)


def _threshold(facts: OpFacts, call: Call) -> OpFacts:
    """``x if x > threshold else value``."""
    limit, value = number(call.arg("threshold", 1, None)), number(call.arg("value", 2, None))
    if limit is None or value is None:
        return facts.replace(zero_preserving=False, slope_at_zero=None)
    # 0 passes through only if it lies above the threshold; otherwise it becomes ``value``
    return facts.replace(zero_preserving=limit < 0 or value == 0, slope_at_zero=1.0 if limit < 0 else 0.0)


def _prelu(facts: OpFacts, call: Call) -> OpFacts:
    """Autograd's slope at 0 is the learned slope itself (the ``x <= 0`` side): the smallest in magnitude."""
    weight = getattr(call.module, "weight", None)
    # a meta or empty weight has no value to read: the entry's unknown slope stands
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return facts
    # one fact for every channel: the weakest slope, so a zero slope anywhere is seen
    return facts.replace(slope_at_zero=float(weight.detach().abs().min()))


def _pad(facts: OpFacts, call: Call) -> OpFacts:
    """``F.pad`` with a nonzero constant fill does not keep zeros."""
    mode, value = call.arg("mode", 2, "constant"), call.arg("value", 3, None)
    # reflect, replicate and circular copy existing values; a constant fill of None means 0
    return facts.replace(zero_preserving=mode != "constant" or value in (None, 0, 0.0))


def _nearest(facts: OpFacts, call: Call) -> OpFacts:
    """Nearest upsampling repeats values, so a constant channel stays that constant."""
    return facts.replace(keeps_constant=call.arg("mode", 1, "nearest") == "nearest")


def _shape_only(ctx: RuleContext, node: fx.Node) -> None:
    """``x.dim()``: a number that no width changes."""
    return None


def _inplace_by_name(table: dict[Any, OpFacts]) -> None:
    """Mark the ops PyTorch names in place (``relu_``, ``torch.sigmoid_``, ``x.add_``)."""
    for key, facts in table.items():
        name = key if isinstance(key, str) else getattr(key, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # ``relu_`` is in place; dunders such as ``__add__`` are not
            table[key] = facts.replace(inplace=True)


# -- modules -------------------------------------------------------------------------------------------
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

MODULE_OPS: dict[type[nn.Module], OpFacts] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), OpFacts(rm.conv, OpKind.LAYER, shape_attrs=_CONV_SIZES)),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
                    OpFacts(rm.conv_transpose, OpKind.LAYER, shape_attrs=_CONV_T_SIZES)),
    nn.Linear: OpFacts(rm.linear, OpKind.LAYER, shape_attrs=_LINEAR_SIZES),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
                    OpFacts(rm.batch_norm, OpKind.BATCH_NORM, new_channel=_STATS, shape_attrs=_NUM_FEATURES)),
    **dict.fromkeys((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
                    OpFacts(rm.batch_norm, OpKind.NORM, new_channel=_STATS, shape_attrs=_NUM_FEATURES)),
    **dict.fromkeys((nn.LayerNorm, nn.RMSNorm), OpFacts(rm.layer_norm, OpKind.NORM, new_channel=_AFFINE,
                    shape_attrs=(ShapeAttr("normalized_shape", ("weight",), None),))),
    nn.GroupNorm: OpFacts(rm.group_norm, OpKind.NORM, new_channel=_AFFINE,
                          shape_attrs=(ShapeAttr("num_channels", ("weight",), 0),)),
    nn.PReLU: _act(rm.prelu, specialise=_prelu),
    nn.Embedding: OpFacts(rm.embedding, shape_attrs=(ShapeAttr("embedding_dim", ("weight",), 1),)),
    nn.MultiheadAttention: OpFacts(rm.multihead_attention),
    nn.PixelShuffle: OpFacts(rm.pixel_shuffle), nn.PixelUnshuffle: OpFacts(rm.pixel_unshuffle),
    nn.ChannelShuffle: OpFacts(rm.channel_shuffle),
    nn.Flatten: _move(rs.flatten_module),
    nn.MaxPool1d: _pool(rc.spatial(1), keeps=True), nn.MaxPool2d: _pool(rc.spatial(2), keeps=True),
    nn.MaxPool3d: _pool(rc.spatial(3), keeps=True),
    nn.AvgPool1d: _pool(rc.spatial(1)), nn.AvgPool2d: _pool(rc.spatial(2)), nn.AvgPool3d: _pool(rc.spatial(3)),
    nn.AdaptiveAvgPool1d: _pool(rc.spatial(1), keeps=True), nn.AdaptiveAvgPool2d: _pool(rc.spatial(2), keeps=True),
    nn.AdaptiveAvgPool3d: _pool(rc.spatial(3), keeps=True), nn.AdaptiveMaxPool1d: _pool(rc.spatial(1), keeps=True),
    nn.AdaptiveMaxPool2d: _pool(rc.spatial(2), keeps=True), nn.AdaptiveMaxPool3d: _pool(rc.spatial(3), keeps=True),
    nn.Upsample: _pool(rc.spatial(None), specialise=_nearest),
    nn.UpsamplingNearest2d: _pool(rc.spatial(2), specialise=_nearest),
    nn.UpsamplingBilinear2d: _pool(rc.spatial(2), specialise=_nearest),
    nn.ZeroPad2d: _pool(rc.spatial(2)),
    nn.ReflectionPad2d: _pool(rc.spatial(2), keeps=True), nn.ReplicationPad2d: _pool(rc.spatial(2), keeps=True),
    **dict.fromkeys((nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d), OpFacts(rf.module_softmax)),
    # Activation slopes are autograd's derivative at exactly 0: 1/2 for SiLU and Softplus (sigmoid(0)),
    # LogSigmoid (1 - sigmoid(0)), GELU (Phi(0)) and Hardswish ((2x + 3) / 6); 1/4 for Sigmoid; 0 for the
    # ops flat at 0 (ReLU, the shrinks). ``zero=False``: f(0) != 0 (sigmoid(0) = 1/2, softplus(0) = ln 2).
    nn.ReLU: _act(slope=0.0), nn.ReLU6: _act(slope=0.0), nn.GELU: _act(slope=0.5), nn.SiLU: _act(slope=0.5),
    nn.Sigmoid: _act(slope=0.25, zero=False), nn.Tanh: _act(slope=1.0), nn.Hardswish: _act(slope=0.5),
    nn.Hardsigmoid: _act(slope=1 / 6, zero=False), nn.Hardtanh: _act(specialise=_hardtanh),
    nn.LeakyReLU: _act(specialise=_leaky), nn.ELU: _act(specialise=_elu), nn.CELU: _act(slope=1.0),
    nn.SELU: _act(slope=_SELU_SLOPE), nn.Mish: _act(slope=_MISH_SLOPE), nn.Softplus: _act(slope=0.5, zero=False),
    nn.Softsign: _act(slope=1.0), nn.Tanhshrink: _act(slope=0.0), nn.LogSigmoid: _act(slope=0.5, zero=False),
    nn.Hardshrink: _act(slope=0.0), nn.Softshrink: _act(slope=0.0), nn.Threshold: _act(specialise=_threshold),
    nn.RReLU: _act(specialise=_rrelu),
    nn.Identity: _pointwise(rc.passthrough, 1.0),
    **dict.fromkeys(_DROPOUT_MODULES, _pointwise(rc.passthrough, 1.0, identity_in_eval=True)),
}  # fmt: skip
"""Facts by module type; see :func:`module_facts` for how subclasses match."""

# -- functions -----------------------------------------------------------------------------------------
_ADD = _pointwise(slope=1.0)
_MUL = _pointwise(slope=1.0, zero_absorbing=True)  # the slope is the other operand's value: taken as nonzero
_NOT_ZERO = _pointwise(zero=False)  # 0/0, 0**0, 0 == 0, exp(0), clamp to unknown bounds ...
# the training flag's position: F.dropout(input, p, training), F.rrelu(input, lower, upper, training)
_DROPOUT = _pointwise(slope=1.0, train_flag=2, identity_in_eval=True)
_RRELU = _act(rc.elementwise, train_flag=3, specialise=_rrelu)
_RELU, _TANH = _act(rc.elementwise, 0.0), _act(rc.elementwise, 1.0)
_SIGMOID = _act(rc.elementwise, 0.25, zero=False)
_SELU, _CELU = _act(rc.elementwise, _SELU_SLOPE), _act(rc.elementwise, 1.0)
_SHRINK = _act(rc.elementwise, 0.0)  # hardshrink, softshrink, tanhshrink: flat at 0
_BATCH_NORM = OpFacts(rf.batch_norm, OpKind.BATCH_NORM, new_channel=_STATS)

FUNCTION_OPS: dict[Any, OpFacts] = {
    **dict.fromkeys((operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub), _ADD),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul), _MUL),
    **dict.fromkeys((operator.neg, torch.neg), _pointwise(slope=-1.0)),
    **dict.fromkeys((operator.truediv, operator.itruediv, operator.floordiv, operator.mod, operator.pow, torch.div,
                     torch.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                     torch.where, torch.exp, torch.rsqrt, torch.log, torch.reciprocal, torch.clamp, torch.clip,
                     torch.clamp_min, torch.clamp_max), _NOT_ZERO),
    **dict.fromkeys((torch.maximum, torch.minimum), _pointwise()),  # at a tie autograd splits the gradient
    torch.abs: _pointwise(slope=0.0), torch.square: _pointwise(slope=0.0), torch.sqrt: _pointwise(),
    torch.erf: _pointwise(slope=_ERF_SLOPE), torch.addcmul: _pointwise(),
    **dict.fromkeys((torch.sigmoid, F.sigmoid, torch.sigmoid_), _SIGMOID),
    **dict.fromkeys((torch.tanh, F.tanh, torch.tanh_), _TANH),
    **dict.fromkeys((torch.relu, F.relu, F.relu_, torch.relu_, F.relu6), _RELU),
    F.gelu: _act(rc.elementwise, 0.5), F.silu: _act(rc.elementwise, 0.5), F.hardswish: _act(rc.elementwise, 0.5),
    F.hardsigmoid: _act(rc.elementwise, 1 / 6, zero=False),
    **dict.fromkeys((F.hardtanh, F.hardtanh_), _act(rc.elementwise, specialise=_hardtanh)),
    **dict.fromkeys((F.leaky_relu, F.leaky_relu_), _act(rc.elementwise, specialise=_leaky)),
    **dict.fromkeys((F.elu, F.elu_), _act(rc.elementwise, specialise=_elu)),
    **dict.fromkeys((F.selu, torch.selu, torch.selu_), _SELU),
    **dict.fromkeys((F.celu, torch.celu, torch.celu_), _CELU),
    F.mish: _act(rc.elementwise, _MISH_SLOPE), F.softplus: _act(rc.elementwise, 0.5, zero=False),
    F.softsign: _act(rc.elementwise, 1.0), F.logsigmoid: _act(rc.elementwise, 0.5, zero=False),
    **dict.fromkeys((F.hardshrink, F.softshrink, F.tanhshrink), _SHRINK),
    **dict.fromkeys((F.threshold, F.threshold_, torch.threshold), _act(rc.elementwise, specialise=_threshold)),
    **dict.fromkeys((F.rrelu, F.rrelu_, torch.rrelu), _RRELU),
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                     torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout), _DROPOUT),
    torch.prelu: _act(rf.prelu),  # F.prelu is torch.prelu; its slopes are graph values, not known here
    operator.getitem: _move(rs.getitem), torch.index_select: _move(rs.index_select),
    **dict.fromkeys((torch.flatten, torch.reshape), _move(rs.reshape)),
    torch.permute: _move(rs.permute), **dict.fromkeys((torch.transpose, torch.swapaxes), _move(rs.transpose)),
    torch.unsqueeze: _move(rs.unsqueeze), torch.squeeze: _move(rs.squeeze),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), _move(rs.cat)),
    torch.split: _move(rs.split), torch.chunk: _move(rs.chunk), torch.unbind: _move(rs.unbind),
    torch.tensor_split: _move(rs.tensor_split), torch.repeat_interleave: _move(rs.repeat_interleave),
    getattr: OpFacts(rs.getattr_rule, OpKind.SHAPE),
    **dict.fromkeys((operator.matmul, torch.matmul, torch.bmm), OpFacts(rc.matmul)),
    F.scaled_dot_product_attention: OpFacts(rc.sdpa), torch.einsum: OpFacts(einsum),
    **dict.fromkeys((torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, F.softmin), OpFacts(rc.softmax)),
    torch.mean: _pool(rc.reduce, keeps=True), torch.amax: _pool(rc.reduce, keeps=True), torch.sum: _pool(rc.reduce),
    F.adaptive_avg_pool1d: _pool(rc.spatial(1), keeps=True), F.adaptive_avg_pool2d: _pool(rc.spatial(2), keeps=True),
    F.adaptive_avg_pool3d: _pool(rc.spatial(3), keeps=True), F.adaptive_max_pool1d: _pool(rc.spatial(1), keeps=True),
    F.adaptive_max_pool2d: _pool(rc.spatial(2), keeps=True), F.adaptive_max_pool3d: _pool(rc.spatial(3), keeps=True),
    F.max_pool1d: _pool(rc.spatial(1), keeps=True), F.max_pool2d: _pool(rc.spatial(2), keeps=True),
    F.max_pool3d: _pool(rc.spatial(3), keeps=True),
    F.avg_pool1d: _pool(rc.spatial(1)), F.avg_pool2d: _pool(rc.spatial(2)), F.avg_pool3d: _pool(rc.spatial(3)),
    # lp pooling of zeros has an infinite slope (the p-th root at 0)
    F.lp_pool1d: _pool(rc.spatial(1), slope=None), F.lp_pool2d: _pool(rc.spatial(2), slope=None),
    **dict.fromkeys((F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), _pool(rc.spatial(None))),
    F.pad: _pool(rc.spatial(None), specialise=_pad),
    F.linear: OpFacts(rc.functional_linear, OpKind.LAYER),
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), OpFacts(any_conv, OpKind.LAYER)),
    F.pixel_shuffle: OpFacts(rm.pixel_shuffle), F.pixel_unshuffle: OpFacts(rm.pixel_unshuffle),
    **dict.fromkeys((F.channel_shuffle, torch.native_channel_shuffle), OpFacts(rm.channel_shuffle)),
    **dict.fromkeys((F.batch_norm, torch.batch_norm), _BATCH_NORM),
    **dict.fromkeys((F.instance_norm, torch.instance_norm), OpFacts(rf.batch_norm, OpKind.NORM, new_channel=_STATS)),
    **dict.fromkeys((F.group_norm, torch.group_norm), OpFacts(rf.group_norm, OpKind.NORM, new_channel=_AFFINE)),
    **dict.fromkeys((F.layer_norm, torch.layer_norm), OpFacts(rf.layer_norm, OpKind.NORM, new_channel=_AFFINE)),
    **dict.fromkeys((F.rms_norm, torch.rms_norm), OpFacts(rf.layer_norm, OpKind.NORM, new_channel=_AFFINE[:1])),
    **dict.fromkeys((F.embedding, torch.embedding), OpFacts(rf.embedding)),
    F.glu: OpFacts(rf.glu), F.normalize: OpFacts(rf.normalize),
}  # fmt: skip
"""Facts by function (``F.*``, ``torch.*``, ``operator.*``, torchvision's functional layers)."""


def _torchvision_ops() -> dict[Any, OpFacts]:
    """torchvision's and MViT's functions (their rules exist only where torchvision imports)."""
    out = {fn: OpFacts(rule) for fn, rule in TORCHVISION_RULES.items()}
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return out
    # stochastic_depth(input, p, mode, training): drops whole rows when training, the identity otherwise
    out[stochastic_depth] = _pointwise(rc.passthrough, 1.0, train_flag=3, identity_in_eval=True)
    return out


FUNCTION_OPS.update(_torchvision_ops())

# -- Tensor methods ------------------------------------------------------------------------------------
METHOD_OPS: dict[str, OpFacts] = {
    **dict.fromkeys(("add", "sub", "add_", "sub_"), _ADD), **dict.fromkeys(("mul", "mul_"), _MUL),
    **dict.fromkeys(("neg", "neg_"), _pointwise(slope=-1.0)), **dict.fromkeys(("abs", "abs_"), _pointwise(slope=0.0)),
    **dict.fromkeys(("div", "div_", "exp", "exp_", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "pow",
                     "rsqrt", "log", "reciprocal"), _NOT_ZERO),
    "sqrt": _pointwise(), "square": _pointwise(slope=0.0), "erf": _pointwise(slope=_ERF_SLOPE),
    **dict.fromkeys(("addcmul", "addcmul_"), _pointwise()),
    **dict.fromkeys(("sigmoid", "sigmoid_"), _SIGMOID), **dict.fromkeys(("tanh", "tanh_"), _TANH),
    **dict.fromkeys(("relu", "relu_"), _RELU), "hardshrink": _SHRINK,
    "prelu": _act(rf.prelu),
    **dict.fromkeys(("contiguous", "clone", "float", "double", "half", "to", "type_as"),
                    _pointwise(rc.passthrough, 1.0)),
    "detach": _pointwise(rc.passthrough, 0.0),  # the identity, but no gradient flows through it
    **{name: _move(getattr(rs, name)) for name in ("index_select", "permute", "transpose", "unsqueeze", "squeeze",
                                                   "expand", "split", "chunk", "unbind", "tensor_split",
                                                   "repeat_interleave")},
    **dict.fromkeys(("view", "reshape", "flatten"), _move(rs.reshape)), "swapaxes": _move(rs.transpose),
    "reshape_as": OpFacts(rf.reshape_as), "view_as": OpFacts(rf.reshape_as),
    "size": OpFacts(rs.size, OpKind.SHAPE), "dim": OpFacts(_shape_only, OpKind.SHAPE),
    **dict.fromkeys(("matmul", "bmm"), OpFacts(rc.matmul)),
    **dict.fromkeys(("softmax", "log_softmax"), OpFacts(rc.softmax)),
    **dict.fromkeys(("mean", "amax"), _pool(rc.reduce, keeps=True)), "sum": _pool(rc.reduce),
}  # fmt: skip
"""Facts by Tensor method name (``x.relu()``)."""

_inplace_by_name(FUNCTION_OPS)
_inplace_by_name(METHOD_OPS)
# the in-place operators' names (``iadd``) have no trailing underscore for _inplace_by_name to see
for _op in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
    FUNCTION_OPS[_op] = FUNCTION_OPS[_op].replace(inplace=True)

_SPECIAL: dict[str, OpFacts] = {
    "placeholder": OpFacts(rc.placeholder), "output": OpFacts(rc.output), "get_attr": OpFacts(rc.attribute),
}  # fmt: skip
_UNKNOWN = OpFacts(rc.no_rule)


# -- lookup --------------------------------------------------------------------------------------------
def module_facts(kind: type[nn.Module]) -> OpFacts | None:
    """The facts of module type ``kind``, matched through its MRO; None if no base is in the table.

    The first base in the table whose ``forward`` ``kind`` keeps gives everything. A type that
    overrides ``forward`` gets no rule and no behaviour (:func:`~fxmorph.analysis.rules.compute.no_rule`,
    kind OTHER) but keeps its nearest tabled base's parameter meaning (``new_channel``, ``shape_attrs``).
    """
    nearest: OpFacts | None = None
    for cls in kind.__mro__:
        facts = MODULE_OPS.get(cls)
        if facts is None:
            continue
        # NOTE: a subclass only shares its base's rule if it also keeps the base's forward.
        if getattr(kind, "forward", None) is getattr(cls, "forward", None):
            return facts
        nearest = nearest or facts  # the MRO lists the nearest base first
    if nearest is None:
        return None
    return OpFacts(rc.no_rule, new_channel=nearest.new_channel, shape_attrs=nearest.shape_attrs)


def function_facts(target: Any) -> OpFacts | None:
    """The facts of a function (``F.relu``, ``operator.add``); None if it is not in the table."""
    try:
        return FUNCTION_OPS.get(target)
    except TypeError:  # an unhashable target
        return None


def method_facts(name: str) -> OpFacts | None:
    """The facts of a Tensor method by name (``"relu"``); None if it is not in the table."""
    return METHOD_OPS.get(name)


def _entry(node: fx.Node, root: nn.Module) -> tuple[OpFacts, Call]:
    """The table's facts for ``node`` (not yet specialised) and the call they are specialised for."""
    if node.op in _SPECIAL:
        return _SPECIAL[node.op], Call()
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return module_facts(type(module)) or _UNKNOWN, Call(module=module)
    found = method_facts(str(node.target)) if node.op == "call_method" else function_facts(node.target)
    return found or _UNKNOWN, Call(args=tuple(node.args), kwargs=dict(node.kwargs))


def node_facts(node: fx.Node, root: nn.Module) -> OpFacts:
    """The facts of the op ``node`` calls in ``root``, refined for this call (a LeakyReLU's own slope).

    An op the table does not know gets :func:`~fxmorph.analysis.rules.compute.no_rule` and kind OTHER.
    """
    facts, call = _entry(node, root)
    return facts.at(call)


def lookup(node: fx.Node, root: nn.Module) -> Rule:
    """The channel rule for ``node``; :func:`~fxmorph.analysis.rules.compute.no_rule` when the op is not in
    the table."""
    return _entry(node, root)[0].rule
