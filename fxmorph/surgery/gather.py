"""Input gathers: a Linear that reads the flattened model input keeps only some of its input columns, and
the graph gathers those features (``torch.index_select`` with a registered int64 buffer, an ONNX
``Gather``) right before it.

Which features to keep, and what the dropped ones fold into the bias, is decided by
:mod:`fxmorph.passes.drop_inputs`; this module only rewrites, on a copy of the GraphModule it is given.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

__all__ = ["KEPT_BUFFER", "gather_inputs"]

KEPT_BUFFER = "fxmorph_kept_inputs"
"""Name of the root buffer holding the kept feature indices (``_`` appended until it is free)."""


def _gathered_linear(old: nn.Linear, kept: torch.Tensor, fold: torch.Tensor) -> nn.Linear:
    """A copy of ``old`` reading only the input columns ``kept``, with ``fold`` added to its bias (a
    bias is created when ``old`` has none and ``fold`` is nonzero somewhere)."""
    new = copy.deepcopy(old)
    columns = old.weight.detach()[:, kept.to(old.weight.device)].clone()
    new.weight = nn.Parameter(columns, requires_grad=old.weight.requires_grad)
    new.in_features = len(kept)
    if old.bias is not None or bool((fold != 0).any()):
        bias = torch.zeros(old.out_features, dtype=torch.float64) if old.bias is None else old.bias.detach()
        # A created bias trains like the weight beside it.
        requires_grad = (old.bias if old.bias is not None else old.weight).requires_grad
        value = bias.to("cpu", torch.float64) + fold  # summed in float64, then back to the layer's dtype
        new.bias = nn.Parameter(value.to(old.weight.device, old.weight.dtype), requires_grad=requires_grad)
    return new


def gather_inputs(gm: fx.GraphModule, flat: str, linear: str, kept: torch.Tensor, fold: torch.Tensor) -> fx.GraphModule:
    """A copy of ``gm`` gathering the features ``kept`` (int64 indices) of node ``flat`` (the flattened
    input, named as in ``gm``) before the Linear call node ``linear``, whose layer keeps only those
    columns and adds ``fold`` (float64, one value per output) to its bias."""
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    flat_node, linear_node = nodes[flat], nodes[linear]
    path = str(linear_node.target)
    old = out.get_submodule(path)
    assert isinstance(old, nn.Linear)
    owner, _, leaf = path.rpartition(".")
    setattr(out.get_submodule(owner) if owner else out, leaf, _gathered_linear(old, kept, fold))
    buffer = KEPT_BUFFER
    # A name of its own: a model gathered before (or a user attribute) may hold the plain name already.
    while hasattr(out, buffer):
        buffer += "_"
    out.register_buffer(buffer, kept.to(old.weight.device))
    with out.graph.inserting_before(linear_node):
        index = out.graph.get_attr(buffer)
        # dim 1: the flattened input is [batch, features].
        gathered = out.graph.call_function(torch.index_select, (flat_node, 1, index))
    # Only the Linear reads the gathered features; any other user of the flattened input still sees all of it.
    linear_node.replace_input_with(flat_node, gathered)
    out.recompile()
    return out
