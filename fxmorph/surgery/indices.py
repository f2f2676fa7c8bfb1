"""Index arithmetic: which old positions of a channel axis survive a plan, and where new ones go."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fxmorph.analysis import ChannelGraph, Layout
from fxmorph.analysis.plan import WidthPlan

__all__ = ["AxisMap", "axis_map"]


@dataclass(frozen=True)
class AxisMap:
    """How one axis changes: ``source[i]`` is the old position feeding new position ``i`` (-1: new).

    ``width`` is the original length of the axis. ``slots`` lists, for every new position,
    ``(position, group id, new channel index, inner offset)``.
    """

    source: np.ndarray
    slots: list[tuple[int, int, int, int]]
    width: int

    @property
    def identity(self) -> bool:
        """True if the axis does not change."""
        return not self.slots and bool(np.array_equal(self.source, np.arange(self.width)))

    def gather(self, tensor: torch.Tensor, dim: int, fill: torch.Tensor | None) -> torch.Tensor:
        """Rebuild ``tensor`` along ``dim``: kept positions copied, new positions from ``fill``.

        ``fill`` has the same shape as the result (only its new positions are read); it may be
        ``None`` when there are no new positions.
        """
        # New positions (-1) read position 0 as a placeholder; ``fill`` overwrites them below.
        index = torch.as_tensor(np.where(self.source < 0, 0, self.source), dtype=torch.long)
        out = tensor.index_select(dim, index.to(tensor.device))
        if self.slots and fill is not None:
            new = torch.as_tensor([p for p, *_ in self.slots], dtype=torch.long, device=tensor.device)
            out.index_copy_(dim, new, fill.index_select(dim, new))
        return out


def axis_map(cg: ChannelGraph, plan: WidthPlan, layout: Layout) -> AxisMap:
    """The :class:`AxisMap` of an axis with ``layout`` under ``plan``."""
    parts: list[np.ndarray] = []
    slots: list[tuple[int, int, int, int]] = []
    pos = out = 0
    # An axis is a run of atoms, each channel of an atom spanning ``inner`` consecutive positions (a flatten of C x
    # H x W gives inner = H * W). New channels follow their own atom's kept ones, not the end of the axis: the
    # rebuilt axis is again a run of atoms, each at its group's new width.
    for atom, inner in cg.atoms.expand(layout):
        gid = cg.group_of[cg.atoms.find(atom)]
        size = cg.atoms.size(atom)
        gp = plan.get(gid)
        keep = np.arange(size) if gp is None else np.asarray(gp.keep, dtype=np.int64)
        parts.append(pos + (keep[:, None] * inner + np.arange(inner)[None, :]).reshape(-1))
        out += keep.size * inner
        if gp is not None and gp.new:
            parts.append(np.full(gp.new * inner, -1, dtype=np.int64))
            for k in range(gp.new):
                for r in range(inner):
                    slots.append((out + k * inner + r, gid, k, r))
            out += gp.new * inner
        pos += size * inner
    source = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return AxisMap(source.astype(np.int64), slots, pos)
