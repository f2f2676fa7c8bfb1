"""Probe modules: make an activation act as the identity on some channels of a model copy, so a gradient
probe (:mod:`fxmorph.passes.grow_probe`) sees the activations linearised at zero on its probe channels.

The pass decides which activations and which channel positions; this module rewrites the copy in place
(it is only ever given a model that surgery built for the probe, never the user's model).
"""

from __future__ import annotations

import torch
from torch import fx, nn

__all__ = ["PROBE_PREFIX", "ProbeMix", "insert_probe_mix", "keep_activation_input"]

PROBE_PREFIX = "_fxmorph_probe_mix_"
"""Name prefix of the probe modules added to the root of a probed copy."""


class ProbeMix(nn.Module):
    """``where(mask, x, y)`` along one dim: the identity on probe channels, the activation elsewhere."""

    def __init__(self, mask: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.dim = dim

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` where the mask is set (the activation's input), ``y`` elsewhere (its output)."""
        shape = [1] * x.dim()
        shape[self.dim] = -1  # the mask broadcasts over every other dim
        return torch.where(self.mask.view(shape), x, y)


def keep_activation_input(model: fx.GraphModule, node: fx.Node) -> bool:
    """Make the activation ``node`` leave its input intact (an in-place activation whose input nothing
    else reads runs out of place); False if the graph relies on the mutation (then it cannot be probed)."""
    module = model.get_submodule(str(node.target)) if node.op == "call_module" else None
    inplace = bool(getattr(module, "inplace", False) or node.kwargs.get("inplace", False))
    # ``x.relu_()`` has no out-of-place switch: its input is gone once it runs.
    if node.op == "call_method" and str(node.target).endswith("_"):
        return False
    # Other readers of the input see the activated values; running out of place would change what they read.
    if inplace and isinstance(node.args[0], fx.Node) and len(node.args[0].users) > 1:
        return False
    if module is not None and inplace:
        module.inplace = False  # a probe copy: every call site of the module keeps its input, harmlessly
    if "inplace" in node.kwargs:
        node.kwargs = {**node.kwargs, "inplace": False}
    return True


def insert_probe_mix(model: fx.GraphModule, node: fx.Node, mask: torch.Tensor, dim: int, index: int) -> None:
    """After the activation ``node``, a :class:`ProbeMix` (root module ``PROBE_PREFIX + index``) that
    passes the activation's input through on the positions ``mask`` sets along ``dim``; every user of
    ``node`` reads the mix instead. The caller recompiles ``model`` once it has inserted them all."""
    name = f"{PROBE_PREFIX}{index}"
    model.add_submodule(name, ProbeMix(mask, dim))
    with model.graph.inserting_after(node):
        mixed = model.graph.call_module(name, (node.args[0], node))
    # The mix itself reads ``node``: keep that use, redirect every other one.
    # The mix reads ``node.args[0]`` as the activation's input: keep_activation_input must have made the activation
    # leave it intact.
    node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
