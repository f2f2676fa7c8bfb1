"""The state a channel rule reads and writes while the analysis walks the graph."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeAlias

from torch import fx, nn

from fxmorph.analysis.atoms import AtomTable, Layout, Pin
from fxmorph.analysis.kernels import Kernel
from fxmorph.meta import tensor_shape

__all__ = [
    "ArgSlot",
    "Binding",
    "CostTerm",
    "Location",
    "Measure",
    "ModuleAttr",
    "Rewrite",
    "Role",
    "RuleContext",
    "ScaleKeptRows",
    "ScaleRows",
    "Spaces",
    "Taint",
]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10 has no StrEnum: a str mixin that formats as its value behaves the same here

    class StrEnum(str, Enum):
        """``enum.StrEnum`` for Python 3.10: members are strings and print as their value."""

        def __str__(self) -> str:
            return str(self.value)


logger = logging.getLogger(__name__)


Spaces = dict[int, Layout]
"""Channel layouts of one tensor value, by (non-negative) dimension. Missing dims are fixed."""

Measure = Callable[[Layout], int]
"""Width of a layout under some plan."""


@dataclass(frozen=True)
class Taint:
    """A Python number computed from the size of channel dims.

    ``divisor`` is set when the number is exactly ``width(layouts[0]) // divisor`` (``x.size(1)``,
    ``x.size(1) // 2``); ``None`` means any other arithmetic, which only pins.
    """

    layouts: tuple[Layout, ...]
    divisor: int | None = 1


class Role(StrEnum):
    """How a parameter or buffer axis relates to the channels that index it.

    ``OUT`` where the tensor defines the channels (weight rows, biases, norm affine parameters and
    statistics, parameters used directly); ``IN`` where it reads them (weight columns of a consumer).
    New channels get zero values in ``IN`` slices so the function is kept. A ``StrEnum``: a role
    compares equal to ``"out"`` and ``"in"``.
    """

    IN = "in"
    OUT = "out"


@dataclass(frozen=True)
class Binding:
    """One dimension of one parameter or buffer indexed by a channel layout, in a :class:`Role`."""

    target: str
    dim: int
    layout: Layout
    role: Role


@dataclass(frozen=True)
class ArgSlot:
    """A node argument: its position (``int``) or keyword (``str``), and with ``item`` one entry of it
    when the argument is a list or tuple (``view(x, [n, c, -1])`` has its channel size at ``ArgSlot(1, 1)``)."""

    arg: int | str
    item: int | None = None


@dataclass(frozen=True)
class ModuleAttr:
    """An attribute of the module the node calls, as a dotted path below it (``"out_proj.in_features"``)."""

    path: str


@dataclass(frozen=True)
class ScaleRows:
    """A fix-up of rebuilt tensors: multiply block ``chunk`` of ``chunks`` equal blocks of rows (dim 0)
    of each tensor at ``paths`` (from the root module; a path holding no tensor is skipped) by a factor.

    Packed q/k/v projections record ``ScaleRows(paths)`` (the query block, the first third) so the
    softmax keeps the temperature of the original head dim when the head dim changes.
    """

    paths: tuple[str, ...]
    chunks: int = 3
    chunk: int = 0


@dataclass(frozen=True)
class ScaleKeptRows:
    """A fix-up of rebuilt tensors: multiply the rows (dim 0) of each tensor at ``paths`` that were the original
    rows ``rows`` by a factor (a path holding no tensor is skipped). ``layout`` is the channel layout of those
    rows, which tells where the plan puts the rows it keeps.

    The attention rule records it where the default softmax scale of a changed head width is folded into the
    parameters that make the query (see :mod:`fxmorph.analysis.rules.query_fold`).
    """

    paths: tuple[str, ...]
    rows: tuple[int, ...]
    layout: Layout


Location: TypeAlias = ArgSlot | ModuleAttr | ScaleRows | ScaleKeptRows
"""Where a :class:`Rewrite` applies; surgery dispatches on the type."""


@dataclass(frozen=True)
class Rewrite:
    """A constant baked into the graph (or a fix-up of rebuilt tensors) that depends on channel widths.

    ``value`` computes, from a :data:`Measure` of the new widths, what goes at ``location``: the new
    argument (:class:`ArgSlot`), the new attribute value (:class:`ModuleAttr`), or the factor
    (:class:`ScaleRows`, :class:`ScaleKeptRows`). Analysis only records it; :mod:`fxmorph.surgery.apply` performs it.
    """

    node: str
    location: Location
    value: Callable[[Measure], Any]


@dataclass(frozen=True)
class CostTerm:
    """``coef * prod(width(f) for f in factors)`` FLOPs; a factor is a layout or a fixed integer.

    ``kernel``: the runtime kernel that runs the op, where the rule knows it, with its ``axes`` (the widths its
    latency table spans: a layout, or a fixed width), see :mod:`fxmorph.analysis.kernels`."""

    node: str
    coef: int
    factors: tuple[Layout, ...]
    kernel: Kernel | None = None
    axes: tuple[Layout | int, ...] = ()


def tied_paths(root: nn.Module) -> dict[str, str]:
    """Every further path of a parameter or buffer held under several names -> its first path."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    named = (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False))
    for path, tensor in named:
        if id(tensor) in first:
            ties[path] = first[id(tensor)]
        else:
            first[id(tensor)] = path
    return ties


@dataclass
class RuleContext:
    """What rules see: the atom table, the spaces of earlier nodes, and the records they add."""

    gm: fx.GraphModule
    atoms: AtomTable = field(default_factory=AtomTable)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    bindings: dict[tuple[str, int], Binding] = field(default_factory=dict)
    fixed: set[tuple[str, int]] = field(default_factory=set)
    rewrites: list[Rewrite] = field(default_factory=list)
    costs: list[CostTerm] = field(default_factory=list)
    node: fx.Node | None = None
    ties: dict[str, str] = field(default_factory=dict)
    """Tied tensors: every further path of a tensor the graph holds under several names -> its first path.
    Each use binds the first path, so the uses' channels are one set and surgery slices the tensor once."""
    used_dims: set[tuple[str, int]] = field(default_factory=set)
    """``(path as used, dim)`` of every binding, to find a dim one name of a tied tensor indexes and another not."""
    whole_blocks: frozenset[str] = frozenset()
    """Reshapes (by node name) that split a channel dim into blocks and keep each block whole (an attention's
    heads), rather than sharing the inner dim across the blocks (its head width); see :meth:`split_choice`."""
    splits: dict[str, Layout] = field(default_factory=dict)
    """Reshapes that shared the inner dim across blocks -> the shared layout: the analysis may take them again
    with whole blocks when that layout ends up pinned or unwanted."""
    unwanted: list[Layout] = field(default_factory=list)
    """Layouts a rule can change only at a price (see :meth:`prefer_whole`)."""
    same_width: list[list[Layout]] = field(default_factory=list)
    """Layouts whose widths the model's class states as one number (the pieces of ``split(x, self.width)``):
    kept equal, the result comes back as the class (see :meth:`keep_equal`)."""

    def __post_init__(self) -> None:
        self.ties = tied_paths(self.gm)

    # -- reading -----------------------------------------------------------------------------------
    def spaces(self, arg: Any) -> Spaces:
        """Channel layouts of a tensor argument (empty for constants or unknown values)."""
        value = self.env.get(arg) if isinstance(arg, fx.Node) else None
        # env also holds Taints (numbers) and tuples (tuple-valued nodes): neither is a tensor's spaces
        return value if isinstance(value, dict) else {}

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        """Propagated shape of a tensor argument."""
        return tensor_shape(arg) if isinstance(arg, fx.Node) else None

    def module(self) -> nn.Module:
        """The module called by the current ``call_module`` node."""
        assert self.node is not None
        return self.gm.get_submodule(str(self.node.target))

    def here(self) -> str:
        """Name of the current node, for pins."""
        return self.node.name if self.node is not None else "?"

    def layouts_in(self, value: Any) -> Iterator[Layout]:
        """Every layout (and tainted size) reachable from an argument structure."""
        if isinstance(value, fx.Node):
            yield from self._layouts_of(self.env.get(value))
        elif isinstance(value, list | tuple):
            for v in value:
                yield from self.layouts_in(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from self.layouts_in(v)

    def _layouts_of(self, value: Any) -> Iterator[Layout]:
        """Layouts of one env value: a tensor's spaces, a Taint's sources, or those of a tuple's items."""
        if isinstance(value, dict):
            yield from value.values()
        elif isinstance(value, Taint):
            yield from value.layouts
        elif isinstance(value, tuple):
            for v in value:
                yield from self._layouts_of(v)

    # -- writing -----------------------------------------------------------------------------------
    def fresh(self, size: int) -> Layout:
        """A new free atom of ``size`` channels."""
        return ((self.atoms.new(size), 1),)

    def pin(self, layout: Layout, reason: str) -> None:
        """Freeze every group in ``layout``."""
        self.atoms.pin(layout, Pin(reason, self.here()))

    def no_grow(self, layout: Layout, reason: str) -> None:
        """Allow removal but not growth for every group in ``layout`` (growth would change the function)."""
        self.atoms.pin(layout, Pin(reason, self.here(), "no-grow"))

    def prefer_whole(self, layout: Layout, reason: str) -> None:
        """``layout`` may change, but only at a price (a constant the class cannot restate): where it is the
        inner dim a reshape shares across blocks, the analysis runs again keeping those blocks whole."""
        logger.debug("%s prefers whole blocks: %s", self.here(), reason)
        self.unwanted.append(layout)

    def split_choice(self, shared: Layout) -> None:
        """Record that the current reshape shares ``shared`` (its inner dim) across its blocks."""
        self.splits[self.here()] = shared

    def pin_all(self, value: Any, reason: str) -> None:
        """Freeze every group reachable from an argument structure."""
        for layout in self.layouts_in(value):
            self.pin(layout, reason)

    def keep_equal(self, layouts: list[Layout]) -> None:
        """Ask that ``layouts`` keep one width (not one index set: each keeps its own channels). A plan may
        differ, and surgery rewrites the op to match; width selection keeps them equal so that the class, which
        states one width for all, holds the result."""
        if len(layouts) > 1:
            self.same_width.append(list(layouts))

    def unify(self, layouts: list[Layout], reason: str) -> Layout | None:
        """Unify ``layouts``; on failure pin them all with ``reason`` and return ``None``."""
        if not layouts:
            return None
        first = layouts[0]
        for other in layouts[1:]:
            if not self.atoms.unify(first, other):
                # unions made before the failure stay; pinning every layout keeps them from mattering
                for layout in layouts:
                    self.pin(layout, reason)
                return None
        return first

    def bind(self, target: str, dim: int, layout: Layout | None, role: Role) -> None:
        """Record that ``target`` (a parameter or buffer path) is indexed by ``layout`` on ``dim``.

        ``layout=None`` says that at this use the dim has a fixed width (a module called once on a
        model input and once inside the model): every layout bound to it, before or after, is pinned.
        """
        self.used_dims.add((target, dim))
        target = self.ties.get(target, target)  # a tied tensor's every name binds its first one
        key = (target, dim)
        reason = f"'{target}' is also used where this dim has a fixed width"
        # ``fixed`` remembers fixed uses, so the pin holds whichever call site the walk meets first
        if layout is None:
            self.fixed.add(key)
            if key in self.bindings:
                self.pin(self.bindings[key].layout, reason)
            return
        if key in self.fixed:
            self.pin(layout, reason)
        previous = self.bindings.get(key)
        if previous is None:
            self.bindings[key] = Binding(target, dim, layout, Role(role))  # Role(): a rule may pass "in"/"out"
        # a module called twice indexes its weight with both call sites' channels: they must be one set
        elif not self.atoms.unify(previous.layout, layout):
            reason = f"'{target}' is shared by call sites whose channels do not line up"
            self.pin(previous.layout, reason)
            self.pin(layout, reason)

    def pin_partial_ties(self) -> None:
        """Pin a dim of a tied tensor that one of its names indexes by channels and another does not (an
        embedding's rows are token ids; its tied output head's rows are logits): one slice must serve all. A name
        the graph never reads indexes nothing (an exported graph reads a tied tensor under one of its names)."""
        read = {target for target, _ in self.used_dims}
        names: dict[str, list[str]] = {}
        for alias, first in self.ties.items():
            names.setdefault(first, [first]).append(alias)
        for first, every in names.items():
            aliases = [a for a in every if a in read]
            for (target, dim), binding in list(self.bindings.items()):
                if target != first:
                    continue
                missing = [a for a in aliases if (a, dim) not in self.used_dims]
                if missing:
                    user = next(a for a in aliases if (a, dim) in self.used_dims)
                    reason = f"'{user}' is tied to '{missing[0]}', which does not index its dim {dim} by channels"
                    self.pin(binding.layout, reason)

    def rewrite(self, location: Location, value: Callable[[Measure], Any]) -> None:
        """Record a graph constant of the current node (or a fix-up) for surgery to recompute."""
        if not isinstance(location, ArgSlot | ModuleAttr | ScaleRows | ScaleKeptRows):
            raise TypeError(f"a rewrite location is one of the Location types, got {location!r}")
        self.rewrites.append(Rewrite(self.here(), location, value))

    def cost(
        self, coef: int, *factors: Layout | int, kernel: Kernel | None = None, axes: tuple[Layout | int, ...] = ()
    ) -> None:
        """Record FLOPs of the current node as ``coef`` times the widths of ``factors``; ``kernel`` (with the
        widths ``axes`` its table spans) names the runtime kernel that runs it, where the rule knows it."""
        layouts: list[Layout] = []
        for f in factors:
            if isinstance(f, int):  # a fixed width folds into the coefficient: the cost model sees fewer forms
                coef *= f
            else:
                layouts.append(f)
        self.costs.append(CostTerm(self.here(), coef, tuple(layouts), kernel, axes if kernel is not None else ()))
