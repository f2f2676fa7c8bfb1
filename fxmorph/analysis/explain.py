"""A table of channel groups a person can read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from fxmorph.meta import CAPTURE_KEY, REGIONS_KEY

if TYPE_CHECKING:
    from fxmorph.analysis.graph import ChannelGraph, Group

__all__ = ["explain_table"]


def _members(group: Group, limit: int = 4) -> str:
    """The layers that make the group's channels (``layer1.conv`` for ``layer1.conv.weight``), in order and
    without repeats; for a group no layer makes, the graph nodes that carry it."""
    names = list(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in group.producers))
    if not names:
        names = list(dict.fromkeys(t.name for t in group.tensors))
    shown = ", ".join(names[:limit])
    return shown + (f", +{len(names) - limit} more" if len(names) > limit else "")


def explain_table(cg: ChannelGraph, *, all_groups: bool = False) -> str:
    """Render every group with its id, size, state, producing layers and pin reasons."""
    rows = [("group", "size", "state", "made by", "pinned because")]
    hidden = 0
    for g in cg.groups:
        # pinned and without parameters: no layer to resize, so the row would say nothing a user can act on
        if not all_groups and g.pins and not g.params:
            hidden += 1
            continue
        state = "pinned" if g.pins else "free"
        reason = g.pinned or ""
        rows.append((str(g.id), str(g.size), state, _members(g), reason[:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]  # the last column (reasons) is left ragged
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    free = len(cg.free_groups)
    lines.append(f"{len(cg.groups)} groups, {free} free, {len(cg.groups) - free} pinned")
    if hidden:
        lines.append(f"({hidden} pinned groups without parameters hidden; explain(all_groups=True) shows them)")
    return "\n".join(lines + _capture_lines(cg.gm))


def _capture_lines(gm: fx.GraphModule) -> list[str]:
    """How the graph was captured; for regions, each region and each module left opaque, with why."""
    capture = gm.meta.get(CAPTURE_KEY)
    record = gm.meta.get(REGIONS_KEY)
    lines = [f"captured by {capture}"] if capture else []
    return lines + ([f"  {line}" for line in record.describe()] if record is not None else [])
