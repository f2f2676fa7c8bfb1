"""Fold a changed default softmax scale into the parameters that make the query of an attention.

``F.scaled_dot_product_attention`` without ``scale=`` computes ``softmax(q k^T / sqrt(E))`` of the head width
``E`` it is given. When pruning changes ``E``, the shrunk model's default reads the new width; multiplying ``q`` by
``sqrt(E_new / E_old)`` gives back the original logits. Where ``q`` is the output of an affine producer (a Linear
or a convolution: its weight rows and bias; a LayerNorm or RMSNorm over the head width, a "qk norm": its affine
weight and bias), moved to the attention only by ops that rearrange values (view, reshape, permute, transpose,
chunk, split, unbind, indexing), scaling the producer's rows that reach ``q`` multiplies ``q`` by that factor
exactly. The class's own ``forward``, which passes no ``scale``, then computes what the graph does, so the result
can be given back as the user's class; anywhere else the attention rule passes the original scale explicitly.

Which rows reach ``q`` is read off by running the rearranging ops once on a tensor whose entries are their own row
index (the data-movement probe of the design notes): the fold holds only where no other use of the producer's
output (a packed projection's k and v, anything else) reads one of those rows.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from fxmorph.analysis.context import RuleContext, ScaleKeptRows
from fxmorph.meta import tensor_shape

__all__ = ["query_fold"]

logger = logging.getLogger(__name__)

_MAX_PROBE = 1 << 22
"""The most entries of an index tensor the probe builds (16 MiB of int32): a larger query keeps ``scale=``."""

# Ops that only rearrange the values of their first argument. The first set keeps their row-major order, so the
# probe reshapes to the node's recorded shape (their sizes may be graph values, ``x.size(0)``); the second runs on
# the probe itself, with every other argument a constant.
_RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze"})
_RESHAPE_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze})
_MOVE_METHODS = frozenset({"permute", "transpose", "swapaxes", "movedim", "contiguous", "clone", "chunk", "split",
                           "unbind"})  # fmt: skip
_MOVE_FUNCTIONS = frozenset({torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.chunk,
                             torch.split, torch.unbind, operator.getitem})  # fmt: skip
_SHAPE_READERS = frozenset({"size", "dim"})
"""Methods that read only a tensor's shape: a use by them reads no value."""
_SHAPE_ATTRIBUTES = (("shape",), ("ndim",), ("dtype",), ("device",))
"""Attributes (``getattr`` nodes, as their arguments after the tensor) that read no value."""


@dataclass(frozen=True)
class _Producer:
    """An affine producer of the query: its node, the dim of its output that its parameters' rows index, and the
    paths of those parameters (weight, then a module's bias, which may be absent: a fold of dead channels can
    create it)."""

    node: fx.Node
    dim: int
    paths: tuple[str, ...]


def query_fold(ctx: RuleContext, node: fx.Node, query: fx.Node) -> ScaleKeptRows | None:
    """Where the query of the attention ``node`` can take a changed softmax scale in its producer's rows (see the
    module docstring): the rows to scale; None where that is not provably exact."""
    producer = _producer(ctx, query)
    if producer is None:
        logger.debug("%s: no affine producer of the query to fold the softmax scale into", node.name)
        return None
    binding = ctx.bindings.get((producer.paths[0], 0))
    rows = _query_rows(ctx, producer, node, query)
    if binding is None or rows is None or not _sole_use(ctx, producer):
        logger.debug("%s: the query's producer %s cannot take the softmax scale", node.name, producer.node.name)
        return None
    return ScaleKeptRows(producer.paths, rows, binding.layout)


# -- the producer ------------------------------------------------------------------------------------------------
def _producer(ctx: RuleContext, value: Any) -> _Producer | None:
    """The affine producer ``value`` comes from through rearranging ops, or None."""
    while isinstance(value, fx.Node):
        found = _affine(ctx, value)
        if found is not None:
            return found
        if not _rearranges(ctx, value) or not value.args:
            return None
        value = value.args[0]
    return None


def _affine(ctx: RuleContext, node: fx.Node) -> _Producer | None:
    """``node`` as a producer whose output channel ``c`` along some dim is ``weight[c] * f + bias[c]``."""
    shape = ctx.shape(node)
    if shape is None:
        return None
    if node.op == "call_function" and node.target is torch.nn.functional.linear:
        return _functional_linear(node, len(shape))
    if node.op != "call_module":
        return None
    module = ctx.gm.get_submodule(str(node.target))
    if parametrize.is_parametrized(module):  # its weight is computed, not a tensor surgery could scale
        return None
    paths = (f"{node.target}.weight", f"{node.target}.bias")
    if _plain(module, nn.Linear):
        return _Producer(node, len(shape) - 1, paths)
    if _plain(module, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        return _Producer(node, len(shape) - len(module.kernel_size) - 1, paths)
    # a norm is invariant to its input's scale: only its affine weight (over the one last dim) can take a factor
    if _plain(module, nn.LayerNorm, nn.RMSNorm) and getattr(module, "weight", None) is not None:
        assert isinstance(module, nn.LayerNorm | nn.RMSNorm)
        if len(module.normalized_shape) == 1:
            return _Producer(node, len(shape) - 1, paths)
    return None


def _plain(module: nn.Module, *kinds: type[nn.Module]) -> bool:
    """Whether ``module`` is one of ``kinds`` with that type's own ``forward`` (a subclass may compute otherwise)."""
    return any(isinstance(module, kind) and type(module).forward is kind.forward for kind in kinds)


def _functional_linear(node: fx.Node, ndim: int) -> _Producer | None:
    """``F.linear(x, w, b)`` whose weight (and bias, if any) are parameters read directly (an exported graph's)."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    paths = (str(weight.target), *((str(bias.target),) if isinstance(bias, fx.Node) else ()))
    return _Producer(node, ndim - 1, paths)


def _rearranges(ctx: RuleContext, node: fx.Node) -> bool:
    """Whether ``node`` only rearranges the values of its first argument (identity modules included)."""
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS or node.target in _MOVE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS or node.target in _MOVE_FUNCTIONS
    if node.op == "call_module":
        return _plain(ctx.gm.get_submodule(str(node.target)), nn.Identity)
    return False


def _sole_use(ctx: RuleContext, producer: _Producer) -> bool:
    """Whether the producer's parameters serve this call only: no other call of its module (or of a module
    holding it), no other read of a parameter, no other name for one (a tied tensor)."""
    tied = set(ctx.ties) | set(ctx.ties.values())
    if any(path in tied for path in producer.paths):
        return False
    for n in ctx.gm.graph.nodes:
        if n is producer.node or n.op not in ("call_module", "get_attr"):
            continue
        if n.op == "get_attr" and set(n.users) == {producer.node}:  # F.linear reading its own parameters
            continue
        if any(_overlaps(str(n.target), path) for path in producer.paths):
            return False
    return True


def _overlaps(target: str, path: str) -> bool:
    """Whether the module or tensor at ``target`` is, holds or lies in the tensor at ``path``."""
    return target == path or path.startswith(f"{target}.") or target.startswith(f"{path}.")


# -- the rows that reach the query ---------------------------------------------------------------------------
def _query_rows(ctx: RuleContext, producer: _Producer, attention: fx.Node, query: fx.Node) -> tuple[int, ...] | None:
    """The producer's rows that reach the attention as ``query``, provided nothing else reads one of them."""
    start = _index_tensor(ctx, producer)
    if start is None:
        return None
    values: dict[fx.Node, Any] = {producer.node: start}
    read: set[int] = set()  # rows some other use reads
    rows: set[int] | None = None
    todo = deque([producer.node])
    while todo:
        node = todo.popleft()
        for user in node.users:
            if user is attention and _only_query(user, node) and _shaped(values[node], query):
                rows = _channels(values[node])
                continue
            if _reads_shape_only(user):
                continue
            moved = _moved(ctx, user, node, values[node]) if user is not attention and _rearranges(ctx, user) else None
            if moved is None:
                read |= _channels(values[node])  # a use the probe does not follow reads every row it is given
            elif user not in values:
                values[user] = moved
                todo.append(user)
    if rows is None or rows & read:
        return None
    return tuple(sorted(rows))


def _only_query(attention: fx.Node, node: fx.Node) -> bool:
    """Whether ``node`` is the query of ``attention`` and none of its other arguments (self-attention's ``q = k``)."""
    query = attention.args[0] if attention.args else attention.kwargs.get("query")
    rest = (attention.args[1:], {k: v for k, v in attention.kwargs.items() if k != "query"})
    return query is node and not _mentions(rest, {}, node)


def _shaped(value: Any, query: fx.Node) -> bool:
    """Whether the probe ``value`` has the recorded shape of the query (a probe that went astray has not)."""
    return isinstance(value, torch.Tensor) and tuple(value.shape) == tensor_shape(query)


def _index_tensor(ctx: RuleContext, producer: _Producer) -> torch.Tensor | None:
    """A tensor of the producer's output shape whose entries are their index along the producer's rows."""
    shape = ctx.shape(producer.node)
    if shape is None or math.prod(shape) > _MAX_PROBE:
        return None
    view = [1] * len(shape)
    view[producer.dim] = shape[producer.dim]
    return torch.arange(shape[producer.dim], dtype=torch.int32).view(view).expand(shape)


def _reads_shape_only(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape``, ``x.dtype``: uses that read no value."""
    if node.op == "call_method":
        return node.target in _SHAPE_READERS
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in _SHAPE_ATTRIBUTES


def _moved(ctx: RuleContext, node: fx.Node, source: fx.Node, value: Any) -> Any:
    """The probe ``value`` (of ``source``) moved by the rearranging op ``node``; None where the op reads ``source``
    elsewhere than as its data, or has an argument the probe cannot know."""
    args, kwargs = node.args, node.kwargs
    if not args or args[0] is not source or _mentions(args[1:], kwargs, source):
        return None
    if node.op == "call_module":  # an identity
        return value
    shape = ctx.shape(node)
    if node.target in _RESHAPE_METHODS or node.target in _RESHAPE_FUNCTIONS:
        return value.reshape(shape) if shape is not None and isinstance(value, torch.Tensor) else None
    if any(isinstance(a, fx.Node) for a in _flat((args[1:], kwargs))):
        return None  # a size or index computed in the graph
    try:
        if node.op == "call_method":
            return getattr(value, str(node.target))(*args[1:], **kwargs)
        return node.target(value, *args[1:], **kwargs)  # type: ignore[operator]
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:  # a call the probe cannot replay: no fold
        logger.debug("probe of %s failed: %s", node.name, exc)
        return None


def _mentions(args: Any, kwargs: Any, node: fx.Node) -> bool:
    """Whether ``node`` is among the nodes of an argument structure."""
    return any(a is node for a in _flat((args, kwargs)))


def _flat(value: Any) -> list[Any]:
    """Every leaf of a nested argument structure."""
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _flat(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flat(v)]
    return [value]


def _channels(value: Any) -> set[int]:
    """The rows a probe value holds (of every tensor of a tuple)."""
    if isinstance(value, torch.Tensor):
        return set(torch.unique(value).tolist())
    if isinstance(value, list | tuple):
        return {c for v in value for c in _channels(v)}
    return set()
