"""The rule table: how every supported op moves channels, as data.

Rules are looked up by module type (through the MRO, so subclasses that keep the inherited forward
share their base's rule), by function, or by method name. Anything missing falls back to
:func:`~fxmorph.analysis.rules.compute.no_rule`, which pins every group the op touches and names the op.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxmorph.analysis.context import RuleContext
from fxmorph.analysis.rules import compute as rc
from fxmorph.analysis.rules import functional as rf
from fxmorph.analysis.rules import modules as rm
from fxmorph.analysis.rules import shape as rs
from fxmorph.analysis.rules.einsum import einsum
from fxmorph.analysis.rules.torchvision import TORCHVISION_RULES

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "Rule", "lookup"]

Rule = Callable[[RuleContext, fx.Node], Any]

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU,
)  # fmt: skip

MODULE_RULES: dict[type[nn.Module], Rule] = {
    nn.Conv1d: rm.conv, nn.Conv2d: rm.conv, nn.Conv3d: rm.conv,
    nn.ConvTranspose1d: rm.conv_transpose, nn.ConvTranspose2d: rm.conv_transpose,
    nn.ConvTranspose3d: rm.conv_transpose,
    nn.Linear: rm.linear,
    nn.BatchNorm1d: rm.batch_norm, nn.BatchNorm2d: rm.batch_norm, nn.BatchNorm3d: rm.batch_norm,
    nn.SyncBatchNorm: rm.batch_norm,
    nn.InstanceNorm1d: rm.batch_norm, nn.InstanceNorm2d: rm.batch_norm, nn.InstanceNorm3d: rm.batch_norm,
    nn.LayerNorm: rm.layer_norm, nn.RMSNorm: rm.layer_norm, nn.GroupNorm: rm.group_norm,
    nn.PReLU: rm.prelu, nn.Embedding: rm.embedding,
    nn.MultiheadAttention: rm.multihead_attention,
    nn.PixelShuffle: rm.pixel_shuffle, nn.PixelUnshuffle: rm.pixel_unshuffle,
    nn.ChannelShuffle: rm.channel_shuffle,
    nn.Flatten: rs.flatten_module,
    nn.MaxPool1d: rc.spatial(1), nn.MaxPool2d: rc.spatial(2), nn.MaxPool3d: rc.spatial(3),
    nn.AvgPool1d: rc.spatial(1), nn.AvgPool2d: rc.spatial(2), nn.AvgPool3d: rc.spatial(3),
    nn.AdaptiveAvgPool1d: rc.spatial(1), nn.AdaptiveAvgPool2d: rc.spatial(2),
    nn.AdaptiveAvgPool3d: rc.spatial(3), nn.AdaptiveMaxPool1d: rc.spatial(1),
    nn.AdaptiveMaxPool2d: rc.spatial(2), nn.AdaptiveMaxPool3d: rc.spatial(3),
    nn.Upsample: rc.spatial(None), nn.UpsamplingNearest2d: rc.spatial(2),
    nn.UpsamplingBilinear2d: rc.spatial(2),
    nn.ZeroPad2d: rc.spatial(2), nn.ReflectionPad2d: rc.spatial(2), nn.ReplicationPad2d: rc.spatial(2),
    nn.Softmax: rf.module_softmax, nn.Softmin: rf.module_softmax, nn.LogSoftmax: rf.module_softmax,
    nn.Softmax2d: rf.module_softmax,
    **dict.fromkeys(_ACTIVATIONS, rc.passthrough),
}  # fmt: skip

_ELEMENTWISE = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.mod, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.sigmoid, torch.tanh, torch.relu, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.selu, F.celu, F.softsign, F.logsigmoid, F.hardshrink, F.softshrink, F.tanhshrink, F.threshold, F.rrelu,
    F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.threshold_, F.rrelu_, F.alpha_dropout,
    F.feature_alpha_dropout, torch.selu, torch.celu, torch.rrelu, torch.threshold, torch.dropout,
    torch.alpha_dropout, torch.feature_alpha_dropout, torch.relu_, torch.sigmoid_, torch.tanh_, torch.selu_,
    torch.celu_, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.erf, torch.square,
    torch.log, torch.reciprocal, torch.pow, operator.itruediv, operator.isub, torch.addcmul,
)  # fmt: skip

FUNCTION_RULES: dict[Any, Rule] = {
    **dict.fromkeys(_ELEMENTWISE, rc.elementwise),
    operator.getitem: rs.getitem,
    torch.index_select: rs.index_select,
    getattr: rs.getattr_rule,
    torch.flatten: rs.reshape, torch.reshape: rs.reshape,
    torch.permute: rs.permute, torch.transpose: rs.transpose, torch.swapaxes: rs.transpose,
    torch.unsqueeze: rs.unsqueeze, torch.squeeze: rs.squeeze,
    torch.cat: rs.cat, torch.concat: rs.cat, torch.concatenate: rs.cat,
    torch.split: rs.split, torch.chunk: rs.chunk, torch.unbind: rs.unbind,
    torch.tensor_split: rs.tensor_split, torch.repeat_interleave: rs.repeat_interleave,
    operator.matmul: rc.matmul, torch.matmul: rc.matmul, torch.bmm: rc.matmul,
    F.scaled_dot_product_attention: rc.sdpa,
    torch.einsum: einsum,
    torch.softmax: rc.softmax, F.softmax: rc.softmax, torch.log_softmax: rc.softmax, F.log_softmax: rc.softmax,
    F.softmin: rc.softmax,
    torch.mean: rc.reduce, torch.sum: rc.reduce, torch.amax: rc.reduce,
    F.adaptive_avg_pool1d: rc.spatial(1), F.adaptive_avg_pool2d: rc.spatial(2),
    F.adaptive_avg_pool3d: rc.spatial(3), F.avg_pool2d: rc.spatial(2), F.max_pool2d: rc.spatial(2),
    F.avg_pool1d: rc.spatial(1), F.max_pool1d: rc.spatial(1), F.avg_pool3d: rc.spatial(3),
    F.max_pool3d: rc.spatial(3), F.interpolate: rc.spatial(None), F.pad: rc.spatial(None),
    F.linear: rc.functional_linear,
    F.conv1d: rc.functional_conv, F.conv2d: rc.functional_conv, F.conv3d: rc.functional_conv,
}  # fmt: skip

METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        ["add", "sub", "mul", "div", "add_", "mul_", "sigmoid", "tanh", "relu", "exp", "abs", "neg",
         "sub_", "div_", "neg_", "sigmoid_", "tanh_", "relu_", "exp_", "abs_", "clamp", "clamp_", "clamp_min",
         "clamp_max", "clip", "pow", "sqrt", "rsqrt", "log", "square", "erf", "reciprocal", "hardshrink"],
        rc.elementwise,
    ),
    "prelu": rf.prelu, "log_softmax": rc.softmax, "reshape_as": rf.reshape_as, "view_as": rf.reshape_as,
    "addcmul": rc.elementwise, "addcmul_": rc.elementwise,
    **dict.fromkeys(["contiguous", "clone", "detach", "float", "double", "half", "to", "type_as"], rc.passthrough),
    "index_select": rs.index_select, "view": rs.reshape, "reshape": rs.reshape, "flatten": rs.reshape,
    "permute": rs.permute, "transpose": rs.transpose, "swapaxes": rs.transpose,
    "unsqueeze": rs.unsqueeze, "squeeze": rs.squeeze, "expand": rs.expand,
    "split": rs.split, "chunk": rs.chunk, "unbind": rs.unbind,
    "tensor_split": rs.tensor_split, "repeat_interleave": rs.repeat_interleave,
    "size": rs.size, "dim": lambda ctx, node: None,
    "matmul": rc.matmul, "bmm": rc.matmul, "softmax": rc.softmax,
    "mean": rc.reduce, "sum": rc.reduce, "amax": rc.reduce,
}  # fmt: skip


FUNCTION_RULES.update(rf.FUNCTIONAL_RULES)
FUNCTION_RULES.update(TORCHVISION_RULES)

_SPECIAL: dict[str, Rule] = {"placeholder": rc.placeholder, "output": rc.output, "get_attr": rc.attribute}


def lookup(node: fx.Node, root: nn.Module) -> Rule:
    """The rule for ``node``; :func:`no_rule` when the op is not in the table."""
    if node.op in _SPECIAL:
        return _SPECIAL[node.op]
    if node.op == "call_module":
        kind = type(root.get_submodule(str(node.target)))
        for cls in kind.__mro__:
            # NOTE: a subclass only shares its base's rule if it also keeps the base's forward.
            if cls in MODULE_RULES and getattr(kind, "forward", None) is getattr(cls, "forward", None):
                return MODULE_RULES[cls]
        return rc.no_rule
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target), rc.no_rule)
    try:
        return FUNCTION_RULES.get(node.target, rc.no_rule)
    except TypeError:  # unhashable target
        return rc.no_rule
