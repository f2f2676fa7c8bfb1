"""Values of grown channels, in the form surgery takes them (``GroupPlan.init``).

A group's parameter axes are *slots*, each of a kind: ``fanin`` (weight rows that compute the
channel from other channels), ``fanout`` (weight columns that read it), ``kernel`` (a depthwise
kernel, one per channel), ``norm_weight``/``norm_bias``/``mean``/``var`` (a BatchNorm's affine
parameters and statistics), ``bias`` and ``other``. Values of one channel in one slot are read and
written over the *original* widths of the slot's other bound dims; :func:`stage_plan` turns them into
the tensors surgery expects (which see the dims before the slot's dim already resized, in order), so
new-by-new entries (a new row meeting a new column) are zero unless a spec derives them from the
staged tensor (Net2Net's split of a copied row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, Group, Layout, Role
from fxmorph.analysis.context import Binding
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.importance import channel_positions
from fxmorph.surgery.indices import AxisMap, axis_map

__all__ = [
    "Slot",
    "Spec",
    "axes",
    "bound_dims",
    "group_slots",
    "new_positions",
    "read_new",
    "stage_plan",
    "tensor_at",
]

_BN = nn.modules.batchnorm._BatchNorm
_NORM_KINDS = {"weight": "norm_weight", "bias": "norm_bias", "running_mean": "mean", "running_var": "var"}
_DENSE = (nn.Linear, nn.modules.conv._ConvNd)

Spec = Callable[[torch.Tensor], torch.Tensor]
"""Given the staged tensor of a slot (dims before the slot's dim resized), the new channels' values:
the same shape with the slot's dim of size ``new``."""


@dataclass(frozen=True)
class Slot:
    """One parameter axis of a group: ``path`` and ``dim``, its ``kind``, the original tensor shape,
    and ``spread``: how many positions each channel occupies on that axis (>1 after a flatten, in a
    grouped convolution, or where the group appears in several pieces)."""

    path: str
    dim: int
    kind: str
    shape: tuple[int, ...]
    spread: int

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one channel's values in this slot (the original shape without ``dim``)."""
        return self.shape[: self.dim] + self.shape[self.dim + 1 :]

    @property
    def row_numel(self) -> int:
        """Number of values of one channel in this slot."""
        return int(np.prod(self.row_shape, dtype=np.int64))


def tensor_at(root: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at ``path``."""
    owner, _, leaf = path.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    value = getattr(module, leaf)
    assert isinstance(value, torch.Tensor), path
    return value


def _memo(cg: ChannelGraph) -> dict[Any, Any]:
    """Values derived from ``cg`` (which never changes once built), kept with it."""
    # The memo lives and dies with the channel graph, no global cache to evict.
    return cg.__dict__.setdefault("_fxmorph_grow_memo", {})


def bound_dims(cg: ChannelGraph) -> dict[str, dict[int, Binding]]:
    """Every bound dim of every parameter or buffer path."""
    memo = _memo(cg)
    if "dims" not in memo:
        out: dict[str, dict[int, Binding]] = defaultdict(dict)
        for (target, dim), binding in cg.bindings.items():
            out[target][dim] = binding
        memo["dims"] = dict(out)
    return memo["dims"]


def axes(cg: ChannelGraph, plan: WidthPlan, layout: Layout) -> AxisMap:
    """:func:`~fxmorph.surgery.indices.axis_map`, remembered per plan (the plan is kept alive with it)."""
    # id() is unique only while the object lives: the entry holds the plan, so no later plan can reuse its id.
    _, maps = _memo(cg).setdefault(("axes", id(plan)), (plan, {}))
    if layout not in maps:
        maps[layout] = axis_map(cg, plan, layout)
    return maps[layout]


def _owner(cg: ChannelGraph, path: str) -> nn.Module | None:
    """The module owning the tensor at ``path`` (None for a tensor of the root)."""
    owner = path.rpartition(".")[0]
    return cg.gm.get_submodule(owner) if owner else None


def _kind(cg: ChannelGraph, path: str, role: Role, tensor: torch.Tensor) -> str:
    """The slot kind of the tensor at ``path`` bound with ``role`` (see the module docstring)."""
    if role == Role.IN:
        return "fanout"
    owner, leaf = _owner(cg, path), path.rpartition(".")[2]
    if isinstance(owner, _BN):
        return _NORM_KINDS.get(leaf, "other")
    if leaf == "bias":
        return "bias"
    # A depthwise weight is [channels, 1, *kernel]: each channel owns a whole kernel, not a row of a weighted sum.
    if isinstance(owner, nn.modules.conv._ConvNd) and owner.groups > 1 and tensor.shape[1] == 1 and leaf == "weight":
        return "kernel"
    if leaf.endswith("weight") and tensor.dim() >= 2:
        return "fanin"
    return "other"


def group_slots(cg: ChannelGraph, group: Group) -> list[Slot]:
    """The slots of ``group``, in the order of its parameter members."""
    memo = _memo(cg)
    if ("slots", group.id) not in memo:
        memo[("slots", group.id)] = _slots(cg, group)
    return memo[("slots", group.id)]


def _slots(cg: ChannelGraph, group: Group) -> list[Slot]:
    """The slots of ``group`` (uncached; see :func:`group_slots`)."""
    out = []
    dims_of: dict[str, int] = defaultdict(int)
    for m in group.params:
        dims_of[m.name] += 1
    for m in group.params:
        tensor = tensor_at(cg.gm, m.name)
        spread = channel_positions(cg, cg.bindings[(m.name, m.dim)].layout, group.id).shape[1]
        kind = _kind(cg, m.name, m.role, tensor) if dims_of[m.name] == 1 else "other"  # one init per path
        out.append(Slot(m.name, m.dim, kind, tuple(tensor.shape), spread))
    return out


def dense_reader(cg: ChannelGraph, slot: Slot) -> bool:
    """True if ``slot`` is a column of a Linear or an ungrouped convolution (a plain weighted sum)."""
    owner = _owner(cg, slot.path)
    if not isinstance(owner, _DENSE) or slot.path.rpartition(".")[2] != "weight":
        return False
    return not isinstance(owner, nn.modules.conv._ConvNd) or owner.groups == 1


def new_positions(amap: AxisMap, gid: int, new: int) -> np.ndarray:
    """``(new, k)`` positions of each new channel of ``gid`` on an axis (all its repeats)."""
    per: list[list[int]] = [[] for _ in range(new)]
    for pos, g, k, _ in amap.slots:
        if g == gid:
            per[k].append(pos)
    return np.asarray(per, dtype=np.int64)


def _old_positions(amap: AxisMap) -> np.ndarray:
    """Positions of the old entries of an axis, in the order of their original index."""
    old = np.flatnonzero(amap.source >= 0)
    return old[np.argsort(amap.source[old], kind="stable")]


def read_new(
    cg: ChannelGraph, plan: WidthPlan, model: fx.GraphModule, slot: Slot, gid: int, *, grad: bool = False
) -> torch.Tensor:
    """``[new, *row_shape]``: the new channels' values (or gradients) of ``slot`` in ``model`` (which
    ``plan`` made from ``cg.gm``), summed over each channel's repeats, other dims at their old entries."""
    bindings = bound_dims(cg)[slot.path]
    tensor = tensor_at(model, slot.path)
    x = tensor.grad if grad else tensor
    if x is None:
        return torch.zeros((plan[gid].new, *slot.row_shape), dtype=torch.float64)
    x = x.detach().cpu()
    for d, binding in bindings.items():
        if d != slot.dim:
            amap = axes(cg, plan, binding.layout)
            if not amap.identity:
                # Other dims back to their original entries in original order, so rows line up with the model before
                # the plan.
                x = x.index_select(d, torch.as_tensor(_old_positions(amap)))
    pos = new_positions(axes(cg, plan, bindings[slot.dim].layout), gid, plan[gid].new)
    moved = x.movedim(slot.dim, 0)
    picked = moved[torch.as_tensor(pos.reshape(-1))].reshape(pos.shape[0], pos.shape[1], *moved.shape[1:])
    return picked.sum(1).double()


def embed(cg: ChannelGraph, plan: WidthPlan, slot: Slot, rows: torch.Tensor, staged: torch.Tensor) -> torch.Tensor:
    """``rows`` (``[new, *row_shape]`` over original widths) shaped like ``staged`` along the dims that
    surgery has already resized (their new entries zero)."""
    out = rows.movedim(0, slot.dim).to(staged.dtype)
    # Only dims below the slot's: surgery rebuilds a tensor's dims in increasing order (apply._new_tensor), so those
    # are the ones already resized when it reaches this one.
    for d, binding in sorted(bound_dims(cg)[slot.path].items()):
        if d < slot.dim:
            amap = axes(cg, plan, binding.layout)
            if not amap.identity:
                out = amap.gather(out, d, torch.zeros(_resized(out.shape, d, len(amap.source)), dtype=out.dtype))
    return out


def original_rows(cg: ChannelGraph, slot: Slot, gid: int, channels: np.ndarray, staged: torch.Tensor) -> torch.Tensor:
    """Slices of old ``channels`` of ``gid`` along the slot's dim of ``staged`` (each channel at one
    position: callers check ``slot.spread == 1``), in ``staged``'s layout."""
    pos = channel_positions(cg, cg.bindings[(slot.path, slot.dim)].layout, gid)[:, 0]
    return staged.index_select(slot.dim, torch.as_tensor(pos[np.asarray(channels, dtype=np.int64)]))


def _resized(shape: torch.Size, dim: int, size: int) -> list[int]:
    """``shape`` as a list, with ``dim`` set to ``size``."""
    out = list(shape)
    out[dim] = size
    return out


def stage_plan(
    cg: ChannelGraph,
    structure: Mapping[int, GroupPlan],
    specs: Mapping[int, Mapping[tuple[str, int], Spec]],
) -> WidthPlan:
    """The :class:`WidthPlan` of ``structure`` (keep and new per group) with ``init`` from ``specs``.

    Every path a spec names is rebuilt dim by dim as surgery will rebuild it, so each spec sees the
    tensor surgery will see at its dim; new entries of groups without a spec for a dim are zero in
    that staging (their real values are surgery's defaults, which only meet the spec's values in
    new-by-new entries).
    """
    plain = WidthPlan(structure)
    inits: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    paths = {path for per in specs.values() for path, _ in per}
    dims = bound_dims(cg)
    for path in sorted(paths):
        staged = tensor_at(cg.gm, path).detach().cpu()  # values are made on the CPU; surgery copies them over
        # In increasing dim order, as surgery rebuilds the tensor: each spec sees what surgery will see at its dim.
        for d, binding in sorted(dims[path].items()):
            amap = axes(cg, plain, binding.layout)
            if amap.identity:
                continue
            fill = None
            for gid in sorted({g for _, g, _, _ in amap.slots}):
                spec = specs.get(gid, {}).get((path, d))
                if spec is None:
                    continue
                values = spec(staged).to(staged.dtype)
                inits[gid][path] = values
                if fill is None:
                    fill = torch.zeros(_resized(staged.shape, d, len(amap.source)), dtype=staged.dtype)
                pos = new_positions(amap, gid, structure[gid].new)
                # Each new channel's values go to all its repeats on the axis.
                which = torch.as_tensor(np.repeat(np.arange(pos.shape[0]), pos.shape[1]))
                fill.index_copy_(d, torch.as_tensor(pos.reshape(-1)), values.index_select(d, which))
            staged = amap.gather(staged, d, fill)
    return WidthPlan({g: GroupPlan(p.keep, p.new, inits.get(g, {})) for g, p in structure.items()})
