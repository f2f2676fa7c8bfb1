"""The cost model: FLOPs and parameters as a function of group widths, evaluated in microseconds.

A budget may measure another :class:`Resource` of the same widths (:meth:`Costs.priced`): the predicted latency of
:mod:`fxmorph.analysis.latency`, or FLOPs and latency together.

Built once from the channel graph. Each counted op contributes ``coef * prod(width(factor))`` where a
factor's width is a linear form in the group widths; ops whose cost cannot change (every channel they
touch is pinned) are folded into a constant, taken from the FLOPs counted at trace time. The terms of ops that
go when a group is removed whole (:mod:`fxmorph.analysis.removal`) vanish at that group's width 0. After surgery
the counted FLOPs equal :meth:`CostModel.flops` of the plan exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, Self

import numpy as np

from fxmorph.analysis import ChannelGraph, Layout
from fxmorph.analysis.removal import joint_sets, node_gates, tensor_gates
from fxmorph.meta import FLOPS_KEY

__all__ = ["CostModel", "Costs", "Polynomial", "Resource", "TiedCosts"]


class Polynomial:
    """``const + sum_t coef_t * prod_k (A[idx[t, k]] @ w)`` with exact int64 arithmetic.

    Each row of ``A`` is a linear form: the width of one layout as a function of the group widths ``w``; a gate's
    row is one group's width, clipped to 1, so that a term with gates vanishes where one of their groups is at 0.
    Build with :meth:`form` and :meth:`term`, then :meth:`freeze` once before evaluating.
    """

    def __init__(self, n_groups: int, exact: bool = True) -> None:
        """``exact``: integer coefficients and values (FLOPs, parameters); otherwise floats (microseconds)."""
        self._n = n_groups
        self._exact = exact
        self._rows: list[np.ndarray] = []
        self._gate_rows: list[int] = []
        self._terms: list[tuple[float, list[int]]] = []
        self.const: float = 0

    def form(self, cg: ChannelGraph, layout: Layout) -> int:
        """Add the linear form of ``layout``'s width; return its row index."""
        row = np.zeros(self._n, dtype=np.int64)
        for gid, inner in cg.layout_groups(layout):
            row[gid] += inner  # += : one group may appear several times in a layout (attention heads)
        self._rows.append(row)
        return len(self._rows) - 1

    def term(self, coef: float, forms: list[int], gates: Collection[int] = ()) -> None:
        """Add ``coef`` times the product of the forms at row indices ``forms``, where every group of ``gates`` has
        a width (the term of an op that goes when one of them is removed whole, :mod:`fxmorph.analysis.removal`)."""
        rows = []
        for gid in sorted(gates):
            row = np.zeros(self._n, dtype=np.int64)
            row[gid] = 1
            self._rows.append(row)
            self._gate_rows.append(len(self._rows) - 1)
            rows.append(len(self._rows) - 1)
        self._terms.append((coef, [*forms, *rows]))

    def freeze(self) -> None:
        """Pack the terms into arrays. A last row of zeros is the constant 1 (its value is set to 1 on every
        evaluation); it pads terms with fewer factors, so one product over a rectangular index works."""
        width = max((len(f) for _, f in self._terms), default=0)
        self._a = (
            np.vstack([*self._rows, np.zeros(self._n, dtype=np.int64)])
            if self._rows
            else np.zeros((1, self._n), dtype=np.int64)
        )
        one = len(self._rows)
        self._coef = np.array([c for c, _ in self._terms], dtype=np.int64 if self._exact else np.float64)
        self._idx = np.full((len(self._terms), max(width, 1)), one, dtype=np.int64)
        for t, (_, forms) in enumerate(self._terms):
            self._idx[t, : len(forms)] = forms
        self._gates = np.asarray(self._gate_rows, dtype=np.int64)

    def __call__(self, widths: np.ndarray) -> int | float:
        """The value at group widths ``widths``."""
        values = self._a @ widths
        values[-1] = 1
        values[self._gates] = np.minimum(values[self._gates], 1)  # a gate is 1 while its group has a width, else 0
        total = (self._coef * values[self._idx].prod(axis=1)).sum()
        return int(self.const + int(total)) if self._exact else float(self.const + total)

    def steps(self, widths: np.ndarray, groups: np.ndarray, new_widths: np.ndarray) -> np.ndarray:
        """Values after each single-group change ``widths[groups[j]] = new_widths[j]``, one per ``j``.

        Only the forms' columns of the changed groups are read: ``O(forms x steps)``, no matrix product."""
        values = self._a @ widths
        values[-1] = 1
        delta = new_widths - widths[groups]
        # the forms are linear: changing group g by delta moves every form by its column A[:, g] * delta
        changed = values[:, None] + self._a[:, groups] * delta[None, :]
        changed[-1, :] = 1
        changed[self._gates] = np.minimum(changed[self._gates], 1)
        return self.const + self._coef @ changed[self._idx].prod(axis=1)

    def projected(self, onto: np.ndarray) -> Polynomial:
        """The same polynomial of new variables ``u``, where the old ones are ``w = onto @ u`` (``onto``: one
        row per old variable). The forms stay linear: each row of ``A`` becomes ``A @ onto``."""
        out = copy.copy(self)
        out._n = onto.shape[1]
        out._a = self._a @ onto  # the constant row of zeros stays zeros
        return out


class Resource(Protocol):
    """What a budget measures, as a function of a vector of widths (FLOPs, predicted latency, or both at once):
    the interface of :class:`Polynomial`, which the selection step evaluates."""

    def __call__(self, widths: np.ndarray) -> int | float:
        """The value at ``widths``."""

    def steps(self, widths: np.ndarray, groups: np.ndarray, new_widths: np.ndarray) -> np.ndarray:
        """Values after each single change ``widths[groups[j]] = new_widths[j]``."""

    def projected(self, onto: np.ndarray) -> Resource:
        """The same function of variables ``u`` where the old ones are ``onto @ u``."""


class Costs:
    """FLOPs and parameters as functions of a vector of widths, one per variable (:class:`CostModel`: one
    per group; :class:`TiedCosts`: one per unit of groups kept at one width), and the resource a budget
    measures (:meth:`spent`: FLOPs unless :meth:`priced` says otherwise)."""

    sizes: np.ndarray
    """The original width of every variable."""
    spans: np.ndarray
    """The channels each element of every variable stands for (:attr:`Group.span`: a head's width, or 1)."""
    copies: np.ndarray
    """The times one axis holds every variable's channels (:attr:`Group.copies`: the heads an embedding feeds, or 1)."""
    removable: np.ndarray
    """Whether every variable may go to width 0, its groups removed whole, with their modules taken out of the
    containers holding them (:attr:`~fxmorph.analysis.removal.Removal.droppable`)."""
    joint: tuple[frozenset[int], ...]
    """Sets of removable variables that may not all be at width 0 at once: together they fill a tensor alone."""
    _flops: Polynomial
    _params: Polynomial
    _budget: Resource

    @property
    def flops_function(self) -> Resource:
        """FLOPs as a :class:`Resource` of this object's variables."""
        return self._flops

    @property
    def spends_flops(self) -> bool:
        """Whether the budget measures FLOPs (no :meth:`priced` resource)."""
        return self._budget is self._flops

    def priced(self, resource: Resource) -> Self:
        """A copy whose budget measures ``resource`` (a function of this object's variables)."""
        out = copy.copy(self)
        out._budget = resource
        return out

    def spent(self, widths: Sequence[int] | np.ndarray | Mapping[int, int] | None = None) -> float:
        """What the budget measures at ``widths`` (FLOPs, or what :meth:`priced` set)."""
        return self._budget(self._vector(widths))

    def spent_steps(self, widths: np.ndarray, steps: Sequence[tuple[int, int]]) -> np.ndarray:
        """What the budget measures after each step ``(variable, new width)`` taken alone from ``widths``."""
        return self._budget.steps(*_step_arrays(widths, steps))

    def flops_steps(self, widths: np.ndarray, steps: Sequence[tuple[int, int]]) -> np.ndarray:
        """FLOPs after each step ``(variable, new width)`` of ``steps`` taken alone from ``widths``."""
        return self._flops.steps(*_step_arrays(widths, steps))

    def params_steps(self, widths: np.ndarray, steps: Sequence[tuple[int, int]]) -> np.ndarray:
        """Parameter counts after each step ``(variable, new width)`` taken alone from ``widths``."""
        return self._params.steps(*_step_arrays(widths, steps))

    def widths(self, overrides: Mapping[int, int] | None = None) -> np.ndarray:
        """Vector of widths: the original sizes with ``overrides`` applied."""
        w = self.sizes.copy()
        for gid, width in (overrides or {}).items():
            w[gid] = width
        return w

    def flops(self, widths: Sequence[int] | np.ndarray | Mapping[int, int] | None = None) -> int:
        """FLOPs for a width vector (or a ``{variable: width}`` mapping over the original sizes)."""
        return self._flops(self._vector(widths))

    def params(self, widths: Sequence[int] | np.ndarray | Mapping[int, int] | None = None) -> int:
        """Parameter count for a width vector (or mapping)."""
        return self._params(self._vector(widths))

    def _vector(self, widths: Sequence[int] | np.ndarray | Mapping[int, int] | None) -> np.ndarray:
        """``widths`` as a new int64 vector of every variable's width (a mapping overrides the sizes)."""
        if widths is None or isinstance(widths, Mapping):
            return self.widths(widths)  # type: ignore[arg-type]
        return np.asarray(widths, dtype=np.int64).copy()


class CostModel(Costs):
    """Predict FLOPs (2 x MACs, as ``torch.utils.flop_counter``) and parameters for any group widths."""

    def __init__(self, cg: ChannelGraph, counted_flops: int | None = None) -> None:
        """Build the polynomials of ``cg``; ``counted_flops`` overrides the FLOPs counted at trace time
        (``cg.gm.meta``), which calibrate the constant. Without either, :meth:`flops` counts only the
        ops the rules recorded."""
        self.cg = cg
        self.sizes = np.array([g.size for g in cg.groups], dtype=np.int64)
        self.spans = np.array([g.span for g in cg.groups], dtype=np.int64)
        self.copies = np.array([g.copies for g in cg.groups], dtype=np.int64)
        # selection removes a group whole only where write-back can take its modules out of the user's class
        self.removable = np.array([cg.removal(g.id).droppable for g in cg.groups], dtype=bool)
        self.joint = joint_sets(cg)
        self._flops = Polynomial(len(cg.groups))
        self._free_terms = Polynomial(len(cg.groups))
        self.gates = node_gates(cg)
        """Per node that a group's removal takes with it, the groups whose removal alone takes it."""
        for term in cg.costs:
            gates = self.gates.get(term.node, ())
            self._flops.term(term.coef, [self._flops.form(cg, f) for f in term.factors], gates)
            # the terms touching a free group: the FLOPs a plan can change (prunable_share)
            if any(not cg.groups[g].pins for f in term.factors for g, _ in cg.layout_groups(f)):
                self._free_terms.term(term.coef, [self._free_terms.form(cg, f) for f in term.factors])
        self._flops.freeze()
        self._free_terms.freeze()
        counted = cg.gm.meta.get(FLOPS_KEY) if counted_flops is None else counted_flops
        self.counted = int(counted) if counted is not None else None
        if counted is not None:
            # What torch counted and no rule recorded (ops of fixed cost) becomes the constant, so that
            # flops() at the original widths equals the trace-time count exactly.
            self._flops.const = int(counted) - self._flops(self.sizes.copy())
        self._params = self._param_polynomial(cg)
        self._budget = self._flops

    def _param_polynomial(self, cg: ChannelGraph) -> Polynomial:
        """One term per parameter: the product of its fixed dims times the width of each bound dim. A
        parameter no rule bound is a constant term; named_parameters() lists a shared one once."""
        poly = Polynomial(len(cg.groups))
        bound: dict[str, dict[int, Layout]] = {}
        for (target, dim), binding in cg.bindings.items():
            bound.setdefault(target, {})[dim] = binding.layout
        gates = tensor_gates(cg, self.gates)
        for name, p in cg.gm.named_parameters():
            dims = bound.get(name, {})
            coef = int(np.prod([n for d, n in enumerate(p.shape) if d not in dims], dtype=np.int64))
            poly.term(coef, [poly.form(cg, layout) for layout in dims.values()], gates.get(name, ()))
        poly.freeze()
        return poly

    def prunable_share(self) -> float:
        """Share of the model's FLOPs in ops that touch at least one free group (0 to 1)."""
        total = self.flops()
        return self._free_terms(self.sizes.copy()) / total if total else 0.0

    def tied(self, classes: Sequence[Sequence[int]]) -> TiedCosts:
        """The same costs over units: each of ``classes`` (groups whose sizes are multiples of the smallest) one
        unit, every other group its own."""
        return TiedCosts(self, classes)


class TiedCosts(Costs):
    """A :class:`CostModel` whose variables are units of groups that keep one width.

    Each class of groups is one unit and every other group is a unit of its own, in the order of their first
    group. A unit counts elements of its narrowest member (its lead); every member is a whole multiple of it and
    moves ``ratio`` of its elements per unit element: 1 in a class of same-role groups of one size, and more where
    a config field sizes groups in proportion (BERT's ``hidden_size`` sizes the residual stream, 16 channels per
    head of its heads, and GPT-2's ``n_embd`` its MLP, 4 channels per stream channel). A step of a unit moves all
    its groups at once, so its FLOPs are those of every member stepped together (the polynomial in unit widths is
    exact: its forms are the group forms, each scaled by its ratio, summed over each unit's members).
    :meth:`expand` gives the group widths of unit widths.
    """

    def __init__(self, cost: CostModel, classes: Sequence[Sequence[int]]) -> None:
        """Units of ``cost``'s groups: ``classes`` (disjoint, each member's size a multiple of the smallest) and
        singletons."""
        n = len(cost.sizes)
        self.unit_of = np.full(n, -1, dtype=np.int64)
        """The unit of every group."""
        self.ratio = np.ones(n, dtype=np.int64)
        """Elements of every group per element of its unit (its size over its lead's)."""
        self.members: list[list[int]] = []
        """The groups of every unit."""
        leads: list[int] = []
        for members in [*classes, *([g] for g in range(n))]:
            members = [g for g in members if self.unit_of[g] < 0]
            if members:
                self._check(cost, members)
                lead = min(members, key=lambda g: int(cost.sizes[g]))
                self.ratio[members] = cost.sizes[members] // cost.sizes[lead]
                self.unit_of[members] = len(self.members)
                self.members.append(members)
                leads.append(lead)
        order = np.argsort([m[0] for m in self.members], kind="stable")  # units in the order of their groups
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.members = [self.members[k] for k in order]
        leads = [leads[k] for k in order]
        self.unit_of = rank[self.unit_of]
        onto = np.zeros((n, len(self.members)), dtype=np.int64)
        onto[np.arange(n), self.unit_of] = self.ratio
        self.sizes = cost.sizes[leads]
        self.spans = cost.spans[leads]
        self.copies = cost.copies[leads]
        # a unit of several groups stays: their removal together is not known to be exact
        self.removable = np.array([len(m) == 1 and cost.removable[m[0]] for m in self.members], dtype=bool)
        self.joint = tuple(
            frozenset(int(self.unit_of[g]) for g in s)
            for s in cost.joint
            if all(self.removable[self.unit_of[g]] for g in s)
        )
        self._flops = cost._flops.projected(onto)
        self._params = cost._params.projected(onto)
        self._budget = self._flops if cost._budget is cost._flops else cost._budget.projected(onto)

    @staticmethod
    def _check(cost: CostModel, members: list[int]) -> None:
        """``members`` can keep one width: each size a multiple of the smallest."""
        lead = min(int(cost.sizes[g]) for g in members)
        if any(int(cost.sizes[g]) % lead for g in members):
            raise ValueError(f"groups {members} are not multiples of one size: they cannot keep one width")

    def expand(self, units: np.ndarray) -> np.ndarray:
        """The group widths of unit widths ``units``."""
        return np.asarray(units, dtype=np.int64)[self.unit_of] * self.ratio

    def units_within(self, groups: Collection[int]) -> list[int]:
        """The units all of whose groups are in ``groups``."""
        chosen = set(groups)
        return [u for u, members in enumerate(self.members) if all(g in chosen for g in members)]


def _step_arrays(widths: np.ndarray, steps: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``steps`` as the arrays :meth:`Polynomial.steps` takes: widths, changed groups, their new widths."""
    groups = np.array([g for g, _ in steps], dtype=np.int64)
    new = np.array([n for _, n in steps], dtype=np.int64)
    return np.asarray(widths, dtype=np.int64), groups, new
