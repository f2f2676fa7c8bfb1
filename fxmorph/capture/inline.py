"""Inline the subgraphs torch.export wraps in a disabled-autocast region.

A forward that runs part of itself with autocast switched off (``with torch.autocast(..., enabled=False):``,
timm's EfficientViT attention keeps its sums in float32 so) is exported as a higher-order op,
``wrap_with_autocast(device, dtype, False, cache, submod, *args)``, calling a GraphModule held as an attribute.
Without autocast around the model, as when fxmorph captures it, the region computes what its subgraph computes:
its nodes are copied into the graph in place of the call, so the channel rules see its ops instead of one opaque
call that pins every channel it touches (and a module written back could not hold the subgraph at two shapes).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["inline_autocast_off"]

_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
_ENABLED, _SUBMODULE = 2, 4
"""Positions of ``enabled`` and of the subgraph among ``wrap_with_autocast``'s arguments; its inputs follow."""


def _disabled_autocast(node: fx.Node) -> bool:
    """Whether ``node`` calls a disabled-autocast region whose subgraph is an attribute of the graph."""
    return (
        _AUTOCAST is not None
        and node.op == "call_function"
        and node.target is _AUTOCAST
        and node.args[_ENABLED] is False
        and isinstance(node.args[_SUBMODULE], fx.Node)
        and node.args[_SUBMODULE].op == "get_attr"
    )


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    """Copy the subgraph ``node`` calls in place of the call; its ``getitem`` users read the copies' outputs."""
    holder = node.args[_SUBMODULE]
    assert isinstance(holder, fx.Node)
    sub = gm.get_submodule(str(holder.target))
    assert isinstance(sub, fx.GraphModule)
    inputs = iter(node.args[_SUBMODULE + 1 :])
    env: dict[fx.Node, object] = {}
    outputs: tuple[object, ...] = ()
    with gm.graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(inputs)
            elif inner.op == "output":
                outputs = tuple(fx.map_arg(inner.args[0], lambda a: env[a]))
            else:
                copied = gm.graph.node_copy(inner, lambda a: env[a])
                # the region's ops run where the call ran: they get its module path
                for key in ("nn_module_stack", "stack_trace"):
                    if key not in copied.meta and key in node.meta:
                        copied.meta[key] = node.meta[key]
                env[inner] = copied
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outputs[user.args[1]])  # type: ignore[arg-type,index]
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not holder.users:
        gm.graph.erase_node(holder)
        delattr(gm, str(holder.target))


def inline_autocast_off(gm: fx.GraphModule) -> int:
    """Inline every disabled-autocast region of an exported graph (see the module doc); the number inlined.

    A region whose result is read other than item by item stays a call (and its channels stay pinned)."""
    count = 0
    for node in list(gm.graph.nodes):
        if _disabled_autocast(node) and all(
            u.op == "call_function" and u.target is operator.getitem for u in node.users
        ):
            _inline(gm, node)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
