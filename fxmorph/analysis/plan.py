"""WidthPlan: what to keep and what to add, per channel group. Every pass speaks it; surgery applies it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fxmorph.analysis import ChannelGraph, Layout
from fxmorph.analysis.removal import Removal, combined
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

    def __post_init__(self) -> None:
        # any sequence of integers (a list, a range, a 1-D integer tensor or array) becomes a tuple of ints,
        # other sequences a tuple of what they hold, for WidthPlan.validate to refuse with the reason
        keep = self.keep.tolist() if isinstance(self.keep, torch.Tensor | np.ndarray) else self.keep
        try:
            items = tuple(keep)
        except TypeError:  # not iterable: kept as given, so validate() names the problem instead of a TypeError
            return
        integral = all(_integral(i) for i in items)
        # the dataclass is frozen: normalising a field goes through object.__setattr__
        object.__setattr__(self, "keep", tuple(int(i) for i in items) if integral else items)

    @property
    def width(self) -> int:
        """Width of the group after the plan."""
        return len(self.keep) + self.new


class WidthPlan(Mapping[int, GroupPlan]):
    """A mapping from group id to :class:`GroupPlan`; groups not named keep every channel."""

    def __init__(
        self, groups: Mapping[int, GroupPlan] | None = None, bias_deltas: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """A plan of ``groups`` (group id -> :class:`GroupPlan`), copied, and optional ``bias_deltas``."""
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
            # bool is a subclass of int: True would otherwise pass as group 1
            if isinstance(gid, bool) or not isinstance(gid, int | np.integer):
                raise PlanError(f"group ids are integers (ChannelGraph.groups[i].id), got {gid!r}")
            if not 0 <= gid < len(cg.groups):
                raise PlanError(f"group {gid} does not exist: the graph has {len(cg.groups)} groups")
            if not isinstance(plan, GroupPlan):
                raise PlanError(
                    f"group {gid}: expected a GroupPlan, got {type(plan).__name__}: "
                    "write GroupPlan(keep=(0, 1, ...), new=0)"
                )
            _check_group(cg, gid, plan)
        removal = self.removal(cg)
        if not removal.possible:
            raise PlanError(f"groups {sorted(removal.groups)} cannot all be removed whole: {removal.refused}")
        for gid, plan in self._groups.items():
            # a group at 0 that cannot go alone may go with another (a dense layer's bottleneck, with its features)
            if plan.width < 1 and gid not in removal.groups | removal.vanished:
                raise PlanError(
                    f"group {gid} would have no channels left, and it cannot be removed whole "
                    f"({cg.removal(gid).refused}): keep at least one"
                )
        # init is checked once every group is known to be sound, so structural errors are reported first
        names = dict.fromkeys([*dict(cg.gm.named_parameters()), *dict(cg.gm.named_buffers())])  # in model order
        for gid, plan in self._groups.items():
            _check_init(names, gid, plan)

    def removal(self, cg: ChannelGraph) -> Removal:
        """What the groups this plan leaves at width 0 that can go whole take with them (the others at 0 must be
        among what they take: :meth:`validate`; :mod:`fxmorph.analysis.removal`)."""
        return combined(cg, [g for g, p in self._groups.items() if p.width == 0 and cg.removal(g).possible])

    def measure(self, cg: ChannelGraph) -> MeasureFn:
        """A function giving the width of any layout of ``cg`` under this plan."""
        return MeasureFn(cg, self)


def _integral(values: object) -> bool:
    """True for integers (Python or NumPy, not bool) and for integer-dtype tensors and arrays."""
    if isinstance(values, torch.Tensor | np.ndarray):
        return not values.dtype.is_floating_point if isinstance(values, torch.Tensor) else values.dtype.kind in "iu"
    return isinstance(values, int | np.integer) and not isinstance(values, bool)


def _check_group(cg: ChannelGraph, gid: int, plan: GroupPlan) -> None:
    """Raise :class:`PlanError` unless ``plan`` is a valid fate for group ``gid`` of ``cg``."""
    group = cg.groups[gid]
    if not isinstance(plan.keep, tuple | list):
        raise PlanError(f"group {gid}: keep is a sequence of channel indices, got {type(plan.keep).__name__}")
    if not all(_integral(i) for i in plan.keep):
        raise PlanError(f"group {gid}: keep holds channel indices, integers only; got {list(plan.keep)[:8]}")
    if not _integral(plan.new):
        raise PlanError(f"group {gid}: new is a number of channels to add, an integer; got {plan.new!r}")
    keep = np.asarray([int(i) for i in plan.keep], dtype=np.int64)
    if keep.size and (keep.min() < 0 or keep.max() >= group.size):
        raise PlanError(f"group {gid}: keep indices must lie in [0, {group.size})")
    if len(set(keep.tolist())) != len(keep):
        raise PlanError(f"group {gid}: keep indices repeat")
    if plan.new < 0:
        raise PlanError(f"group {gid}: cannot add a negative number of channels")
    # a pinned group may still be named, as long as its plan is the identity (a plan listing every group)
    if group.pins and (plan.new or tuple(keep.tolist()) != tuple(range(group.size))):
        raise PlanError(f"group {gid} is pinned ({group.pinned}) and cannot change")
    if plan.new and group.grow_pins:
        reason = "; ".join(str(p) for p in group.grow_pins)
        raise PlanError(f"group {gid} cannot grow without changing the function: {reason}")


def _check_init(names: Mapping[str, None], gid: int, plan: GroupPlan) -> None:
    """``init`` names tensors of the model (``names``: its parameters and buffers) and gives tensors; their
    shapes are checked where surgery uses them (:func:`fxmorph.surgery.defaults.new_channel_values`)."""
    if plan.init and not plan.new:
        raise PlanError(f"group {gid}: init gives values for new channels, but new is 0")
    for path, values in plan.init.items():
        if path not in names:
            # suggest the tensors of the same kind (same last name part, such as ``weight``), briefly
            close = ", ".join(n for n in names if n.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1])[:200]
            raise PlanError(
                f"group {gid}: init names '{path}', which is not a parameter or buffer of the model"
                + (f" (those of that kind: {close})" if close else "")
            )
        if not isinstance(values, torch.Tensor):
            raise PlanError(f"group {gid}: init['{path}'] must be a tensor, got {type(values).__name__}")


class MeasureFn:
    """Width of a layout under a plan (callable)."""

    def __init__(self, cg: ChannelGraph, plan: WidthPlan) -> None:
        """Measure layouts of ``cg`` under ``plan``."""
        self._cg = cg
        self._plan = plan

    def __call__(self, layout: Layout) -> int:
        """The new width of ``layout``: each piece's group width times its repetition ``inner``."""
        total = 0
        for gid, inner in self._cg.layout_groups(layout):
            total += self._plan.width_of(gid, self._cg.groups[gid].size) * inner
        return total
