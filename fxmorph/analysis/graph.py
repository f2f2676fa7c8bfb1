"""The channel graph: groups of coupled channels, their members, parameters and pins."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import fx, nn

from fxmorph.analysis.atoms import AtomTable, Layout, Pin
from fxmorph.analysis.context import Binding, CostTerm, Rewrite, Role, RuleContext
from fxmorph.analysis.kernels import KernelKind
from fxmorph.analysis.ops import lookup
from fxmorph.analysis.removal import Removal, find_removals
from fxmorph.capture.config_sizes import ConfigSizes
from fxmorph.errors import AnalysisError
from fxmorph.meta import CONFIG_SIZES_KEY, TRAIN_READERS_KEY

__all__ = ["ChannelGraph", "Group", "Member", "build_channel_graph"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One place a group appears: a tensor axis (``kind='tensor'``, no role) or a parameter axis
    (``kind='param'``, with the :class:`~fxmorph.analysis.context.Role` of its binding)."""

    kind: str
    name: str
    dim: int
    role: Role | None = None


@dataclass
class Group:
    """A set of channels that must keep the same index set everywhere they appear.

    Attributes:
        id: position of the group in :attr:`ChannelGraph.groups`.
        size: number of channels.
        tensors: tensor axes (graph node, dim) the group's channels live in.
        params: parameter and buffer axes indexed by the group.
        pins: why the group cannot change width (empty if it can).
        grow_pins: why channels cannot be added to the group without changing the function.
        span: how many channels of the layers each of the group's elements stands for: 1 for plain channels,
            the head width for a group of whole attention heads (the fewest any parameter holds it by).
        copies: how many times one axis holds the group's channels, the most over its members: the embedding that
            ``nn.MultiheadAttention`` splits into heads is held once per head (and per projection in ``in_proj``),
            so one element is that many channels of the axis; the rounding grid counts those channels. 1 where a
            grouped convolution reads the group: it blocks each of its groups' channels apart.
    """

    id: int
    size: int
    tensors: list[Member] = field(default_factory=list)
    params: list[Member] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)
    grow_pins: list[Pin] = field(default_factory=list)
    span: int = 1
    copies: int = 1

    @property
    def growable(self) -> bool:
        """True if channels may be added with the function kept."""
        return not self.pins and not self.grow_pins

    @property
    def pinned(self) -> str | None:
        """Human-readable reason the group is frozen, or ``None`` if it may change."""
        return "; ".join(dict.fromkeys(str(p) for p in self.pins)) if self.pins else None

    @property
    def producers(self) -> list[Member]:
        """Parameter axes that define the channels (weight rows, biases, norm parameters)."""
        return [p for p in self.params if p.role == Role.OUT]

    @property
    def consumers(self) -> list[Member]:
        """Parameter axes that read the channels (weight columns of the next layers)."""
        return [p for p in self.params if p.role == Role.IN]


@dataclass
class ChannelGraph:
    """Result of the channel analysis of one traced GraphModule.

    ``groups`` lists every group; ``graph`` is a networkx graph linking groups to the tensors and
    parameters they index. The layouts (how every channel axis is made of groups) drive surgery,
    the cost model and the mask oracle.
    """

    gm: fx.GraphModule
    groups: list[Group]
    atoms: AtomTable
    group_of: dict[int, int]
    spaces: dict[str, Any]
    bindings: dict[tuple[str, int], Binding]
    rewrites: list[Rewrite]
    costs: list[CostTerm]
    graph: nx.Graph = field(default_factory=nx.Graph)
    source: nn.Module | None = None
    """The user's model ``gm`` was traced from, when :func:`fxmorph.analyze` traced it: ``resize`` gives its
    result back as that model's class (the graph shares its modules and tensors, so this costs nothing)."""
    leaf_modules: tuple[type | str, ...] = ()
    """The extra leaf modules the trace used (a re-trace for write-back uses them too)."""
    ties: dict[str, str] = field(default_factory=dict)
    """Tied tensors: each further path of a tensor held under several names -> its first path, the one its
    bindings name. Surgery slices the tensor once and puts the one new tensor at every path."""
    same_width: list[list[int]] = field(default_factory=list)
    """Classes of groups (of one size) that the model's class states as one width (the pieces of
    ``split(x, self.width)``): width selection keeps each class at one width, so the result comes back as the
    class. Not a constraint of the graph: any plan is a valid graph."""
    removals: dict[int, Removal] = field(default_factory=dict, repr=False, compare=False)
    """What removing each group whole takes with it, found for every group on first asking (:meth:`removal`)."""

    def layout_groups(self, layout: Layout) -> list[tuple[int, int]]:
        """``(group id, inner)`` for every piece of a layout, in order."""
        return [(self.group_of[self.atoms.find(a)], inner) for a, inner in self.atoms.expand(layout)]

    def removal(self, gid: int) -> Removal:
        """What removing group ``gid`` whole takes with it, or why it cannot go (:mod:`fxmorph.analysis.removal`)."""
        if not self.removals:
            self.removals = find_removals(self)
        return self.removals[gid]

    @property
    def free_groups(self) -> list[Group]:
        """Groups that may change width."""
        return [g for g in self.groups if not g.pins]

    def tensor_layouts(self) -> Iterator[tuple[str, int, Layout]]:
        """Every (node name, dim, layout) of a tensor value in the graph."""
        for name, value in self.spaces.items():
            yield from _walk_spaces(name, value)

    def explain(self, *, all_groups: bool = False) -> str:
        """A table of groups: id, size, state, members, pins. Hides pinned groups without parameters
        unless ``all_groups``."""
        from fxmorph.analysis.explain import explain_table

        return explain_table(self, all_groups=all_groups)


def _walk_spaces(name: str, value: Any) -> Iterator[tuple[str, int, Layout]]:
    """``(name, dim, layout)`` of a node's spaces; a tuple-valued node's items are named ``name[k]``."""
    if isinstance(value, dict):
        for dim, layout in value.items():
            yield name, dim, layout
    elif isinstance(value, tuple):
        for k, v in enumerate(value):
            yield from _walk_spaces(f"{name}[{k}]", v)


_ROUNDS = 4
"""At most this many walks: each one can only add reshapes to those that keep their blocks whole."""


def build_channel_graph(gm: fx.GraphModule) -> ChannelGraph:
    """Walk ``gm``, apply every node's rule, and collect the groups.

    A reshape that splits channels into blocks (an attention's heads x head width) first shares the inner
    dim across blocks. Where that inner dim ends up pinned (rotary embeddings read the head width) or
    unwanted (a class states one head width, and a default softmax scale reads it), the graph is walked again
    with that reshape keeping its blocks whole instead: whole heads go, and the head width stays. A walk is kept
    only where it frees at least as many channels of the layers as the one before.
    """
    ctx = _walk(gm, frozenset())
    best = _collect(ctx)
    for _ in range(_ROUNDS - 1):
        more = ctx.whole_blocks | _rather_whole(ctx)
        if more == ctx.whole_blocks:
            break
        logger.debug("channel analysis again, keeping the blocks of %s whole", sorted(more - ctx.whole_blocks))
        ctx = _walk(gm, more)
        cg = _collect(ctx)
        if _free_channels(cg) < _free_channels(best):
            # whole blocks pinned more than they freed (a head width sized from the residual stream's width)
            break
        best = cg
    return best


def _free_channels(cg: ChannelGraph) -> int:
    """How many channels of the layers the free groups hold (an element of a group of heads is a head)."""
    return sum(g.size * g.span for g in cg.free_groups)


def _rather_whole(ctx: RuleContext) -> frozenset[str]:
    """The reshapes whose shared inner dim is pinned, or holds a layout a rule would rather not change."""
    atoms = ctx.atoms
    unwanted = {atoms.find(a) for layout in ctx.unwanted for a, _ in atoms.expand(layout)}
    chosen = set()
    for name, shared in ctx.splits.items():
        roots = {atoms.find(a) for a, _ in atoms.expand(shared)}
        frozen = any(p.kind == "frozen" for root in roots for p in atoms.pins(root))
        if frozen or roots & unwanted:
            chosen.add(name)
    return frozenset(chosen)


def _walk(gm: fx.GraphModule, whole: frozenset[str]) -> RuleContext:
    """One walk over ``gm`` in topological order, with ``whole`` the reshapes that keep their blocks whole."""
    ctx = RuleContext(gm, whole_blocks=whole)
    # fx keeps nodes in topological order, so every input's spaces are in ctx.env before its users run
    for node in gm.graph.nodes:
        ctx.node = node  # pins and rewrites recorded by the rule name this node
        rule = lookup(node, gm)
        try:
            ctx.env[node] = rule(ctx, node)
        except Exception as exc:
            raise AnalysisError(
                f"channel rule '{getattr(rule, '__name__', rule)}' failed on node '{node.name}' "
                f"({node.format_node()}): {type(exc).__name__}: {exc}. This is a bug in fxmorph; as a "
                "workaround, mark the module holding this op as a leaf so its channels are pinned."
            ) from exc
    _pin_train_readers(ctx, gm)
    _pin_unread_sizes(ctx, gm)
    ctx.pin_partial_ties()
    return ctx


def _pin_train_readers(ctx: RuleContext, gm: fx.GraphModule) -> None:
    """Pin the values that modules running only in train mode read (recorded by tracing): the graph, traced in
    eval mode, does not hold those modules, so their inputs must keep their widths."""
    readers = gm.meta.get(TRAIN_READERS_KEY) or {}
    for node in gm.graph.nodes:
        if node.name in readers:
            ctx.node = node
            ctx.pin_all(node, f"read by {readers[node.name]}, which runs only in train mode")


def _pin_unread_sizes(ctx: RuleContext, gm: fx.GraphModule) -> None:
    """Pin the parameter dims that a config field sizes along with a tensor the graph never reads (recorded by
    tracing, see :mod:`fxmorph.capture.config_sizes`): code outside the graph reads that tensor, and which of
    its channels would go with which group is unknown."""
    sizes = gm.meta.get(CONFIG_SIZES_KEY)
    if not isinstance(sizes, ConfigSizes) or not sizes.unread:
        return
    ctx.node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")  # the pins name the graph's end
    for binding in list(ctx.bindings.values()):
        fields = sorted(sizes.fields_of(binding.target, binding.dim) & sizes.unread.keys())
        if fields and binding.layout is not None:
            tensor = sizes.unread[fields[0]]
            ctx.pin(
                binding.layout,
                f"{sizes.class_name}'s config field {fields[0]} also sizes '{tensor}', which the traced forward "
                "never reads (code outside the trace, such as a train-mode branch, does); a config that leaves it "
                "out (Wav2Vec2: mask_time_prob=0 and mask_feature_prob=0) frees these channels",
            )


def _collect(ctx: RuleContext) -> ChannelGraph:
    """Number the classes of leaf atoms as groups, in first-seen order, and record where each appears."""
    atoms = ctx.atoms
    spaces = {node.name: value for node, value in ctx.env.items() if value is not None}
    group_of: dict[int, int] = {}
    groups: list[Group] = []

    def group_for(atom: int) -> Group:
        """The group of ``atom``'s class, created with its pins sorted by kind on first sight."""
        root = atoms.find(atom)
        if root not in group_of:
            group_of[root] = len(groups)
            pins = atoms.pins(atom)
            frozen = [p for p in pins if p.kind == "frozen"]
            no_grow = [p for p in pins if p.kind != "frozen"]
            groups.append(Group(len(groups), atoms.size(atom), pins=frozen, grow_pins=no_grow))
        return groups[group_of[root]]

    graph = nx.Graph()
    for name, value in spaces.items():
        for member_name, dim, layout in _walk_spaces(name, value):
            _add_members(atoms, layout, group_for, Member("tensor", member_name, dim), graph)
    spans: dict[int, int] = {}
    for binding in ctx.bindings.values():
        member = Member("param", binding.target, binding.dim, binding.role)
        _add_members(atoms, binding.layout, group_for, member, graph)
        for atom, inner in atoms.expand(binding.layout):
            gid = group_for(atom).id
            spans[gid] = min(spans.get(gid, inner), inner)
    for gid, span in spans.items():
        groups[gid].span = span
    layouts = [layout for value in spaces.values() for _, _, layout in _walk_spaces("", value)]
    for layout in [*layouts, *(b.layout for b in ctx.bindings.values())]:
        _count_copies(atoms, layout, group_for)
    for term in ctx.costs:
        if term.kernel is not None and term.kernel.kind is KernelKind.CONV and term.kernel.groups > 1:
            # a grouped convolution blocks each of its groups' channels apart: a copy per group counts alone
            for axis in term.axes:
                for atom, _ in () if isinstance(axis, int) else atoms.expand(axis):
                    group_for(atom).copies = 1
    # the cost model indexes every factor by group, so a class only a cost term names needs an id too
    for term in ctx.costs:
        for layout in term.factors:
            for atom, _ in atoms.expand(layout):
                group_for(atom)
    cg = ChannelGraph(ctx.gm, groups, atoms, group_of, spaces, ctx.bindings, ctx.rewrites, ctx.costs, graph)
    cg.ties = dict(ctx.ties)
    cg.same_width = _same_width_classes(cg, ctx.same_width)
    logger.debug("channel analysis: %d groups, %d free", len(groups), len(cg.free_groups))
    return cg


def _same_width_classes(cg: ChannelGraph, requests: list[list[Layout]]) -> list[list[int]]:
    """The groups of each request for one width, where every layout is one group and the groups are of one size
    and distinct (a piece made of several groups, or pieces already one group, ask nothing)."""
    classes = []
    for layouts in requests:
        pieces = [cg.layout_groups(layout) for layout in layouts]
        if any(len(p) != 1 for p in pieces):
            continue
        ids = sorted({p[0][0] for p in pieces})
        if len(ids) > 1 and len({cg.groups[g].size for g in ids}) == 1:
            classes.append(ids)
    return classes


def _count_copies(atoms: AtomTable, layout: Layout, group_for: Any) -> None:
    """Raise each group's :attr:`Group.copies` to the times ``layout`` holds its channels."""
    held: dict[int, int] = {}
    groups: dict[int, Group] = {}
    for atom, _ in atoms.expand(layout):
        group = group_for(atom)
        groups[group.id] = group
        # every atom of a group has the group's size: each piece is one full copy of its channels
        held[group.id] = held.get(group.id, 0) + atoms.size(atom)
    for gid, channels in held.items():
        groups[gid].copies = max(groups[gid].copies, channels // max(groups[gid].size, 1))


def _add_members(atoms: AtomTable, layout: Layout, group_for: Any, member: Member, graph: nx.Graph) -> None:
    """Add ``member`` to every group in ``layout``, once per group (a layout repeats a group per head)."""
    seen: set[int] = set()
    for atom, _ in atoms.expand(layout):
        group = group_for(atom)
        if group.id in seen:
            continue
        seen.add(group.id)
        (group.tensors if member.kind == "tensor" else group.params).append(member)
        graph.add_edge(("group", group.id), (member.kind, member.name, member.dim))
