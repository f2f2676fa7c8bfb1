"""Values of new channels: zero fan-out so the function is unchanged, sensible fan-in and statistics."""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from fxmorph.analysis.context import Role
from fxmorph.analysis.ops import function_facts, module_facts
from fxmorph.errors import PlanError
from fxmorph.surgery.indices import AxisMap

__all__ = ["new_channel_default", "new_channel_values"]


def new_channel_default(root: nn.Module, path: str) -> float | None:
    """The value the op table gives new channels of the tensor at ``path`` (None where it gives none).

    The owning module's type, matched through its MRO, names its parameters' defaults (a norm's scale 1
    and shift 0, running variance 1), so a subclass of ``nn.BatchNorm2d`` starts new channels as the
    stock class does. A tensor the graph passes straight to a function of the table (``F.batch_norm(x,
    mean, var, self.gamma, ...)``) gets that argument's default.
    """
    owner_path, _, leaf = path.rpartition(".")
    try:
        owner = root.get_submodule(owner_path) if owner_path else root
    except AttributeError:  # a tensor surgery creates (a folded bias) whose owner is not a module here
        owner = None
    facts = None if owner is None else module_facts(type(owner))
    value = None if facts is None else facts.default(leaf)
    if value is None and isinstance(root, fx.GraphModule):
        value = _argument_default(root.graph, path)
    if value is None and leaf == "running_var":
        # A variance used by hand-written normalisation the table cannot see: 1 all the same (0 would
        # divide the new channel by sqrt(eps)).
        value = 1.0
    return value


def _argument_default(graph: fx.Graph, path: str) -> float | None:
    """The default the table gives the argument that the tensor at ``path`` is passed as, directly."""
    for node in graph.find_nodes(op="get_attr", target=path):
        for user in node.users:
            facts = function_facts(user.target) if user.op == "call_function" else None
            if facts is None or not facts.new_channel:
                continue
            # Bound to keywords only, so the argument's name is found whether the graph passed it by position or by
            # name.
            bound = normalize_function(
                user.target, tuple(user.args), dict(user.kwargs), normalize_to_only_use_kwargs=True
            )
            names = [] if bound is None else [name for name, arg in bound.kwargs.items() if arg is node]
            for name in names:
                if (value := facts.default(name)) is not None:
                    return value
    return None


def new_channel_values(
    tensor: torch.Tensor,
    dim: int,
    amap: AxisMap,
    role: Role,
    default: float | None,
    path: str,
    init: dict[int, dict[str, torch.Tensor]],
    generator: torch.Generator,
) -> torch.Tensor:
    """A tensor shaped like the rebuilt one whose new positions along ``dim`` hold their values.

    Explicit values from a :class:`~fxmorph.analysis.plan.GroupPlan` ``init`` win. Otherwise: ``IN`` slices
    (fan-out of the new channels) are zero; ``OUT`` slices take ``default`` where the op table gives one
    (:func:`new_channel_default`: norm scales and running variances 1); weight rows are drawn uniformly
    in ``+-1/sqrt(fan_in)`` as PyTorch initialises Linear and Conv layers; every other parameter
    (biases, shifts, embeddings used directly) is zero.
    """
    shape = list(tensor.shape)
    shape[dim] = len(amap.source)
    fill = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    leaf = path.rsplit(".", 1)[-1]
    if role == Role.OUT:
        if default is not None:
            fill.fill_(default)
        elif tensor.dim() >= 2 and leaf.endswith("weight"):
            # fan_in: every other dim of the weight (in_channels x kernel for a conv); the max() guards keep an
            # empty tensor from dividing by zero.
            fan_in = max(tensor.numel() // max(tensor.shape[dim], 1), 1)
            bound = 1.0 / math.sqrt(fan_in)
            new = torch.as_tensor([p for p, *_ in amap.slots], dtype=torch.long)
            rand_shape = list(shape)
            rand_shape[dim] = len(new)
            # Drawn in float64 and cast, so a model gets the same new weights whatever its dtype.
            rand = torch.rand(rand_shape, generator=generator, dtype=torch.float64) * 2 - 1
            fill.index_copy_(dim, new, (rand * bound).to(fill.dtype))
    # Explicit values last, so they win over the defaults above.
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
        raise PlanError(
            f"group {gid}: init['{path}'] has shape {list(values.shape)}, but the new channels need "
            f"{want} (dim {dim}: one slice per new channel)"
        )
