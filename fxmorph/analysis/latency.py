"""A latency model of a runtime: the time a channel graph takes at any widths, from measured tables.

A runtime is profiled once per machine (:class:`RuntimeProfile`, measured by :mod:`fxmorph.io.latency_profile`):

- every kernel the graph runs (:class:`~fxmorph.analysis.kernels.Kernel`: a convolution of one kernel size, stride,
  spatial size and group count; a product with a weight of so many rows) gets a :class:`Table` of its time on a grid
  of widths (:func:`grid_points`), interpolated bilinearly in between;
- ops that move memory without a table (elementwise arithmetic and activations, norms, concatenations, pooling) cost
  a fixed time plus a time per element of their output (:class:`MemoryCost` per :class:`MemoryClass`), except where
  the runtime fuses them into the convolution before them (:func:`fused_nodes`), and batch norms it runs as a
  depthwise kernel of their own, which have tables (:mod:`fxmorph.analysis.fusion`);
- products without a kernel (attention, batched matmul) cost their FLOPs at the runtime's rate.

:class:`LatencyFunction` sums these for any widths, fast enough for the selection step to evaluate thousands of steps
(a :class:`~fxmorph.analysis.cost.Resource`); ``scale`` calibrates it to the whole model's measured time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.cost import CostModel, Polynomial, Resource
from fxmorph.analysis.fusion import fusion
from fxmorph.analysis.graph import ChannelGraph
from fxmorph.analysis.kernels import Kernel
from fxmorph.analysis.ops import OpKind, node_facts
from fxmorph.meta import tensor_shape

__all__ = [
    "Both",
    "LatencyBudget",
    "LatencyFunction",
    "MemoryClass",
    "MemoryCost",
    "RuntimeProfile",
    "Table",
    "fused_nodes",
    "grid_points",
    "kernels_of",
    "layout_width",
    "memory_class",
]


class MemoryClass(Enum):
    """Ops priced by the memory they touch: one fixed time and one time per output element each."""

    ELEMENTWISE = "elementwise"
    """Arithmetic between tensors, casts (an ``Add``)."""
    ACTIVATION = "activation"
    """A nonlinear function of each element (a ``Sigmoid``)."""
    BATCH_NORM = "batch_norm"
    """A batch norm the runtime cannot fold into a convolution before it."""
    NORM = "norm"
    """A norm over the tensor's own statistics (a ``LayerNormalization``)."""
    COPY = "copy"
    """Data movement that copies (a ``Concat``, a ``Transpose``)."""
    POOL = "pool"
    """Pooling and reductions (a ``MaxPool``)."""
    OTHER = "other"
    """Softmax and any other op without a table."""


_CLASS_OF_KIND = {
    OpKind.POINTWISE: MemoryClass.ELEMENTWISE,
    OpKind.ACTIVATION: MemoryClass.ACTIVATION,
    OpKind.BATCH_NORM: MemoryClass.BATCH_NORM,
    OpKind.NORM: MemoryClass.NORM,
    OpKind.MOVE: MemoryClass.COPY,
    OpKind.POOL: MemoryClass.POOL,
    OpKind.OTHER: MemoryClass.OTHER,
}
"""How each kind of op of the op table is priced (LAYER ops have tables or a FLOP rate; SHAPE ops cost nothing)."""


@dataclass(frozen=True)
class MemoryCost:
    """The time of one op of a :class:`MemoryClass`: ``fixed_us`` plus ``element_us`` per output element."""

    fixed_us: float
    element_us: float


@dataclass(frozen=True, eq=False)
class Table:
    """A kernel's measured time in microseconds on a grid of widths (one ascending tuple of points per axis;
    ``micros`` has one dim per axis).

    ``block`` is the channel block the kernel runs in (1: none). A blocked kernel pads every width up to a multiple
    of it, so a width between two points costs what the next multiple costs, not a share of the way there:
    onnxruntime's blocked 1x1 convolution takes as long for 24 channels as for 32, and a linear interpolation
    between 16 and 32 would price 24 a fifth too cheap (the widths of models as published, 24, 40 or 80, are rarely
    multiples of 16, where cuts on the rounding grid are)."""

    kernel: Kernel
    grid: tuple[tuple[int, ...], ...]
    micros: np.ndarray
    block: int = 1

    def monotone(self) -> Table:
        """The table made non-decreasing along every axis (a running maximum): a measured point that came out
        faster than a narrower one is noise, and a cost that falls as widths grow would make cuts look dear."""
        values = np.asarray(self.micros, dtype=np.float64)
        for axis in range(values.ndim):
            values = np.maximum.accumulate(values, axis=axis)
        return Table(self.kernel, self.grid, values, self.block)

    def at(self, widths: np.ndarray) -> np.ndarray:
        """The interpolated times at ``widths`` (one row per axis, one column per query): each width padded up to
        the ``block`` (up to the widest point at most, whose measured time already holds its own padding), then
        linear between grid points, extended along the last segment above the grid, and the first point's value
        below it."""
        widths = np.asarray(widths, dtype=np.float64).reshape(len(self.grid), -1)
        weights, index = [], []
        for axis, points in enumerate(self.grid):
            grid = np.asarray(points, dtype=np.float64)
            if len(grid) == 1:
                index.append(np.zeros((widths.shape[1], 2), dtype=np.int64))
                weights.append(np.stack([np.ones(widths.shape[1]), np.zeros(widths.shape[1])], axis=1))
                continue
            padded = np.minimum(np.ceil(widths[axis] / self.block) * self.block, grid[-1])
            at = np.where(widths[axis] > grid[-1], widths[axis], padded)  # above the grid: extended as before
            hi = np.clip(np.searchsorted(grid, at), 1, len(grid) - 1)
            t = np.maximum((at - grid[hi - 1]) / (grid[hi] - grid[hi - 1]), 0.0)
            index.append(np.stack([hi - 1, hi], axis=1))
            weights.append(np.stack([1.0 - t, t], axis=1))
        out = np.zeros(widths.shape[1])
        for corner in np.ndindex(*([2] * len(self.grid))):  # 2 corners in 1-d, 4 in 2-d
            w = np.prod([weights[a][:, c] for a, c in enumerate(corner)], axis=0)
            out += w * self.micros[tuple(index[a][:, c] for a, c in enumerate(corner))]
        return out


@dataclass(frozen=True, eq=False)
class RuntimeProfile:
    """What measuring a runtime on this machine found: a :class:`Table` per kernel, a :class:`MemoryCost` per
    :class:`MemoryClass`, and the time of one FLOP of products without a table (``flop_us``)."""

    runtime: str
    tables: Mapping[Kernel, Table]
    memory: Mapping[MemoryClass, MemoryCost]
    flop_us: float


def grid_points(size: int) -> tuple[int, ...]:
    """The widths a table measures along an axis of at most ``size``: the first two blocks, and up to eight points
    between a sixteenth of it and all of it, denser near the top where budgets land, on the rounding grid's
    multiples of 16 (8 below 32 channels). CPU kernels run channels in blocks: onnxruntime's 1x1 convolution at 56x56
    takes the same time for 17 to 32 output channels and a third more from 33, and a depthwise one twice as long at
    18 channels as at 16 or 20, so points off the blocks would price every width between them wrongly. The first
    blocks are measured because deep cuts reach them, and a table holds its first point's value below it: a layer
    of 1152 channels cut to 16 would otherwise cost what 64 do."""
    step = 16 if size >= 32 else 8 if size >= 16 else 1
    fractions = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
    points = {max(step, round(f * size / step) * step) for f in fractions} | {step, 2 * step}
    return tuple(sorted(p for p in points | {size} if p <= size))


def kernels_of(cg: ChannelGraph) -> dict[Kernel, tuple[int, ...]]:
    """Every kernel the graph runs, with the widest each of its axes gets (its table spans up to that): its layers',
    and those of the batch norms a CPU runtime runs as kernels (:func:`~fxmorph.analysis.fusion.fusion`)."""
    ops = [(t.kernel, t.axes) for t in cg.costs if t.kernel is not None]
    ops += [(kernel, (layout,)) for kernel, layout in fusion(cg)[1].values()]
    widest: dict[Kernel, tuple[int, ...]] = {}
    for kernel, axes in ops:
        sizes = tuple(a if isinstance(a, int) else layout_width(cg, a) for a in axes)
        old = widest.get(kernel, sizes)
        widest[kernel] = tuple(max(a, b) for a, b in zip(old, sizes, strict=True))
    return widest


def layout_width(cg: ChannelGraph, layout: Layout) -> int:
    """The channels of a table axis laid out over groups, at the groups' full widths."""
    return sum(cg.groups[g].size * inner for g, inner in cg.layout_groups(layout))


def fused_nodes(cg: ChannelGraph) -> set[str]:
    """The nodes a CPU runtime fuses into a convolution, or into a batch norm it runs as a kernel
    (:func:`~fxmorph.analysis.fusion.fusion`): a batch norm and a ReLU after a convolution, a residual add and the
    ReLU after it, and a ReLU after a norm of a concatenation all run inside the kernel before them."""
    return fusion(cg)[0]


def memory_class(node: fx.Node, gm: fx.GraphModule, skip: set[str]) -> MemoryClass | None:
    """How the latency model prices ``node`` by its memory (None: it costs nothing, or it is in ``skip``: it has a
    table, or it is fused into a convolution)."""
    if node.op not in ("call_module", "call_function", "call_method") or node.name in skip:
        return None
    facts = node_facts(node, gm)
    if facts.kind in (OpKind.SHAPE, OpKind.LAYER) or (facts.kind is OpKind.MOVE and not facts.copies):
        return None
    return _CLASS_OF_KIND.get(facts.kind)


class LatencyFunction:
    """Predicted microseconds of a graph at any widths (a :class:`~fxmorph.analysis.cost.Resource`): tables for
    its kernels, memory costs for the ops without one, FLOPs at a rate for the rest, times ``scale``."""

    def __init__(self, cost: CostModel, profile: RuntimeProfile, scale: float = 1.0) -> None:
        """The latency of ``cost``'s graph as ``profile`` prices it (a kernel it has no table for, as a layer
        factorized after profiling makes, costs its FLOPs at ``profile.flop_us``)."""
        cg = cost.cg
        self.scale = scale
        self._rest = Polynomial(len(cg.groups), exact=False)  # memory and FLOP-rate terms: polynomials of the widths
        self._forms: list[np.ndarray] = []
        self._offsets: list[int] = []
        self._ops: dict[Kernel, list[list[int]]] = {}  # per kernel: per op, the form index of each axis
        self._gate_rows: dict[Kernel, list[np.ndarray]] = {}  # per kernel: per op, the groups whose removal takes it
        for term in cg.costs:
            gated = cost.gates.get(term.node, frozenset())
            if term.kernel is None or term.kernel not in profile.tables:  # no table: its FLOPs at the runtime's rate
                self._rest.term(term.coef * profile.flop_us, [self._rest.form(cg, f) for f in term.factors], gated)
                continue
            self._add_op(cg, term.kernel, term.axes, gated)
        fused, norms = fusion(cg, lambda kernel: kernel in profile.tables)
        for name, (kernel, layout) in norms.items():  # batch norms the runtime runs as kernels, priced by their tables
            self._add_op(cg, kernel, (layout,), cost.gates.get(name, frozenset()))
        self._tables = {k: profile.tables[k] for k in self._ops}
        n = len(cg.groups)
        self._a = np.vstack(self._forms) if self._forms else np.zeros((0, n), dtype=np.int64)
        self._b = np.asarray(self._offsets, dtype=np.int64)
        self._index = {k: np.asarray(ops, dtype=np.int64).T for k, ops in self._ops.items()}  # (axes, ops)
        self._gates = {k: np.vstack(rows) for k, rows in self._gate_rows.items()}  # (ops, groups)
        self._add_memory(cost, profile, {t.node for t in cg.costs} | fused | set(norms))
        self._rest.freeze()

    def _add_op(self, cg: ChannelGraph, kernel: Kernel, axes: tuple[Layout | int, ...], gated: Collection[int]) -> None:
        """One op priced by ``kernel``'s table at the widths of ``axes`` (a layout over groups, or a fixed width), gone
        where a group of ``gated`` is removed whole."""
        gate = np.zeros(len(cg.groups), dtype=np.int64)
        gate[list(gated)] = 1
        self._gate_rows.setdefault(kernel, []).append(gate)
        indices = []
        for axis in axes:
            row = np.zeros(len(cg.groups), dtype=np.int64)
            if isinstance(axis, int):
                self._offsets.append(axis)
            else:
                self._offsets.append(0)
                for gid, inner in cg.layout_groups(axis):
                    row[gid] += inner
            self._forms.append(row)
            indices.append(len(self._forms) - 1)
        self._ops.setdefault(kernel, []).append(indices)

    def _add_memory(self, cost: CostModel, profile: RuntimeProfile, skip: set[str]) -> None:
        """A fixed and a per-element term for every op priced by its memory (see :func:`memory_class`; not those of
        ``skip``: priced by a table, or fused into a kernel), per element of its largest tensor
        (:func:`_largest_tensor`); both go with the op where a group's removal takes it."""
        cg = cost.cg
        for node in cg.gm.graph.nodes:
            kind = memory_class(node, cg.gm, skip)
            if kind is None or kind not in profile.memory or tensor_shape(node) is None:
                continue
            tensor = _largest_tensor(node)
            shape = tensor_shape(tensor)
            assert shape is not None  # the node's own shape is known, and another is chosen only for a larger one
            price = profile.memory[kind]
            gated = cost.gates.get(node.name, frozenset())
            if gated:
                self._rest.term(price.fixed_us, [], gated)
            else:
                self._rest.const += price.fixed_us
            spaces = cg.spaces.get(tensor.name)
            bound = spaces if isinstance(spaces, dict) else {}
            fixed = math.prod(s for d, s in enumerate(shape) if d not in bound)
            self._rest.term(price.element_us * fixed, [self._rest.form(cg, lay) for lay in bound.values()], gated)

    def __call__(self, widths: np.ndarray) -> float:
        """Predicted microseconds at group widths ``widths``."""
        widths = np.asarray(widths, dtype=np.int64)
        return float(self.scale * (self._rest(widths) + self._tabled(widths[:, None])[0]))

    def steps(self, widths: np.ndarray, groups: np.ndarray, new_widths: np.ndarray) -> np.ndarray:
        """Predicted microseconds after each single-group change ``widths[groups[j]] = new_widths[j]``."""
        widths = np.asarray(widths, dtype=np.int64)
        columns = np.repeat(widths[:, None], len(groups), axis=1)
        columns[groups, np.arange(len(groups))] = new_widths
        return self.scale * (self._rest.steps(widths, groups, new_widths) + self._tabled(columns))

    def _tabled(self, columns: np.ndarray) -> np.ndarray:
        """Microseconds of the ops with tables, for every column of group widths (unscaled)."""
        values = self._a @ columns + self._b[:, None]  # every axis width, per column
        gone = (columns == 0).astype(np.int64)  # the groups at width 0, per column
        total = np.zeros(columns.shape[1])
        for kernel, index in self._index.items():
            table = self._tables[kernel]
            at = values[index]  # (axes, ops, columns)
            live = self._gates[kernel] @ gone == 0  # (ops, columns): no group whose removal takes the op is gone
            total += (table.at(at.reshape(len(index), -1)).reshape(at.shape[1:]) * live).sum(axis=0)
        return total

    def projected(self, onto: np.ndarray) -> LatencyFunction:
        """The same function of unit widths ``u``, where the group widths are ``onto @ u``."""
        out = copy.copy(self)
        out._a = self._a @ onto
        # a unit is gone where its groups are: an op's gate counts the units holding its gate groups
        out._gates = {k: gates @ (onto > 0).astype(np.int64) for k, gates in self._gates.items()}
        out._rest = self._rest.projected(onto)
        return out


def _largest_tensor(node: fx.Node) -> fx.Node:
    """The node's output, or the tensor operand with more elements: what a memory-bound op's time follows. A
    global pooling reads a feature map and writes a channel vector, and takes the time of the map."""
    best, size = node, math.prod(tensor_shape(node) or ())
    for arg in node.all_input_nodes:
        shape = tensor_shape(arg)
        if shape is not None and math.prod(shape) > size:
            best, size = arg, math.prod(shape)
    return best


class Both:
    """FLOPs and latency budgets met together, as one :class:`~fxmorph.analysis.cost.Resource` in microseconds:
    the larger of the latency and the FLOPs scaled so that the FLOPs budget is the latency budget."""

    def __init__(self, flops: Resource, flops_budget: int, latency: Resource, latency_budget: float) -> None:
        """``flops`` and ``latency`` are functions of the same widths; the budgets are theirs."""
        self.flops, self.latency = flops, latency
        self.flops_budget, self.latency_budget = flops_budget, latency_budget

    def __call__(self, widths: np.ndarray) -> float:
        return max(self._scaled(self.flops(widths)), float(self.latency(widths)))

    def steps(self, widths: np.ndarray, groups: np.ndarray, new_widths: np.ndarray) -> np.ndarray:
        flops = self.flops.steps(widths, groups, new_widths)
        return np.maximum(
            self._scaled(np.asarray(flops, dtype=np.float64)), self.latency.steps(widths, groups, new_widths)
        )

    def projected(self, onto: np.ndarray) -> Both:
        return Both(self.flops.projected(onto), self.flops_budget, self.latency.projected(onto), self.latency_budget)

    def _scaled(self, flops: float | np.ndarray) -> float | np.ndarray:
        return flops * (self.latency_budget / self.flops_budget)


@dataclass(frozen=True, eq=False)
class LatencyBudget:
    """A latency budget as the selection step meets it: ``micros`` of latency as ``profile`` predicts it, times
    ``scale`` (the whole model's measured time over its prediction, refined by each measured result)."""

    micros: float
    profile: RuntimeProfile
    scale: float = 1.0

    def priced(self, cost: CostModel, budget_flops: int) -> tuple[CostModel, float]:
        """``cost`` priced in predicted microseconds, meeting ``budget_flops`` too, and the budget to meet."""
        latency = LatencyFunction(cost, self.profile, self.scale)
        return cost.priced(Both(cost.flops_function, budget_flops, latency, self.micros)), self.micros
