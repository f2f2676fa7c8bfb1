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
from torch.nn.utils import parametrize

from fxmorph.analysis.facts import Call, OpFacts, OpKind, Rule, ShapeAttr
from fxmorph.analysis.op_builders import (
    act,
    elu,
    hardtanh,
    inplace_by_name,
    leaky,
    move,
    nearest,
    pad,
    pointwise,
    pool,
    prelu,
    rrelu,
    shape_only,
    threshold,
    view,
)
from fxmorph.analysis.rules import compute as rc
from fxmorph.analysis.rules import functional as rf
from fxmorph.analysis.rules import modules as rm
from fxmorph.analysis.rules import parametrized as rp
from fxmorph.analysis.rules import shape as rs
from fxmorph.analysis.rules.addmm import addmm
from fxmorph.analysis.rules.attention import sdpa
from fxmorph.analysis.rules.einsum import einsum
from fxmorph.analysis.rules.grouped_conv import any_conv
from fxmorph.analysis.rules.torchvision import TORCHVISION_RULES

__all__ = [
    "FUNCTION_OPS",
    "METHOD_OPS",
    "MODULES_BY_NAME",
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


# -- modules -------------------------------------------------------------------------------------------
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

MODULE_OPS: dict[type[nn.Module], OpFacts] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), OpFacts(rm.conv, OpKind.LAYER, shape_attrs=_CONV_SIZES)),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
                    OpFacts(rm.conv_transpose, OpKind.LAYER, shape_attrs=_CONV_T_SIZES)),
    nn.Linear: OpFacts(rm.linear, OpKind.LAYER, shape_attrs=_LINEAR_SIZES),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
                    OpFacts(rm.batch_norm, OpKind.BATCH_NORM, new_channel=_STATS, shape_attrs=_NUM_FEATURES,
                            fuses=True)),
    **dict.fromkeys((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
                    OpFacts(rm.batch_norm, OpKind.NORM, new_channel=_STATS, shape_attrs=_NUM_FEATURES)),
    **dict.fromkeys((nn.LayerNorm, nn.RMSNorm), OpFacts(rm.layer_norm, OpKind.NORM, new_channel=_AFFINE,
                    shape_attrs=(ShapeAttr("normalized_shape", ("weight",), None),))),
    nn.GroupNorm: OpFacts(rm.group_norm, OpKind.NORM, new_channel=_AFFINE,
                          shape_attrs=(ShapeAttr("num_channels", ("weight",), 0),)),
    nn.PReLU: act(rm.prelu, specialise=prelu),
    nn.Embedding: OpFacts(rm.embedding, shape_attrs=(ShapeAttr("embedding_dim", ("weight",), 1),)),
    nn.MultiheadAttention: OpFacts(rm.multihead_attention),
    nn.PixelShuffle: OpFacts(rm.pixel_shuffle), nn.PixelUnshuffle: OpFacts(rm.pixel_unshuffle),
    nn.ChannelShuffle: OpFacts(rm.channel_shuffle),
    nn.Flatten: view(rs.flatten_module),
    nn.MaxPool1d: pool(rc.spatial(1), keeps=True), nn.MaxPool2d: pool(rc.spatial(2), keeps=True),
    nn.MaxPool3d: pool(rc.spatial(3), keeps=True),
    nn.AvgPool1d: pool(rc.spatial(1)), nn.AvgPool2d: pool(rc.spatial(2)), nn.AvgPool3d: pool(rc.spatial(3)),
    nn.AdaptiveAvgPool1d: pool(rc.spatial(1), keeps=True), nn.AdaptiveAvgPool2d: pool(rc.spatial(2), keeps=True),
    nn.AdaptiveAvgPool3d: pool(rc.spatial(3), keeps=True), nn.AdaptiveMaxPool1d: pool(rc.spatial(1), keeps=True),
    nn.AdaptiveMaxPool2d: pool(rc.spatial(2), keeps=True), nn.AdaptiveMaxPool3d: pool(rc.spatial(3), keeps=True),
    nn.Upsample: pool(rc.spatial(None), specialise=nearest),
    nn.UpsamplingNearest2d: pool(rc.spatial(2), specialise=nearest),
    nn.UpsamplingBilinear2d: pool(rc.spatial(2), specialise=nearest),
    nn.ZeroPad2d: pool(rc.spatial(2)),
    nn.ReflectionPad2d: pool(rc.spatial(2), keeps=True), nn.ReplicationPad2d: pool(rc.spatial(2), keeps=True),
    **dict.fromkeys((nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d), OpFacts(rf.module_softmax)),
    # Activation slopes are autograd's derivative at exactly 0: 1/2 for SiLU and Softplus (sigmoid(0)),
    # LogSigmoid (1 - sigmoid(0)), GELU (Phi(0)) and Hardswish ((2x + 3) / 6); 1/4 for Sigmoid; 0 for the
    # ops flat at 0 (ReLU, the shrinks). ``zero=False``: f(0) != 0 (sigmoid(0) = 1/2, softplus(0) = ln 2).
    nn.ReLU: act(slope=0.0, fuses=True), nn.ReLU6: act(slope=0.0, fuses=True),
    nn.GELU: act(slope=0.5), nn.SiLU: act(slope=0.5), nn.Hardswish: act(slope=0.5),
    nn.Sigmoid: act(slope=0.25, zero=False, fuses=True), nn.Tanh: act(slope=1.0, fuses=True),
    nn.Hardsigmoid: act(slope=1 / 6, zero=False, fuses=True), nn.Hardtanh: act(specialise=hardtanh, fuses=True),
    nn.LeakyReLU: act(specialise=leaky, fuses=True), nn.ELU: act(specialise=elu), nn.CELU: act(slope=1.0),
    nn.SELU: act(slope=_SELU_SLOPE), nn.Mish: act(slope=_MISH_SLOPE), nn.Softplus: act(slope=0.5, zero=False),
    nn.Softsign: act(slope=1.0), nn.Tanhshrink: act(slope=0.0), nn.LogSigmoid: act(slope=0.5, zero=False),
    nn.Hardshrink: act(slope=0.0), nn.Softshrink: act(slope=0.0), nn.Threshold: act(specialise=threshold),
    nn.RReLU: act(specialise=rrelu),
    nn.Identity: pointwise(rc.passthrough, 1.0),
    **dict.fromkeys(_DROPOUT_MODULES, pointwise(rc.passthrough, 1.0, identity_in_eval=True)),
}  # fmt: skip
"""Facts by module type; see :func:`module_facts` for how subclasses match."""

MODULES_BY_NAME: dict[str, OpFacts] = {
    # Hugging Face's Conv1D (GPT-2): a linear layer storing its weight (in, out); its forward reads ``nf``
    "transformers.pytorch_utils.Conv1D": OpFacts(rc.no_rule, shape_attrs=(ShapeAttr("nf", ("weight",), 1),
                                                                          ShapeAttr("nx", ("weight",), 0))),
}  # fmt: skip
"""Facts by the qualified name of a module type of another package (``module.QualName``), which fxmorph does not
import: traced through (no rule of their own), they state their sizes for write-back to restate."""

# -- functions -----------------------------------------------------------------------------------------
_ADD = pointwise(slope=1.0)
_MUL = pointwise(slope=1.0, zero_absorbing=True)  # the slope is the other operand's value: taken as nonzero
_NOT_ZERO = pointwise(zero=False)  # 0/0, 0**0, 0 == 0, exp(0), clamp to unknown bounds ...
# the training flag's position: F.dropout(input, p, training), F.rrelu(input, lower, upper, training)
_DROPOUT = pointwise(slope=1.0, train_flag=2, identity_in_eval=True)
_RRELU = act(rc.elementwise, train_flag=3, specialise=rrelu)
_RELU, _TANH = act(rc.elementwise, 0.0, fuses=True), act(rc.elementwise, 1.0, fuses=True)
_SIGMOID = act(rc.elementwise, 0.25, zero=False, fuses=True)
_SELU, _CELU = act(rc.elementwise, _SELU_SLOPE), act(rc.elementwise, 1.0)
_SHRINK = act(rc.elementwise, 0.0)  # hardshrink, softshrink, tanhshrink: flat at 0
_BATCH_NORM = OpFacts(rf.batch_norm, OpKind.BATCH_NORM, new_channel=_STATS, fuses=True)

FUNCTION_OPS: dict[Any, OpFacts] = {
    **dict.fromkeys((operator.add, operator.iadd, torch.add), _ADD.replace(fuses=True)),
    **dict.fromkeys((operator.sub, operator.isub, torch.sub), _ADD),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul), _MUL),
    **dict.fromkeys((operator.neg, torch.neg), pointwise(slope=-1.0)),
    **dict.fromkeys((operator.truediv, operator.itruediv, operator.floordiv, operator.mod, operator.pow, torch.div,
                     torch.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                     torch.where, torch.exp, torch.rsqrt, torch.log, torch.reciprocal, torch.clamp, torch.clip,
                     torch.clamp_min, torch.clamp_max), _NOT_ZERO),
    **dict.fromkeys((torch.maximum, torch.minimum), pointwise()),  # at a tie autograd splits the gradient
    torch.abs: pointwise(slope=0.0), torch.square: pointwise(slope=0.0), torch.sqrt: pointwise(),
    torch.erf: pointwise(slope=_ERF_SLOPE), torch.addcmul: pointwise(),
    **dict.fromkeys((torch.sigmoid, F.sigmoid, torch.sigmoid_), _SIGMOID),
    **dict.fromkeys((torch.tanh, F.tanh, torch.tanh_), _TANH),
    **dict.fromkeys((torch.relu, F.relu, F.relu_, torch.relu_, F.relu6), _RELU),
    F.gelu: act(rc.elementwise, 0.5), F.silu: act(rc.elementwise, 0.5), F.hardswish: act(rc.elementwise, 0.5),
    F.hardsigmoid: act(rc.elementwise, 1 / 6, zero=False, fuses=True),
    **dict.fromkeys((F.hardtanh, F.hardtanh_), act(rc.elementwise, specialise=hardtanh, fuses=True)),
    **dict.fromkeys((F.leaky_relu, F.leaky_relu_), act(rc.elementwise, specialise=leaky, fuses=True)),
    **dict.fromkeys((F.elu, F.elu_), act(rc.elementwise, specialise=elu)),
    **dict.fromkeys((F.selu, torch.selu, torch.selu_), _SELU),
    **dict.fromkeys((F.celu, torch.celu, torch.celu_), _CELU),
    F.mish: act(rc.elementwise, _MISH_SLOPE), F.softplus: act(rc.elementwise, 0.5, zero=False),
    F.softsign: act(rc.elementwise, 1.0), F.logsigmoid: act(rc.elementwise, 0.5, zero=False),
    **dict.fromkeys((F.hardshrink, F.softshrink, F.tanhshrink), _SHRINK),
    **dict.fromkeys((F.threshold, F.threshold_, torch.threshold), act(rc.elementwise, specialise=threshold)),
    **dict.fromkeys((F.rrelu, F.rrelu_, torch.rrelu), _RRELU),
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                     torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout), _DROPOUT),
    torch.prelu: act(rf.prelu),  # F.prelu is torch.prelu; its slopes are graph values, not known here
    operator.getitem: view(rs.getitem), torch.index_select: move(rs.index_select),
    **dict.fromkeys((torch.flatten, torch.reshape), view(rs.reshape)),
    # a permute of a tensor whose unit dims stand for any size is the permute of the full tensor, broadcast
    torch.permute: move(rs.permute).replace(broadcasts=True),
    **dict.fromkeys((torch.transpose, torch.swapaxes), move(rs.transpose).replace(broadcasts=True)),
    torch.unsqueeze: view(rs.unsqueeze), torch.squeeze: view(rs.squeeze),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), move(rs.cat).replace(joins=True)),
    torch.split: move(rs.split), torch.chunk: move(rs.chunk), torch.unbind: move(rs.unbind),
    torch.tensor_split: move(rs.tensor_split), torch.repeat_interleave: move(rs.repeat_interleave),
    getattr: OpFacts(rs.getattr_rule, OpKind.SHAPE),
    **dict.fromkeys((operator.matmul, torch.matmul, torch.bmm), OpFacts(rc.matmul)),
    F.scaled_dot_product_attention: OpFacts(sdpa), torch.einsum: OpFacts(einsum),
    **dict.fromkeys((torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, F.softmin), OpFacts(rc.softmax)),
    torch.mean: pool(rc.statistic, keeps=True), torch.sum: pool(rc.statistic),
    torch.amax: pool(rc.reduce, keeps=True),
    F.adaptive_avg_pool1d: pool(rc.spatial(1), keeps=True), F.adaptive_avg_pool2d: pool(rc.spatial(2), keeps=True),
    F.adaptive_avg_pool3d: pool(rc.spatial(3), keeps=True), F.adaptive_max_pool1d: pool(rc.spatial(1), keeps=True),
    F.adaptive_max_pool2d: pool(rc.spatial(2), keeps=True), F.adaptive_max_pool3d: pool(rc.spatial(3), keeps=True),
    F.max_pool1d: pool(rc.spatial(1), keeps=True), F.max_pool2d: pool(rc.spatial(2), keeps=True),
    F.max_pool3d: pool(rc.spatial(3), keeps=True),
    F.avg_pool1d: pool(rc.spatial(1)), F.avg_pool2d: pool(rc.spatial(2)), F.avg_pool3d: pool(rc.spatial(3)),
    # lp pooling of zeros has an infinite slope (the p-th root at 0)
    F.lp_pool1d: pool(rc.spatial(1), slope=None), F.lp_pool2d: pool(rc.spatial(2), slope=None),
    **dict.fromkeys((F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), pool(rc.spatial(None))),
    # the kernels F.interpolate calls (an exported graph's upsampling)
    torch._C._nn.upsample_nearest2d: pool(rc.spatial(None), keeps=True),
    torch._C._nn.upsample_bilinear2d: pool(rc.spatial(None)),
    F.pad: pool(rc.spatial(None), specialise=pad),
    F.linear: OpFacts(rc.functional_linear, OpKind.LAYER),
    torch.addmm: OpFacts(addmm, OpKind.LAYER),  # bias + x @ w, weight (in, out): Hugging Face's Conv1D
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
    torch._weight_norm: OpFacts(rp.weight_norm),  # what parametrizations.weight_norm derives the weight with
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
    out[stochastic_depth] = pointwise(rc.passthrough, 1.0, train_flag=3, identity_in_eval=True)
    return out


FUNCTION_OPS.update(_torchvision_ops())

# -- Tensor methods ------------------------------------------------------------------------------------
METHOD_OPS: dict[str, OpFacts] = {
    **dict.fromkeys(("add", "add_"), _ADD.replace(fuses=True)), **dict.fromkeys(("sub", "sub_"), _ADD),
    **dict.fromkeys(("mul", "mul_"), _MUL),
    **dict.fromkeys(("neg", "neg_"), pointwise(slope=-1.0)), **dict.fromkeys(("abs", "abs_"), pointwise(slope=0.0)),
    **dict.fromkeys(("div", "div_", "exp", "exp_", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "pow",
                     "rsqrt", "log", "reciprocal"), _NOT_ZERO),
    "sqrt": pointwise(), "square": pointwise(slope=0.0), "erf": pointwise(slope=_ERF_SLOPE),
    **dict.fromkeys(("addcmul", "addcmul_"), pointwise()),
    **dict.fromkeys(("sigmoid", "sigmoid_"), _SIGMOID), **dict.fromkeys(("tanh", "tanh_"), _TANH),
    **dict.fromkeys(("relu", "relu_"), _RELU), "hardshrink": _SHRINK,
    "prelu": act(rf.prelu),
    **dict.fromkeys(("contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as"),
                    pointwise(rc.passthrough, 1.0)),
    # casts to integers and booleans: per element, zero stays zero, and no gradient flows through them
    **dict.fromkeys(("long", "int", "short", "byte", "char", "bool"), pointwise(rc.passthrough, 0.0)),
    "detach": pointwise(rc.passthrough, 0.0),  # the identity, but no gradient flows through it
    **{name: move(getattr(rs, name)) for name in ("index_select", "split", "chunk", "unbind", "tensor_split",
                                                   "repeat_interleave")},
    **{name: move(getattr(rs, name)).replace(broadcasts=True) for name in ("permute", "transpose")},
    **{name: view(getattr(rs, name)) for name in ("unsqueeze", "squeeze", "expand")},
    **dict.fromkeys(("view", "reshape", "flatten"), view(rs.reshape)),
    "swapaxes": move(rs.transpose).replace(broadcasts=True),
    "reshape_as": OpFacts(rf.reshape_as), "view_as": OpFacts(rf.reshape_as),
    "size": OpFacts(rs.size, OpKind.SHAPE), "dim": OpFacts(shape_only, OpKind.SHAPE),
    **dict.fromkeys(("matmul", "bmm"), OpFacts(rc.matmul)),
    "addmm": OpFacts(addmm, OpKind.LAYER),
    **dict.fromkeys(("softmax", "log_softmax"), OpFacts(rc.softmax)),
    "mean": pool(rc.statistic, keeps=True), "amax": pool(rc.reduce, keeps=True), "sum": pool(rc.statistic),
}  # fmt: skip
"""Facts by Tensor method name (``x.relu()``)."""

inplace_by_name(FUNCTION_OPS)
inplace_by_name(METHOD_OPS)
# the in-place operators' names (``iadd``) have no trailing underscore for inplace_by_name to see
for _op in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
    FUNCTION_OPS[_op] = FUNCTION_OPS[_op].replace(inplace=True)

_SPECIAL: dict[str, OpFacts] = {
    "placeholder": OpFacts(rc.placeholder), "output": OpFacts(rc.output), "get_attr": OpFacts(rc.attribute),
}  # fmt: skip
_UNKNOWN = OpFacts(rc.no_rule)
_PARAMETRIZED = OpFacts(rp.parametrized_leaf)  # a parametrized layer kept whole: its weight is no stored tensor


# -- lookup --------------------------------------------------------------------------------------------
def module_facts(kind: type[nn.Module]) -> OpFacts | None:
    """The facts of module type ``kind``, matched through its MRO (each base by type, or by qualified name in
    :data:`MODULES_BY_NAME`); None if no base is in the table.

    The first base in the table whose ``forward`` ``kind`` keeps gives everything. A type that
    overrides ``forward`` gets no rule and no behaviour (:func:`~fxmorph.analysis.rules.compute.no_rule`,
    kind OTHER) but keeps its nearest tabled base's parameter meaning (``new_channel``, ``shape_attrs``).
    """
    nearest: OpFacts | None = None
    for cls in kind.__mro__:
        facts = MODULE_OPS.get(cls) or MODULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
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
        if parametrize.is_parametrized(module):
            return _PARAMETRIZED, Call(module=module)
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
