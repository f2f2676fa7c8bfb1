"""Folding a residual branch left constant by a group removed whole into one value per channel.

:mod:`fxmorph.analysis.removal_constant` finds the layers that read no channels once the group goes (``sources``)
and the ops computed from them and parameters alone. Here, after the plan's other widths are applied, each source
yields its bias (zeros where it has none) shaped to broadcast over its output (``[1, C, 1, 1]`` for a convolution),
the ops of the chain run on it in graph order, and each fold point's value is put in a :class:`Constant` where the
module that returned it was (or in a buffer of the root). The graph reads it from there; the rest of the chain goes.
Every op of the chain commutes with broadcasting, so the model computes what it computed with the group's channels
zeroed (the mask oracle).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis.removal import Removal
from fxmorph.meta import FOLDED_KEY, tensor_shape

__all__ = ["Constant", "Skipped", "fold_constants"]

logger = logging.getLogger(__name__)

ROOT_BUFFER = "fxmorph_constant"
"""Name of a root buffer holding a constant no module that goes returns (``_`` appended until it is free)."""


class Constant(nn.Module):
    """What a residual branch computes once a group removed whole left it reading no channels: one value per
    channel (``value``, a buffer shaped to broadcast), whatever it is called with."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The constant, whatever the inputs."""
        return self.value


class Skipped(nn.Module):
    """A module that went with a group removed whole, where the class calls it by name: it returns its first input,
    which goes nowhere (it fed only a branch now :class:`Constant`). Write-back's comparison proves that."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The first input, unchanged."""
        return args[0] if args else None


def _source_value(gm: fx.GraphModule, node: fx.Node, dim: int) -> torch.Tensor:
    """The output of the layer ``node`` reading no channels: its bias along ``dim``, 1 along every other dim."""
    module = gm.get_submodule(str(node.target))
    shape = tensor_shape(node)
    assert shape is not None  # the analysis took only layers with a known output
    weight = module.weight
    # its width now: the plan may have thinned it (a transposed convolution holds its outputs in dim 1)
    width = weight.shape[1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0]
    bias = module.bias if module.bias is not None else torch.zeros(width, dtype=weight.dtype)
    size = [1] * len(shape)
    size[dim] = -1
    return bias.detach().to(weight.device, weight.dtype).reshape(size)


def _evaluate(gm: fx.GraphModule, removal: Removal) -> dict[str, torch.Tensor]:
    """The value of every fold point of ``removal`` in ``gm`` (its widths already the plan's)."""
    interpreter = fx.Interpreter(gm)
    sources = dict(removal.sources)
    wanted = {f.node for f in removal.folds}
    nodes = {n.name: n for n in gm.graph.nodes}

    def value(node: fx.Node) -> Any:
        if node not in interpreter.env:
            if node.name in sources:
                interpreter.env[node] = _source_value(gm, node, sources[node.name])
            else:
                for arg in node.all_input_nodes:  # the chain reads only sources, parameters and itself
                    value(arg)
                interpreter.env[node] = interpreter.run_node(node)
        return interpreter.env[node]

    with torch.no_grad():
        return {name: value(nodes[name]).detach().clone() for name in wanted}


def fold_constants(out: fx.GraphModule, removal: Removal) -> None:
    """Replace each fold point of ``removal`` in ``out`` by its constant (a :class:`Constant` at the module that
    returned it, else a root buffer), recording the modules replaced (:data:`~fxmorph.meta.FOLDED_KEY`). The nodes
    of the chain go with the removal's other nodes afterwards."""
    if not removal.folds:
        return
    values = _evaluate(out, removal)
    nodes = {n.name: n for n in out.graph.nodes}
    for fold in removal.folds:
        node = nodes[fold.node]
        if fold.module is not None:
            out.add_submodule(fold.module, Constant(values[fold.node]))
            target = f"{fold.module}.value"
        else:
            target = ROOT_BUFFER
            while hasattr(out, target):  # a name of its own: the model may hold one already
                target += "_"
            out.register_buffer(target, values[fold.node])
        with out.graph.inserting_before(node):
            constant = out.graph.get_attr(target)
        node.replace_all_uses_with(constant)
    folded = tuple(f.module for f in removal.folds if f.module is not None)
    out.meta[FOLDED_KEY] = (*out.meta.get(FOLDED_KEY, ()), *folded)
    logger.debug("surgery folded %d constant(s) of groups %s", len(removal.folds), sorted(removal.groups))
