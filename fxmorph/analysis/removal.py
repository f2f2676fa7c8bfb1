"""Removing a group whole: which ops go with its channels, and whether that is exact.

A group at width 0 leaves empty every tensor that holds nothing but its channels along one dim (a dense layer's
new features). Such a tensor may be read only by ops whose own output goes too, or by an op that joins tensors along
that dim (``cat``, the op table's ``joins``), which leaves it out of its list. Then every op all of whose readers go,
goes: the dense layer's convolutions, norms and activations, and the concatenation that fed it. What they computed
for the other groups goes with them: the groups all of whose tensors go (the layer's bottleneck) ``vanish``, and any
plan for them is moot.

The model without those ops computes what the model computes with the group's channels zeroed at every tensor that
holds them: every op left reads the channels only where a concatenation put them, and a zeroed channel of a
concatenation's input reaches the layers after it as the channel left out does (the mask oracle).

A layer that reads such a tensor and nothing else (the projection closing an inverted residual, the second Linear
of a transformer's MLP) is left reading no channels: it computes its bias, and the residual branch it closes folds
into one value per channel, which the residual ``add`` takes broadcast (:mod:`fxmorph.analysis.removal_constant`;
``sources`` and ``folds``).

Refused, with the reason: a pinned group, a group kept at one width with others, a tensor of the group that the
model returns, that a split divides, or that an op reads and would outlive (a layer reading it beside other values);
a constant that an op cannot take at one value per channel (a layer, a reshape, a pooling, the output); an in-place
op that would go while the tensor it writes stays. A removal is ``droppable`` where write-back can express it in the
user's class: every module that goes sits in a container (``Sequential``, ``ModuleList``, ``ModuleDict``) and is
taken out of it, or returns a constant and is replaced by it, or fed only such a branch and is skipped; and no trial
found otherwise (:data:`~fxmorph.meta.KEPT_MODULES_KEY`, :mod:`fxmorph.api.removals`). Selection removes only such
groups.

Several groups removed together take the union of what each takes alone (:func:`combined`); an op that goes only
when several go together (a branch all of whose inputs were removed) stays, unread, so that the cost model, which
prices each removal alone, stays exact. A union that would leave some tensor empty that no single removal takes (a
concatenation of two removed groups) is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import fx

from fxmorph.analysis.ops import node_facts
from fxmorph.analysis.removal_constant import ConstantChain, Fold, constant_chain, fold_points
from fxmorph.analysis.rules._util import norm_dim
from fxmorph.analysis.rules.cat_split import join_dim
from fxmorph.capture.train_mode import module_paths
from fxmorph.meta import CONTAINERS_KEY, KEPT_MODULES_KEY, tensor_shape

if TYPE_CHECKING:
    from fxmorph.analysis.graph import ChannelGraph

__all__ = ["Removal", "combined", "find_removals", "joint_sets", "node_gates", "removed_modules", "tensor_gates"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removal:
    """What removing ``groups`` whole takes with them, or why it cannot be done (``refused``)."""

    groups: frozenset[int]
    dead: frozenset[str] = frozenset()
    """The names of the nodes that go: the ops that held the groups' channels alone, and every op all of whose
    readers go."""
    vanished: frozenset[int] = frozenset()
    """The other groups all of whose tensors go with them (their widths no longer matter)."""
    refused: str | None = None
    """Why the groups cannot go whole (``None`` where they can)."""
    sources: tuple[tuple[str, int], ...] = ()
    """The layers left reading no channels, which compute their bias (node name, the dim of its channels): the
    residual branch they close becomes a constant (:mod:`fxmorph.analysis.removal_constant`)."""
    folds: tuple[Fold, ...] = ()
    """Where that constant enters the graph again."""
    droppable: bool = False
    """Whether write-back can take what goes out of the user's class (see the module docstring); selection removes
    only such groups (:attr:`~fxmorph.analysis.cost.Costs.removable`)."""

    @property
    def possible(self) -> bool:
        """Whether the groups can be removed whole."""
        return self.refused is None


def _empty_dims(cg: ChannelGraph, gone: frozenset[int]) -> tuple[dict[str, int], str | None]:
    """The nodes whose output holds only channels of ``gone`` along some dim (node name -> that dim), or why a split
    of such a tensor refuses the removal."""
    empty: dict[str, int] = {}
    for name, value in cg.spaces.items():
        items = value if isinstance(value, tuple) else (value,)
        for k, spaces in enumerate(items):
            if not isinstance(spaces, dict):
                continue
            for dim, layout in spaces.items():
                pieces = cg.layout_groups(layout)
                if not pieces or any(g not in gone for g, _ in pieces):
                    continue
                if isinstance(value, tuple):
                    return {}, f"'{name}' splits its channels into {len(items)} tensors (piece {k} would be empty)"
                empty[name] = dim
    return empty, None


def _joins_along(cg: ChannelGraph, user: fx.Node, dim: int, node: fx.Node) -> bool:
    """Whether ``user`` joins tensors along ``dim`` and takes ``node`` as one of its list's items."""
    if not node_facts(user, cg.gm).joins or not user.args or not isinstance(user.args[0], list | tuple):
        return False
    shape = tensor_shape(user)
    if shape is None or node not in user.args[0]:
        return False
    return norm_dim(join_dim(user), len(shape)) == dim


def _readers_left(cg: ChannelGraph, empty: dict[str, int], dead: set[str], nodes: dict[str, fx.Node]) -> str | None:
    """Why an empty tensor would be read by an op that stays (``None`` where every reader goes or joins)."""
    for name, dim in empty.items():
        node = nodes[name]
        if node.op == "placeholder":
            return f"'{name}' is an input of the model"
        for user in node.users:
            if user.name in dead:
                continue
            if user.op == "output":
                return f"the model returns '{name}'"
            if not _joins_along(cg, user, dim, node):
                return f"'{user.name}' ({user.format_node()}) reads '{name}' and would be left without its channels"
    return None


def _goes(cg: ChannelGraph, start: Iterable[str]) -> set[str]:
    """The nodes that go: ``start`` (the empty tensors, the ops left constant), then (walking back) every node all
    of whose readers go."""
    dead = set(start)
    for node in reversed(cg.gm.graph.nodes):
        if node.op in ("output", "placeholder") or node.name in dead:
            continue
        if node.users and all(u.name in dead for u in node.users):
            dead.add(node.name)
    return dead


def _writes_kept(cg: ChannelGraph, dead: set[str]) -> str | None:
    """Why an in-place op that goes writes into a tensor that stays (``None`` where none does)."""
    for node in cg.gm.graph.nodes:
        if node.name not in dead or node.op == "get_attr":
            continue
        target = node.args[0] if node.args else None
        if isinstance(target, fx.Node) and target.name not in dead and node_facts(node, cg.gm).inplace:
            return f"'{node.name}' writes in place into '{target.name}', which stays"
    return None


def _vanished(cg: ChannelGraph, gone: frozenset[int], dead: set[str]) -> frozenset[int]:
    """The other groups all of whose tensors are outputs of nodes that go."""
    out = set()
    for group in cg.groups:
        # a tuple's item is named "node[k]": it goes with its node
        if group.id not in gone and group.tensors and all(m.name.split("[")[0] in dead for m in group.tensors):
            out.add(group.id)
    return frozenset(out)


def _refusal(cg: ChannelGraph, gid: int) -> str | None:
    """Why group ``gid`` cannot go whole for reasons of its own (pinned, or kept at one width with others)."""
    group = cg.groups[gid]
    if group.pins:
        return f"it is pinned ({group.pinned})"
    if any(gid in c for c in cg.same_width):
        return "the model's class keeps it at one width with other groups"
    return None


def find_removals(cg: ChannelGraph) -> dict[int, Removal]:
    """What removing each group of ``cg`` whole takes with it, or why it cannot go."""
    alone: dict[int, dict[str, int]] = {}  # group -> the tensors holding it alone (node name -> dim)
    split: dict[int, str] = {}  # group -> a node splitting it off into a tensor of its own
    for name, value in cg.spaces.items():
        items = value if isinstance(value, tuple) else (value,)
        for spaces in items:
            for dim, layout in spaces.items() if isinstance(spaces, dict) else ():
                pieces = {g for g, _ in cg.layout_groups(layout)}
                if len(pieces) == 1:
                    (g,) = pieces
                    if isinstance(value, tuple):
                        split.setdefault(g, name)
                    else:
                        alone.setdefault(g, {})[name] = dim
    out = {}
    index = _ModuleIndex.of(cg.gm)
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    for group in cg.groups:
        gid = group.id
        reason = _refusal(cg, gid)
        if reason is None and gid in split:
            reason = f"'{split[gid]}' splits its channels off into a tensor of their own"
        removal = (
            Removal(frozenset({gid}), refused=reason) if reason else _removal(cg, gid, alone.get(gid, {}), nodes, index)
        )
        if removal.possible:
            removal = replace(removal, droppable=index.droppable(removal))
        out[gid] = removal
    return out


@dataclass(frozen=True)
class _ModuleIndex:
    """Per module path of a graph, the nodes that run in its forward or call it; and the paths of its containers."""

    nodes: dict[str, list[str]]
    containers: frozenset[str]
    kept: frozenset[str]
    """Module paths write-back was found by trial not to take out (:data:`~fxmorph.meta.KEPT_MODULES_KEY`)."""

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _ModuleIndex:
        nodes: dict[str, list[str]] = {}
        for node in gm.graph.nodes:
            for owner in {owner for path in module_paths(node) for owner in _owners(path)}:
                nodes.setdefault(owner, []).append(node.name)
        # tracing recorded them: the GraphModule's own containers are plain modules
        return cls(nodes, frozenset(gm.meta.get(CONTAINERS_KEY, ())), frozenset(gm.meta.get(KEPT_MODULES_KEY, ())))

    def removed(self, dead: frozenset[str]) -> tuple[str, ...]:
        """The top-most module paths all of whose nodes are among ``dead``."""
        gone = {path for path, names in self.nodes.items() if all(n in dead for n in names)}
        # a path goes whole where no module above it does
        return tuple(sorted(p for p in gone if not any(o in gone for o in _owners(p)[1:])))

    def droppable(self, removal: Removal) -> bool:
        """Whether write-back can take what ``removal`` takes out of the user's class: every top-most module that
        goes sits in a container (:data:`~fxmorph.meta.CONTAINERS_KEY`), or returns a constant (replaced by one),
        or, beside such a module, is skipped; and none was found by trial not to be (:data:`KEPT_MODULES_KEY`)."""
        paths = self.removed(removal.dead)
        folded = {f.module for f in removal.folds}
        if not paths or None in folded or any(p in self.kept for p in paths):
            return False
        if folded:
            # beside a module replaced by the constant, the modules that fed only it are skipped (a transformer's
            # norm before its MLP): the forward calls them, and what they return goes nowhere
            return True
        return all(p.rpartition(".")[0] in self.containers for p in paths)


def _removal(
    cg: ChannelGraph, gid: int, empty: dict[str, int], nodes: dict[str, fx.Node], index: _ModuleIndex
) -> Removal:
    """What removing group ``gid`` takes with it, where ``empty`` are the tensors holding it alone (``nodes``: the
    graph's nodes by name)."""
    gone = frozenset({gid})
    if not empty:
        return Removal(gone, refused="no tensor holds its channels alone")
    joined = {u.name for name, dim in empty.items() for u in nodes[name].users if _joins_along(cg, u, dim, nodes[name])}
    walked = _goes(cg, empty)
    found = constant_chain(cg, empty, joined | walked)  # a squeeze-excitation on the group goes with it
    if isinstance(found, str):
        return Removal(gone, refused=found)
    # cheap first: without a concatenation or a layer left constant, the channels reach the output or a layer
    if not joined and not found.sources:
        return Removal(gone, refused="no concatenation joins its channels with others (only one can leave them out)")
    dead, folds = _constant_dead(cg, empty, found, index) if found.chain else (walked, ())
    reason = _readers_left(cg, empty, dead, nodes) or _writes_kept(cg, dead)
    if reason is not None:
        return Removal(gone, refused=reason)
    return Removal(gone, frozenset(dead), _vanished(cg, gone, dead), sources=tuple(found.sources.items()), folds=folds)


def _constant_dead(
    cg: ChannelGraph, empty: dict[str, int], found: ConstantChain, index: _ModuleIndex
) -> tuple[set[str], tuple[Fold, ...]]:
    """The nodes that go with the empty tensors and the ops they leave constant, and where the constant enters the
    graph again: the ops of the chain outside every module that goes stay (they compute on the constant)."""
    dead = _goes(cg, (*empty, *found.chain))
    removed = {path: index.nodes[path] for path in index.removed(frozenset(dead))}
    folds, kept = fold_points(cg.gm.graph, found.chain, dead, removed)
    return (_goes(cg, (*empty, *(found.chain - kept))) if kept else dead), folds


def joint_sets(cg: ChannelGraph) -> tuple[frozenset[int], ...]:
    """The sets of several groups, each removable alone, that some tensor holds alone along a dim: removing all of
    one set together would leave that tensor empty."""
    out = set()
    for _, _, layout in cg.tensor_layouts():
        pieces = frozenset(g for g, _ in cg.layout_groups(layout))
        if len(pieces) > 1 and all(cg.removal(g).possible for g in pieces):
            out.add(pieces)
    return tuple(sorted(out, key=sorted))


def combined(cg: ChannelGraph, gids: Iterable[int]) -> Removal:
    """The removal of every group of ``gids`` together: the union of what each takes alone (see the module
    docstring), refused where one of them cannot go or together they leave a tensor empty that none takes alone."""
    gone = frozenset(gids)
    if not gone:
        return Removal(gone)
    parts = [cg.removal(g) for g in sorted(gone)]
    for part in parts:
        if not part.possible:
            (g,) = part.groups
            return Removal(gone, refused=f"group {g} cannot be removed whole: {part.refused}")
    dead = set().union(*(p.dead for p in parts))
    empty, reason = _empty_dims(cg, gone)
    left = sorted(set(empty) - dead)
    if reason is None and left:
        reason = f"together they leave '{left[0]}' with no channels, which none of them takes alone"
    if reason is not None:
        return Removal(gone, refused=reason)
    sources = tuple(sorted({s for p in parts for s in p.sources}))
    # a constant that another of the removals takes with it (no reader of it stays) folds nowhere
    folds = tuple(sorted({f for p in parts for f in p.folds if _read_by_kept(cg, f, dead)}, key=lambda f: f.node))
    return Removal(gone, frozenset(dead), _vanished(cg, gone, dead), sources=sources, folds=folds)


def _read_by_kept(cg: ChannelGraph, fold: Fold, dead: set[str]) -> bool:
    """Whether a node that stays reads the value of ``fold``."""
    node = next(n for n in cg.gm.graph.nodes if n.name == fold.node)
    return any(u.name not in dead for u in node.users)


def node_gates(cg: ChannelGraph) -> dict[str, frozenset[int]]:
    """Per node that some group's removal takes with it, the groups whose removal alone takes it."""
    gates: dict[str, set[int]] = {}
    for group in cg.free_groups:
        for name in cg.removal(group.id).dead:
            gates.setdefault(name, set()).add(group.id)
    return {name: frozenset(gids) for name, gids in gates.items()}


def tensor_gates(cg: ChannelGraph, gates: dict[str, frozenset[int]]) -> dict[str, frozenset[int]]:
    """Per parameter or buffer path that some group's removal takes with it (every node reading it goes: the call
    of its module, or its ``get_attr``), the groups whose removal alone takes it."""
    readers: dict[str, list[str]] = {}  # module or tensor path -> the nodes that read it
    for node in cg.gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            readers.setdefault(str(node.target), []).append(node.name)
    aliases: dict[str, list[str]] = {}
    for alias, first in cg.ties.items():
        aliases.setdefault(first, []).append(alias)
    out = {}
    for path, _ in (*cg.gm.named_parameters(), *cg.gm.named_buffers()):
        names = [n for p in (path, *aliases.get(path, ())) for owner in _owners(p) for n in readers.get(owner, [])]
        if names:
            common = frozenset.intersection(*(gates.get(n, frozenset()) for n in names))
            if common:
                out[path] = common
    return out


def _owners(path: str) -> list[str]:
    """``path`` and every module path above it: ``a.b.weight`` -> ``a.b.weight``, ``a.b``, ``a``."""
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def removed_modules(gm: fx.GraphModule, dead: frozenset[str]) -> tuple[str, ...]:
    """The top-most module paths of ``gm`` all of whose nodes (the calls of it and of the modules under it, and the
    ops its ``forward`` runs) are among the nodes ``dead``: a dense layer whose every op goes, rather than each of its
    norms and convolutions, but not a dense block whose final concatenation stays."""
    return _ModuleIndex.of(gm).removed(dead)
