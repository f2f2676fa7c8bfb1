"""A group removed whole that leaves a residual branch constant: which ops fold into one value per channel.

Where a group's channels feed a layer that reads nothing else (the projection closing an inverted residual, the
second Linear of a transformer's MLP), that layer reads no channels once the group goes: it computes its bias at
every position, whatever the input. The ops after it that read only it and parameters (a batch norm, an
activation, a layer scale, a permute) compute constants too; the first op that reads it beside something else (the
residual ``add``) takes the constant, broadcast. The mask oracle agrees: with the group's channels zeroed, the
layer sees zeros and computes its bias.

:func:`constant_chain` finds those ops (``sources``, the layers, and ``chain``, everything computed from them and
parameters alone) or says why they cannot fold: an op after the constant that does not commute with broadcasting
(a reshape, a pooling), one that reads it beside a tensor of another shape, the model's output, an in-place write
into it, a graph in training mode (its batch norms and dropouts would see the constant as a batch). Every op of the
chain is computed once, at one value per channel, by surgery; :func:`fold_points` says where that value enters the
graph again: at the output of each top-most module that goes (which write-back replaces by a
:class:`~fxmorph.surgery.constant.Constant` holding it), and the ops of the chain outside every such module (a layer
scale the block's own forward multiplies) stay, computing on the constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx, nn

from fxmorph.analysis.facts import OpKind
from fxmorph.analysis.ops import node_facts
from fxmorph.meta import tensor_shape

if TYPE_CHECKING:
    from fxmorph.analysis.graph import ChannelGraph

__all__ = ["ConstantChain", "Fold", "constant_chain", "fold_points"]


@dataclass(frozen=True)
class Fold:
    """A node whose value is a constant once a group goes: the graph reads it from ``module``'s ``value`` (a
    :class:`~fxmorph.surgery.constant.Constant` put where the module that computed it was), or from a buffer of
    the root where no module that goes returns it (``module`` None: no class can express that)."""

    node: str
    module: str | None


@dataclass(frozen=True)
class ConstantChain:
    """The layers left reading no channels (``sources``: node name -> the dim of their output's channels) and
    every op computed from them and parameters alone (``chain``, the sources included)."""

    sources: Mapping[str, int]
    chain: frozenset[str]


def _inputs(node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` reads."""
    return list(node.all_input_nodes)


def _source_dim(cg: ChannelGraph, user: fx.Node, read: str) -> int | None:
    """The dim of the output channels of ``user``, a layer whose only input is the empty tensor ``read``, if it
    computes its bias there (a Linear or ungrouped convolution called once); None otherwise."""
    if user.op != "call_module" or [n.name for n in _inputs(user)] != [read]:
        return None
    module = cg.gm.get_submodule(str(user.target))
    bias = getattr(module, "bias", None)
    if node_facts(user, cg.gm).kind is not OpKind.LAYER or getattr(module, "groups", 1) != 1:
        return None
    if bias is not None and not isinstance(bias, nn.Parameter):
        return None  # a bias computed by a parametrization or a hook: not a plain tensor to read
    calls = [n for n in cg.gm.graph.nodes if n.op == "call_module" and n.target == user.target]
    spaces = cg.spaces.get(user.name)
    if len(calls) != 1 or not isinstance(spaces, dict) or len(spaces) != 1:
        return None  # a shared layer computes more than the constant; a layer without one channel dim is unknown
    return next(iter(spaces))


def _static(node: fx.Node, static: set[str]) -> bool:
    """Whether ``node`` computes from parameters alone (a ``get_attr``, or ops reading only such values)."""
    if node.op == "get_attr":
        return True
    ins = _inputs(node)
    return (
        node.op in ("call_function", "call_method", "call_module") and bool(ins) and all(n.name in static for n in ins)
    )


def _absorbs(cg: ChannelGraph, node: fx.Node, chain: set[str], static: set[str]) -> str | None:
    """Why ``node``, which reads the constant beside other values, cannot take it broadcast (None where it can:
    an elementwise op whose output has the shape of one of its other operands)."""
    if node.op == "output":
        return "the model would return it"
    facts = node_facts(node, cg.gm)
    if not facts.pointwise:
        return f"'{node.name}' ({node.format_node()}) reads it beside other values"
    first = node.args[0] if node.args else None
    if facts.inplace and isinstance(first, fx.Node) and first.name in chain:
        return f"'{node.name}' writes into it in place"
    shape = tensor_shape(node)
    others = [tensor_shape(n) for n in _inputs(node) if n.name not in chain and n.name not in static]
    if shape is None or shape not in others:
        return f"'{node.name}' ({node.format_node()}) cannot take it at one value per channel"
    return None


def constant_chain(cg: ChannelGraph, empty: Mapping[str, int], skip: set[str]) -> ConstantChain | str:
    """The ops a removal leaves constant, given the tensors it empties (``empty``: node name -> dim) and the
    readers of them that are not left reading nothing (``skip``: those that join them with others and leave them
    out, and those that go with them); or why they cannot fold."""
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    sources: dict[str, int] = {}
    for name in empty:
        for user in nodes[name].users:
            if user.name in empty or user.name in skip:
                continue
            dim = _source_dim(cg, user, name)
            if dim is not None:
                sources[user.name] = dim
    if not sources:
        return ConstantChain({}, frozenset())
    if cg.gm.training:
        return "the model is in training mode (its norms would see the constant as a batch): call model.eval()"
    chain, static = set(sources), set()
    for node in cg.gm.graph.nodes:
        if node.name in chain or node.name in empty:
            continue
        if _static(node, static):
            static.add(node.name)
            continue
        ins = _inputs(node)
        if not any(n.name in chain for n in ins):
            continue
        if all(n.name in chain or n.name in static for n in ins) and node.op != "output":
            if not node_facts(node, cg.gm).commutes_with_broadcast:
                return (
                    f"'{next(iter(sources))}' would read no channels and compute a constant, which "
                    f"'{node.name}' ({node.format_node()}) cannot take at one value per channel"
                )
            chain.add(node.name)
            continue
        reason = _absorbs(cg, node, chain, static)
        if reason is not None:
            return f"'{next(iter(sources))}' would read no channels and compute a constant, and {reason}"
    return ConstantChain(sources, frozenset(chain))


def fold_points(
    graph: fx.Graph, chain: frozenset[str], dead: set[str], removed: Mapping[str, list[str]]
) -> tuple[tuple[Fold, ...], frozenset[str]]:
    """Where the constant enters the graph again, and the ops of ``chain`` that stay (those outside every module
    that goes), given the nodes that go (``dead``) and the top-most modules that go (``removed``: path -> its
    nodes). A module that returns more than one constant, or a constant no module that goes returns, folds into a
    buffer of the root (:attr:`Fold.module` None)."""
    inside = {name: path for path, names in removed.items() for name in names}
    kept = frozenset(c for c in chain if c not in inside)
    points: dict[str, list[str]] = {}  # module path -> the nodes of the chain that leave it
    for node in graph.nodes:
        if node.name not in chain or node.name in kept:
            continue
        path = inside[node.name]
        live = [u for u in node.users if (u.name not in dead or u.name in kept) and inside.get(u.name) != path]
        if live:
            points.setdefault(path, []).append(node.name)
    folds = []
    for path, names in points.items():
        for name in names:
            folds.append(Fold(name, path if len(names) == 1 else None))
    return tuple(folds), kept
