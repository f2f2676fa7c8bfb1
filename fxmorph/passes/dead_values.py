"""Channel values that hold for every input: the constant propagation behind ``remove-dead``.

For one channel group, :func:`channel_values` gives, at every graph node that carries the group, the
value each channel has at every position and for every input, where that can be shown from the
weights alone, and NaN where it cannot. A BatchNorm with ``gamma = 0`` outputs ``beta`` whatever it
reads; a layer whose weight rows are zero outputs its bias; a depthwise convolution of a zero channel
outputs its bias (zero padding adds zeros to zeros); elementwise ops and activations map constants to
constants (computed by calling them, in eval mode); ``x * 0`` is 0; data movement (reshape, cat,
indexing) keeps values; pooling and padding keep zeros, and some of them constants.

Which ops are layers, elementwise, data movement or pooling, and what they do to zeros and constants,
is asked of the op table (:func:`fxmorph.analysis.ops.node_facts`), so an op the table learns is
handled here too. Anything else gives NaN: the pass then keeps the channel. Inputs are assumed finite
(``0 * x = 0``).

Which nodes carry the group, and on which dims, is read from :class:`fxmorph.passes.dead_index.GroupIndex`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, Group, Role
from fxmorph.analysis.ops import OpFacts, OpKind, node_facts
from fxmorph.passes.dead_index import GroupIndex, _fetch
from fxmorph.passes.importance import channel_positions
from fxmorph.validate import frozen_mode

__all__ = ["channel_values", "zero_padded"]

logger = logging.getLogger(__name__)

_BATCH_NORM = nn.modules.batchnorm._BatchNorm


def channel_values(index: GroupIndex, group: Group) -> dict[str, np.ndarray]:
    """Per node carrying the group, each channel's value for every input (NaN: not shown constant)."""
    values: dict[str, np.ndarray] = {}
    # Graph order is topological: the values of a node's arguments are known before the node's own.
    for node in index.cg.gm.graph.nodes:
        if not index.carries(node.name, group.id):
            continue
        try:
            value = _value(index, node, group, values)
        except Exception as exc:  # an op that cannot run on constants proves nothing: keep the channels
            logger.debug("remove-dead: no constant through %s: %s", node.name, exc)
            value = _unknown(group)
        values[node.name] = value
        _mutated(node, values, index)
    return values


def _unknown(group: Group) -> np.ndarray:
    """Every channel of ``group`` unknown (NaN)."""
    return np.full(group.size, np.nan)


def _uniform(per_position: np.ndarray) -> np.ndarray:
    """``(size, k)`` values per position to one value per channel (NaN where they differ)."""
    if per_position.shape[1] == 0:
        return np.full(per_position.shape[0], np.nan)
    first = per_position[:, 0]
    same = (per_position == first[:, None]).all(axis=1)
    return np.where(same, first, np.nan)


def _inplace(node: fx.Node, index: GroupIndex) -> bool:
    """Whether the op writes into its first argument (``relu(inplace=True)``, ``x.add_(y)``, ``x += y``)."""
    if node.op == "call_module":
        return getattr(index.cg.gm.get_submodule(str(node.target)), "inplace", False) is True
    # ``__name__`` of a function, or a call_method's name. Dunders end in "_" too but are not in-place
    # (``__add__``); the in-place ones (``operator.iadd``, ``x += y``) the table marks itself.
    name = getattr(node.target, "__name__", str(node.target))
    # PyTorch's naming convention covers in-place ops the table does not list
    if node_facts(node, index.cg.gm).inplace or (name.endswith("_") and not name.endswith("__")):
        return True
    if node.op != "call_function":
        return False
    try:
        return inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):  # a builtin without a signature: only a keyword says so
        return node.kwargs.get("inplace") is True


def _mutated(node: fx.Node, values: dict[str, np.ndarray], index: GroupIndex) -> None:
    """An in-place op changes its input too: where the values differ, the input's value is unknown."""
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node) and source.name in values and _inplace(node, index):
        before, after = values[source.name], values[node.name]
        values[source.name] = np.where(before == after, before, np.nan)


def _value(index: GroupIndex, node: fx.Node, group: Group, values: dict[str, np.ndarray]) -> np.ndarray:
    """The node's channel values, by what the op table says of its op."""
    if node.op == "get_attr":
        return _attribute(index, node, group)
    if node.op not in ("call_module", "call_function", "call_method"):
        return _unknown(group)
    facts = node_facts(node, index.cg.gm)
    module = index.cg.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if facts.kind is OpKind.BATCH_NORM and isinstance(module, _BATCH_NORM):  # (the functional form: unknown)
        return _batch_norm(index, node, module, group, values)
    if facts.kind is OpKind.LAYER and module is not None:  # (F.linear and F.conv*: unknown)
        return _layer(index, node, module, group, values)
    # Before the pointwise case, which calls the op on a 1-D vector: PReLU reads channels from dim 1 and would use
    # one slope for the whole vector.
    if facts.kind is OpKind.ACTIVATION and isinstance(module, nn.PReLU):  # one slope per channel
        return _prelu(index, node, module, group, values)
    if facts.pointwise:
        return _pointwise(index, node, group, values, module, facts)
    if facts.kind is OpKind.MOVE:
        return _moved(node, group, values)
    if facts.kind is OpKind.POOL:
        return _pooled(node, group, values, facts)
    return _unknown(group)


def _attribute(index: GroupIndex, node: fx.Node, group: Group) -> np.ndarray:
    """A parameter or buffer used directly: a channel is constant where all its entries are equal."""
    tensor = _fetch(index.cg.gm, str(node.target))
    dim = index.dim(node.name, group.id)
    if dim is None or not isinstance(tensor, torch.Tensor):
        return _unknown(group)
    layout = index.cg.spaces[node.name][dim]
    rows = tensor.detach().double().movedim(dim, 0).reshape(tensor.shape[dim], -1).numpy()
    positions = channel_positions(index.cg, layout, group.id)
    return _uniform(rows[positions].reshape(group.size, -1))


def _bound(cg: ChannelGraph, path: str, gid: int, role: Role = Role.OUT) -> tuple[int, np.ndarray] | None:
    """``(dim, positions)`` of the ``role`` binding of tensor ``path`` that carries group ``gid``."""
    for dim in range(3):
        binding = cg.bindings.get((path, dim))
        if binding is not None and binding.role == role and any(g == gid for g, _ in cg.layout_groups(binding.layout)):
            return dim, channel_positions(cg, binding.layout, gid)
    return None


def _input(node: fx.Node, group: Group, values: dict[str, np.ndarray]) -> np.ndarray:
    """The channel values of the node's first argument (NaN where it does not carry the group)."""
    x = node.args[0] if node.args else None
    return values.get(x.name, _unknown(group)) if isinstance(x, fx.Node) else _unknown(group)


def _layer(
    index: GroupIndex, node: fx.Node, module: nn.Module, group: Group, values: dict[str, np.ndarray]
) -> np.ndarray:
    """A layer making the group: a channel whose weight rows are zero is its bias. A depthwise
    convolution of a zero channel is its bias too (its zero padding adds zeros), and of a constant
    channel ``k`` is ``k * sum(w) + b`` where no zero padding reaches it."""
    found = _bound(index.cg, f"{node.target}.weight", group.id)
    out_dim = index.dim(node.name, group.id)
    if found is None or out_dim is None:
        return _unknown(group)
    dim, rows = found
    if getattr(module, "transposed", False) and module.groups != 1:
        return _unknown(group)  # depthwise transposed: the weight's rows are input channels, not outputs
    path = f"{node.target}.weight"
    zero_row = index.rows(path, dim, "zero")[rows]
    bias = np.zeros(module.weight.shape[dim]) if module.bias is None else module.bias.detach().double().numpy()
    # ``rows`` is [channel, inner position]: every position of a channel must agree, which _uniform checks at the
    # end.
    out = np.where(zero_row, bias[rows], np.nan)
    x = node.args[0]
    # The input carries the same group on the same dim: depthwise, channel c reads only input channel c.
    if _depthwise(module) and isinstance(x, fx.Node) and index.dim(x.name, group.id) == out_dim:
        k = _input(node, group, values)[:, None]
        out = np.where(k == 0, bias[rows], out)
        if not zero_padded(module):
            out = np.where(np.isfinite(k) & np.isnan(out), k * index.rows(path, dim, "sum")[rows] + bias[rows], out)
    return _uniform(out)


def _depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise convolution (one input channel per group), not transposed."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and module.groups > 1
        and module.in_channels == module.groups
    )


def zero_padded(module: nn.Module) -> bool:
    """Whether zero padding reaches the output (it would replace a constant by 0 at the borders)."""
    if module.padding_mode != "zeros":
        return False  # reflect, replicate and circular padding repeat the constant
    return module.padding == "same" or any(p != 0 for p in np.atleast_1d(module.padding))


def _batch_norm(
    index: GroupIndex, node: fx.Node, bn: nn.modules.batchnorm._BatchNorm, group: Group, values: dict[str, np.ndarray]
) -> np.ndarray:
    """Eval-mode BatchNorm: ``gamma = 0`` gives ``beta`` whatever it reads; a constant input gives
    the affine map of the running statistics (without them, batch statistics: only ``gamma = 0``)."""
    # BatchNorm(affine=False) has no weight: the positions come from whichever of its tensors is bound to the group.
    found = next(
        (
            f
            for n in ("weight", "bias", "running_mean", "running_var")
            if (f := _bound(index.cg, f"{node.target}.{n}", group.id)) is not None
        ),
        None,
    )
    if found is None:
        return _unknown(group)
    idx = found[1]
    width = bn.num_features
    gamma = np.ones(width) if bn.weight is None else bn.weight.detach().double().numpy()
    beta = np.zeros(width) if bn.bias is None else bn.bias.detach().double().numpy()
    k = _input(node, group, values)[:, None]
    if bn.running_mean is not None and bn.running_var is not None:
        mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        affine = gamma[idx] * (k - mean[idx]) / np.sqrt(var[idx] + bn.eps) + beta[idx]
    else:
        affine = np.full(idx.shape, np.nan)
    return _uniform(np.where(gamma[idx] == 0, beta[idx], affine))


def _prelu(
    index: GroupIndex, node: fx.Node, module: nn.PReLU, group: Group, values: dict[str, np.ndarray]
) -> np.ndarray:
    """``prelu(k)``: ``k`` where ``k >= 0``, else the channel's slope times ``k``."""
    k = _input(node, group, values)[:, None]
    slopes = module.weight.detach().double().numpy()
    if module.num_parameters == 1:
        slope = np.full((group.size, 1), slopes[0])
    elif (found := _bound(index.cg, f"{node.target}.weight", group.id)) is not None:
        slope = slopes[found[1]]
    else:
        return _unknown(group)
    return _uniform(np.where(k >= 0, k, slope * k))


def _operands(
    index: GroupIndex, node: fx.Node, gid: int, values: dict[str, np.ndarray]
) -> tuple[Any, Any, list[np.ndarray], bool]:
    """The node's arguments with every group tensor as its values (a float64 vector), the values
    found, and whether a tensor outside the group is among them (then the result is not a function of
    the constants; a one-element parameter or buffer is used as it is)."""
    found: list[np.ndarray] = []
    foreign = False

    def swap(a: Any) -> Any:
        nonlocal foreign
        if not isinstance(a, fx.Node):
            return a
        v = values.get(a.name)
        if v is not None and index.dim(a.name, gid) is not None:
            found.append(v)
            # The op is run on 0 in place of unknown channels; their results are set back to NaN after the call.
            return torch.as_tensor(np.nan_to_num(v, nan=0.0))
        if a.op == "get_attr" and isinstance(t := _fetch(index.cg.gm, str(a.target)), torch.Tensor) and t.numel() == 1:
            return t.detach().double().reshape(())
        foreign = True
        return a

    args = fx.node.map_aggregate(node.args, swap)
    kwargs = fx.node.map_aggregate(dict(node.kwargs), swap)
    return args, kwargs, found, foreign


def _pointwise(
    index: GroupIndex,
    node: fx.Node,
    group: Group,
    values: dict[str, np.ndarray],
    module: nn.Module | None,
    facts: OpFacts,
) -> np.ndarray:
    """Elementwise ops and activations, computed by calling the op (a module in eval mode) on the
    constants; ``x * 0 = 0`` whatever ``x`` is."""
    at = facts.train_flag
    if node.op == "call_function" and at is not None:
        training = node.args[at] if len(node.args) > at else node.kwargs.get("training", node.kwargs.get("train"))
        if training is not False:  # random as traced (an absent flag is taken as set): nothing is constant
            return _unknown(group)
        if facts.identity_in_eval:
            return _input(node, group, values)
    args, kwargs, found, foreign = _operands(index, node, group.id, values)
    out = _unknown(group)
    if found and not foreign:
        with torch.no_grad():
            if module is not None:
                with frozen_mode(module):  # eval behaviour (dropout off), the module's flags restored
                    result = module(*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                result = node.target(*args, **kwargs)
        result = torch.as_tensor(result).double()
        if result.shape == (group.size,):  # broadcasting met nothing but the group's vectors and scalars
            unknown = np.any([np.isnan(v) for v in found], axis=0)
            out = np.where(unknown, np.nan, result.numpy())
    if facts.zero_absorbing:
        # ``x * 0`` is 0 even where ``x`` is unknown (inputs are assumed finite: ``inf * 0`` would be NaN).
        for v in found:
            out = np.where(v == 0, 0.0, out)
    return out


def _moved(node: fx.Node, group: Group, values: dict[str, np.ndarray]) -> np.ndarray:
    """Data movement keeps values: the group's channels come from the inputs that carry it, which agree."""
    sources: list[np.ndarray] = []
    fx.node.map_aggregate(
        (node.args, node.kwargs),
        lambda a: sources.append(values[a.name]) if isinstance(a, fx.Node) and a.name in values else None,
    )
    if not sources:
        return _unknown(group)
    first = sources[0]
    # NaN never equals NaN: an unknown source keeps the result unknown.
    agree = np.all([s == first for s in sources], axis=0)
    return np.where(agree, first, np.nan)


def _pooled(node: fx.Node, group: Group, values: dict[str, np.ndarray], facts: OpFacts) -> np.ndarray:
    """Pooling, padding, interpolation and reductions over other dims keep a zero channel zero (unless
    the table says otherwise for this call: ``F.pad`` with a nonzero fill); those that average or pick
    (at any size) keep a constant."""
    k = _input(node, group, values)
    if not facts.zero_preserving:
        return _unknown(group)
    return k.copy() if facts.keeps_constant else np.where(k == 0, 0.0, np.nan)
