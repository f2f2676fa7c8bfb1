"""Values of new channels: zero fan-out so the function is unchanged, sensible fan-in and statistics."""

from __future__ import annotations

import math

import torch

from fxmorph.errors import PlanError
from fxmorph.surgery.indices import AxisMap

__all__ = ["new_channel_values"]

_ONES = ("running_var",)
_NORM_SCALES = ("BatchNorm", "InstanceNorm", "LayerNorm", "GroupNorm", "SyncBatchNorm")


def new_channel_values(
    tensor: torch.Tensor,
    dim: int,
    amap: AxisMap,
    role: str,
    owner_type: str,
    path: str,
    init: dict[int, dict[str, torch.Tensor]],
    generator: torch.Generator,
) -> torch.Tensor:
    """A tensor shaped like the rebuilt one whose new positions along ``dim`` hold their values.

    Explicit values from a :class:`~fxmorph.analysis.plan.GroupPlan` ``init`` win. Otherwise: ``"in"`` slices
    (fan-out of the new channels) are zero; norm scales and running variances are one; weight rows
    are drawn uniformly in ``+-1/sqrt(fan_in)`` as PyTorch initialises Linear and Conv layers; every
    other parameter (biases, shifts, embeddings used directly) is zero.
    """
    shape = list(tensor.shape)
    shape[dim] = len(amap.source)
    fill = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    leaf = path.rsplit(".", 1)[-1]
    if role == "out":
        if leaf in _ONES or (leaf == "weight" and owner_type.startswith(_NORM_SCALES)):
            fill.fill_(1.0)
        elif tensor.dim() >= 2 and leaf.endswith("weight"):
            fan_in = max(tensor.numel() // max(tensor.shape[dim], 1), 1)
            bound = 1.0 / math.sqrt(fan_in)
            new = torch.as_tensor([p for p, *_ in amap.slots], dtype=torch.long)
            rand_shape = list(shape)
            rand_shape[dim] = len(new)
            rand = torch.rand(rand_shape, generator=generator, dtype=torch.float64) * 2 - 1
            fill.index_copy_(dim, new, (rand * bound).to(fill.dtype))
    for pos, gid, k, _ in amap.slots:
        values = init.get(gid, {}).get(path)
        if values is not None:
            _check_init_shape(values, fill, dim, k, gid, path)
            fill.select(dim, pos).copy_(values.select(dim, k))
    return fill


def _check_init_shape(values: torch.Tensor, fill: torch.Tensor, dim: int, k: int, gid: int, path: str) -> None:
    """Explicit values must match the rebuilt tensor on every other dim and hold new channel ``k``."""
    same = values.dim() == fill.dim() and all(values.shape[d] == fill.shape[d] for d in range(fill.dim()) if d != dim)
    if not same or values.shape[dim] <= k:
        want = [*fill.shape[:dim], "new", *fill.shape[dim + 1 :]]
        raise PlanError(f"group {gid}: init['{path}'] has shape {list(values.shape)}, but the new channels need "
                        f"{want} (dim {dim}: one slice per new channel)")  # fmt: skip
