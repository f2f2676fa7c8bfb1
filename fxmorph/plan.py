"""WidthPlan: what to keep and what to add, per channel group. Every pass speaks it; surgery applies it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fxmorph.analysis import ChannelGraph, Layout
from fxmorph.errors import PlanError

__all__ = ["GroupPlan", "WidthPlan"]


@dataclass(frozen=True)
class GroupPlan:
    """The fate of one group: old channel indices to keep (in order), and channels to append.

    ``init`` optionally gives the values of the new channels per parameter path (for example
    ``"layer1.0.conv1.weight"``): a tensor shaped like the parameter with its bound dim of size
    ``new``. Parameters not named get defaults: zero fan-out (so the function is unchanged), fan-in
    drawn like PyTorch's default init, norm scales 1 and shifts 0.
    """

    keep: tuple[int, ...]
    new: int = 0
    init: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Width of the group after the plan."""
        return len(self.keep) + self.new


class WidthPlan(Mapping[int, GroupPlan]):
    """A mapping from group id to :class:`GroupPlan`; groups not named keep every channel."""

    def __init__(
        self, groups: Mapping[int, GroupPlan] | None = None, bias_deltas: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        self._groups: dict[int, GroupPlan] = dict(groups or {})
        self.bias_deltas: dict[str, torch.Tensor] = dict(bias_deltas or {})
        """Per module path, a tensor to add to its bias before any width changes (a bias is created
        where the module has none); used to fold the constant output of removed channels."""

    def __getitem__(self, key: int) -> GroupPlan:
        return self._groups[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __repr__(self) -> str:
        return f"WidthPlan({ {g: (len(p.keep), p.new) for g, p in self._groups.items()} })"

    @classmethod
    def from_widths(cls, cg: ChannelGraph, widths: Mapping[int, int]) -> WidthPlan:
        """Keep the first ``width`` channels of each named group (or add channels beyond its size)."""
        plans = {}
        for gid, width in widths.items():
            size = cg.groups[gid].size
            plans[gid] = GroupPlan(tuple(range(min(width, size))), max(width - size, 0))
        return cls(plans)

    def width_of(self, gid: int, size: int) -> int:
        """Width of group ``gid`` (of original ``size``) under this plan."""
        plan = self._groups.get(gid)
        return size if plan is None else plan.width

    def is_identity(self, cg: ChannelGraph) -> bool:
        """True if no group changes."""
        return all(p.new == 0 and p.keep == tuple(range(cg.groups[g].size)) for g, p in self._groups.items())

    def validate(self, cg: ChannelGraph) -> None:
        """Raise :class:`PlanError` if the plan does not fit ``cg``."""
        for gid, plan in self._groups.items():
            if not 0 <= gid < len(cg.groups):
                raise PlanError(f"group {gid} does not exist: the graph has {len(cg.groups)} groups")
            group = cg.groups[gid]
            keep = np.asarray(plan.keep, dtype=np.int64)
            if keep.size and (keep.min() < 0 or keep.max() >= group.size):
                raise PlanError(f"group {gid}: keep indices must lie in [0, {group.size})")
            if len(set(plan.keep)) != len(plan.keep):
                raise PlanError(f"group {gid}: keep indices repeat")
            if plan.new < 0:
                raise PlanError(f"group {gid}: cannot add a negative number of channels")
            if plan.width < 1:
                raise PlanError(f"group {gid} would have no channels left: keep at least one")
            if group.pins and (plan.new or plan.keep != tuple(range(group.size))):
                raise PlanError(f"group {gid} is pinned ({group.pinned}) and cannot change")
            if plan.new and group.grow_pins:
                reason = "; ".join(str(p) for p in group.grow_pins)
                raise PlanError(f"group {gid} cannot grow without changing the function: {reason}")

    def measure(self, cg: ChannelGraph) -> MeasureFn:
        """A function giving the width of any layout of ``cg`` under this plan."""
        return MeasureFn(cg, self)


class MeasureFn:
    """Width of a layout under a plan (callable)."""

    def __init__(self, cg: ChannelGraph, plan: WidthPlan) -> None:
        self._cg = cg
        self._plan = plan

    def __call__(self, layout: Layout) -> int:
        total = 0
        for gid, inner in self._cg.layout_groups(layout):
            total += self._plan.width_of(gid, self._cg.groups[gid].size) * inner
        return total
