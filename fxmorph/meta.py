"""Every metadata key fxmorph writes (``GraphModule.meta``), and typed access to the node metadata it relies on
(shapes and dtypes from shape propagation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = [
    "DROP_KEY",
    "FACTORS_KEY",
    "FLOPS_KEY",
    "GROW_KEY",
    "INTERFACE_KEY",
    "MORPH_KEY",
    "REPORT_KEY",
    "UNREACHED_KEY",
    "TensorInfo",
    "node_info",
    "tensor_shape",
]

# Keys of ``GraphModule.meta``: every one fxmorph writes is here, so layers never spell one by hand.
UNREACHED_KEY = "fxmorph.unreached"
FLOPS_KEY = "fxmorph.flops"
INTERFACE_KEY = "fxmorph.interface"
FACTORS_KEY = "fxmorph.factors"
GROW_KEY = "fxmorph.grow"
DROP_KEY = "fxmorph.dropped_inputs"
REPORT_KEY = "fxmorph.report"
MORPH_KEY = "fxmorph.morph"

TensorInfo = Any  # torch.fx.passes.shape_prop.TensorMetadata, or a tuple/list of them


def node_info(node: fx.Node) -> TensorInfo | None:
    """Return the propagated tensor metadata of ``node`` (``None`` for non-tensor values)."""
    return node.meta.get("tensor_meta")


def tensor_shape(value: Any) -> tuple[int, ...] | None:
    """Shape of a node's tensor value, or ``None`` if the node (or value) is not a single tensor."""
    info = node_info(value) if isinstance(value, fx.Node) else value
    shape = getattr(info, "shape", None)
    if isinstance(shape, torch.Size):
        return tuple(int(s) for s in shape)
    return None
