"""Where a channel group lives in the graph, for ``remove-dead`` and its constant propagation.

:class:`GroupIndex` records, per graph node, the groups its value carries and on which dims, and caches
per-channel facts of the weights (which rows are zero, their sums). :func:`reader_sites` lists where the
group is read through the input columns of a layer's weight: the only places, in a growable group, where a
channel's value reaches the output.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, Group
from fxmorph.analysis.ops import OpKind, node_facts

__all__ = ["GroupIndex", "Site", "as_numpy", "reader_sites"]


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a numpy array (bfloat16, which numpy lacks, as float32)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


class GroupIndex:
    """Per node, the groups its value carries and on which dims (built once per channel graph)."""

    def __init__(self, cg: ChannelGraph) -> None:
        self.cg = cg
        self.dims: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for name, dim, layout in cg.tensor_layouts():
            node = name.split("[", 1)[0]  # an element of a tuple-valued node counts for the node
            # Once per layout: a group that appears twice in it (``cat([x, x])``) is still one dim. A dim of -1
            # marks a group carried inside a tuple element, which ``dim()`` then refuses to name.
            for gid in dict.fromkeys(g for g, _ in cg.layout_groups(layout)):
                self.dims[node][gid].append(dim if node == name else -1)
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)  # module path -> the nodes calling it
        for n in cg.gm.graph.nodes:
            if n.op == "call_module":
                self.calls[str(n.target)].append(n)
        self._rows: dict[tuple[str, int, str], np.ndarray] = {}

    def rows(self, path: str, dim: int, what: str) -> np.ndarray:
        """Per index of ``dim`` of the tensor at ``path``: whether its slice is all zero (``"zero"``) or
        the slice's sum (``"sum"``, float64); computed once per pass (a weight is read by many groups)."""
        key = (path, dim, what)
        if key not in self._rows:
            # numpy: torch's small reductions are slow when other processes hold the cores
            tensor = as_numpy(_fetch(self.cg.gm, path))
            flat = np.moveaxis(tensor, dim, 0).reshape(tensor.shape[dim], -1)
            self._rows[key] = ~flat.any(axis=1) if what == "zero" else flat.sum(axis=1, dtype=np.float64)
        return self._rows[key]

    def dim(self, name: str, gid: int) -> int | None:
        """The one tensor dim of node ``name`` that carries group ``gid`` (None: none, several, a tuple)."""
        dims = self.dims.get(name, {}).get(gid, [])
        return dims[0] if len(dims) == 1 and dims[0] >= 0 else None

    def carries(self, name: str, gid: int) -> bool:
        """Whether node ``name`` (or an element of it) carries group ``gid``."""
        return gid in self.dims.get(name, {})


@dataclass(frozen=True)
class Site:
    """A layer reading the group through its weight's input columns: ``module`` reads node ``node``."""

    module: str
    node: str
    dim: int


def reader_sites(index: GroupIndex, group: Group) -> list[Site] | None:
    """Every place the group is read through a weight (``"in"`` slices), as the layer and the node it
    reads; None where one cannot be named (a reader that is not a Linear or convolution called on the
    group, such as attention's internal projections): values then cannot prove a channel dead."""
    sites: list[Site] = []
    for member in group.consumers:
        owner, _, leaf = member.name.rpartition(".")
        # A consumer that is not the weight of a called module (a parameter the graph reads itself) cannot be named
        # as a site.
        if leaf != "weight" or not index.calls.get(owner):
            return None
        for node in index.calls[owner]:
            if node_facts(node, index.cg.gm).kind is not OpKind.LAYER:
                return None
            x = node.args[0] if node.args else None
            dim = index.dim(x.name, group.id) if isinstance(x, fx.Node) else None
            if dim is None:
                return None
            sites.append(Site(owner, x.name, dim))
    return list(dict.fromkeys(sites)) or None  # no site at all proves nothing either


def _fetch(root: nn.Module, target: str) -> Any:
    """The attribute at the dotted ``target`` of ``root`` (None where a part is missing)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
