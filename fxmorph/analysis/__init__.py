"""Channel analysis: which channels are coupled, and which may change (never edits a tensor)."""

from fxmorph.analysis.atoms import AtomTable, Layout, Pin
from fxmorph.analysis.context import ArgSlot, ModuleAttr, Role, ScaleKeptRows, ScaleRows
from fxmorph.analysis.graph import ChannelGraph, Group, Member, build_channel_graph

__all__ = [
    "ArgSlot",
    "AtomTable",
    "ChannelGraph",
    "Group",
    "Layout",
    "Member",
    "ModuleAttr",
    "Pin",
    "Role",
    "ScaleKeptRows",
    "ScaleRows",
    "build_channel_graph",
]
