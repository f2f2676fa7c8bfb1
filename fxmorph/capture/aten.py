"""ATen overloads as the torch calls the op table knows: one vocabulary for every capture.

``torch.export`` writes a graph of ATen overloads (``aten.conv2d.default``, ``aten.relu_.default``); symbolic
tracing writes torch functions, Tensor methods and module calls. Rather than a second set of channel rules,
an exported graph is rewritten once, at capture, into the calls whose rules the op table already holds:
each overload becomes the torch binding of the same ATen schema (``aten.conv2d.default`` ->
``torch.conv2d``, ``aten.layer_norm.default`` -> ``torch.layer_norm``), or a Tensor method for in-place
arithmetic (``aten.add_.Tensor`` -> ``x.add_(y)``), or an index (``aten.slice.Tensor`` -> ``x[:, a:b]``).
The rewritten graph computes exactly what the exported one does, and analysis, surgery, the checker and
write-back see one vocabulary. An overload without an alias stays as it is: the op table has no rule for
it, so the channels it touches are pinned, with its name.

:data:`ALIASES` is the table (data, not code): to support a new overload, add its alias here and, if the
torch call is new too, its facts to :mod:`fxmorph.analysis.ops`.
"""

from __future__ import annotations

import logging
import operator
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["ALIASES", "Alias", "canonicalize"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass(frozen=True)
class Alias:
    """How one ATen overload is written as a call the op table knows.

    ``target``: a function of the same schema, or the name of a Tensor method (``call_method``).
    ``keep``: how many positional arguments the target takes, where ATen's schema has trailing ones it
    lacks; each dropped one must equal its entry in ``dropped`` (ATen's default), or the node stays ATen.
    ``kwargs``: keywords the target needs to mean the same (``inplace=True``).
    """

    target: Callable[..., Any] | str
    keep: int | None = None
    dropped: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    inert: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    """Keywords the target lacks, dropped when their value is one of the given (else the node stays ATen)."""


def _inplace(fn: Callable[..., Any]) -> Alias:
    """An in-place op whose torch function takes ``inplace=True`` (there is no ``F.silu_``)."""
    return Alias(fn, kwargs=(("inplace", True),))


ALIASES: dict[Any, Alias] = {
    # layers: the torch bindings share ATen's schemas
    aten.conv1d.default: Alias(torch.conv1d),
    aten.conv2d.default: Alias(torch.conv2d),
    aten.conv3d.default: Alias(torch.conv3d),
    aten.linear.default: Alias(F.linear),
    aten.batch_norm.default: Alias(torch.batch_norm),
    aten.layer_norm.default: Alias(torch.layer_norm),
    aten.group_norm.default: Alias(torch.group_norm),
    aten.instance_norm.default: Alias(torch.instance_norm),
    aten.rms_norm.default: Alias(torch.rms_norm),
    aten.embedding.default: Alias(torch.embedding),
    aten.scaled_dot_product_attention.default: Alias(F.scaled_dot_product_attention),
    aten._weight_norm.default: Alias(torch._weight_norm),  # parametrizations.weight_norm: g * v / ||v||
    # activations
    aten.relu.default: Alias(torch.relu),
    aten.relu_.default: Alias(torch.relu_),
    aten.sigmoid.default: Alias(torch.sigmoid),
    aten.sigmoid_.default: Alias(torch.sigmoid_),
    aten.tanh.default: Alias(torch.tanh),
    aten.tanh_.default: Alias(torch.tanh_),
    aten.gelu.default: Alias(F.gelu),
    aten.silu.default: Alias(F.silu),
    aten.silu_.default: _inplace(F.silu),
    aten.hardswish.default: Alias(F.hardswish),
    aten.hardswish_.default: _inplace(F.hardswish),
    aten.hardsigmoid.default: Alias(F.hardsigmoid),
    aten.hardsigmoid_.default: _inplace(F.hardsigmoid),
    aten.hardtanh.default: Alias(F.hardtanh),
    aten.hardtanh_.default: Alias(F.hardtanh_),
    aten.leaky_relu.default: Alias(F.leaky_relu),
    aten.leaky_relu_.default: Alias(F.leaky_relu_),
    aten.elu.default: Alias(F.elu, keep=2, dropped=(1, 1)),  # scale and input_scale: 1 for elu itself
    aten.mish.default: Alias(F.mish),
    aten.softplus.default: Alias(F.softplus),
    aten.dropout.default: Alias(torch.dropout),
    aten.dropout_.default: _inplace(F.dropout),
    aten.softmax.int: Alias(torch.softmax),
    aten.log_softmax.int: Alias(torch.log_softmax),
    # arithmetic
    aten.add.Tensor: Alias(torch.add),
    aten.add_.Tensor: Alias("add_"),
    aten.sub.Tensor: Alias(torch.sub),
    aten.sub_.Tensor: Alias("sub_"),
    aten.mul.Tensor: Alias(torch.mul),
    aten.mul_.Tensor: Alias("mul_"),
    aten.div.Tensor: Alias(torch.div),
    aten.div_.Tensor: Alias("div_"),
    aten.neg.default: Alias(torch.neg),
    aten.exp.default: Alias(torch.exp),
    aten.sqrt.default: Alias(torch.sqrt),
    aten.rsqrt.default: Alias(torch.rsqrt),
    aten.pow.Tensor_Scalar: Alias(torch.pow),
    aten.erf.default: Alias(torch.erf),
    aten.abs.default: Alias(torch.abs),
    aten.clamp.default: Alias(torch.clamp),
    aten.matmul.default: Alias(torch.matmul),
    aten.bmm.default: Alias(torch.bmm),
    aten.addmm.default: Alias(torch.addmm),  # bias + x @ w: Hugging Face's Conv1D (GPT-2)
    aten.einsum.default: Alias(torch.einsum),
    # reductions and pooling
    aten.mean.dim: Alias(torch.mean),
    aten.sum.dim_IntList: Alias(torch.sum),
    aten.amax.default: Alias(torch.amax),
    aten.max_pool1d.default: Alias(F.max_pool1d),
    aten.max_pool2d.default: Alias(F.max_pool2d),
    aten.avg_pool2d.default: Alias(F.avg_pool2d),
    aten.adaptive_avg_pool1d.default: Alias(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d.default: Alias(F.adaptive_avg_pool2d),
    aten.pad.default: Alias(F.pad),
    # F.interpolate's kernels, which torch binds with ATen's schemas
    aten.upsample_nearest2d.vec: Alias(torch._C._nn.upsample_nearest2d),
    aten.upsample_bilinear2d.vec: Alias(torch._C._nn.upsample_bilinear2d),
    # data movement
    aten.cat.default: Alias(torch.cat),
    aten.flatten.using_ints: Alias(torch.flatten),
    aten.view.default: Alias("view"),
    aten.reshape.default: Alias(torch.reshape),
    aten.permute.default: Alias(torch.permute),
    aten.transpose.int: Alias(torch.transpose),
    aten.unsqueeze.default: Alias(torch.unsqueeze),
    aten.squeeze.dim: Alias(torch.squeeze),
    aten.expand.default: Alias("expand"),
    aten.chunk.default: Alias(torch.chunk),
    aten.split.Tensor: Alias(torch.split),
    aten.split_with_sizes.default: Alias(torch.split),
    aten.unbind.int: Alias(torch.unbind),
    aten.index_select.default: Alias(torch.index_select),
    aten.clone.default: Alias("clone"),
    aten.type_as.default: Alias("type_as"),
    aten.alias.default: Alias("clone"),  # a view of the whole tensor (GPT-2 keeps every position for its head)
    aten.to.dtype: Alias("to"),
    aten.to.device: Alias("to"),
    # a cast with layout and pinning at their defaults (the only ones a dense tensor has)
    aten.to.dtype_layout: Alias("to", inert=(("layout", (None, torch.strided)), ("pin_memory", (None, False)))),
}
"""ATen overload -> the call it is written as (see the module docstring)."""

_CHECKS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default)
"""Overloads export adds to check its own assumptions (dtype, shape): no value flows out of them, and the
captured graph is only ever run on inputs of the captured shapes, so they are dropped."""

_GUARDS = "_guards_fn"
"""The submodule an exported program's ``module()`` calls first to check its inputs' shapes against the ones it
was captured on; fxmorph checks the inputs itself (the recorded interface), so the call is dropped."""

_END = sys.maxsize
"""The ``end`` of ``aten.slice.Tensor`` that means "to the end" (``x[a:]``)."""


def _index(node: fx.Node) -> tuple[Any, ...] | None:
    """The index ``x[...]`` of a ``slice`` or ``select`` node (a non-negative dim: the rank is not needed)."""
    args = list(node.args) + [None] * 5
    dim = args[1] if len(node.args) > 1 else 0
    if not isinstance(dim, int) or dim < 0:
        return None
    if node.target is aten.select.int:
        return (*[slice(None)] * dim, node.args[2])
    start, end, step = args[2], args[3], args[4]
    # written as Python writes ``x[:, a:b]``: no step where it is 1, no end where it is the end
    return (*[slice(None)] * dim, slice(start, None if end == _END else end, None if step == 1 else step))


def _rewrite(node: fx.Node, alias: Alias) -> bool:
    """Write ``node`` as ``alias`` says; False (unchanged) where a dropped argument is not the default."""
    args = node.args
    if alias.keep is not None and len(args) > alias.keep:
        extra = args[alias.keep :]
        if any(a != d for a, d in zip(extra, alias.dropped, strict=False)):
            return False
        args = args[: alias.keep]
    kwargs = dict(node.kwargs)
    for name, harmless in alias.inert:
        if kwargs.get(name) not in harmless:
            return False
        kwargs.pop(name, None)
    node.args = args
    node.kwargs = {**kwargs, **dict(alias.kwargs)}
    if isinstance(alias.target, str):
        node.op, node.target = "call_method", alias.target
    else:
        node.target = alias.target
    return True


def canonicalize(gm: fx.GraphModule) -> Counter[str]:
    """Rewrite ``gm``'s ATen overloads (in place) into the calls of :data:`ALIASES`; returns how often each
    overload without an alias occurs (their channels will be pinned by the analysis, naming them)."""
    unknown: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == _GUARDS and not node.users:
            gm.graph.erase_node(node)
            gm.delete_submodule(_GUARDS)
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target in _CHECKS and not node.users:
            gm.graph.erase_node(node)
            continue
        if node.target is aten.contiguous.default and len(node.args) == 1 and not node.kwargs:
            # no value changes, and export writes it only where the layout is not contiguous yet (a transpose
            # of a dim that a narrower model makes size one is): dropped, the graphs of two widths compare alike;
            # a view of it becomes a reshape, which copies where the strides need it, as contiguous did
            for user in node.users:
                if user.target is aten.view.default:
                    user.target = aten.reshape.default
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        if node.target in (aten.slice.Tensor, aten.select.int):
            index = _index(node)
            if index is not None:
                node.target, node.args, node.kwargs = operator.getitem, (node.args[0], index), {}
                continue
        alias = ALIASES.get(node.target)
        if alias is None or not _rewrite(node, alias):
            unknown[str(node.target)] += 1
    gm.recompile()
    if unknown:
        logger.info("ATen overloads without an alias (their channels are pinned): %s", dict(unknown))
    return unknown
