"""Typed access to the node metadata fxmorph relies on (shapes and dtypes from shape propagation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["TensorInfo", "node_info", "tensor_shape"]

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
