"""MorphNet's FLOPs regularizer: a differentiable loss term that shrinks channels where they cost most.

For every free channel group ``g`` (a group the analysis lets change width) that has parameters,
the regularizer reads one **gate** per channel from the user's live model:

- groups with BatchNorm members: ``|gamma|``, the max over the group's BatchNorm layers (a channel is
  alive if any member is alive, MorphNet's OR rule);
- groups without BatchNorm: the group-lasso L2 norm of every parameter slice of the channel
  (producer rows and biases, consumer columns).

The loss is ``strength * sum_g dF/dw_g * sum_c gate_gc``, where ``F`` is :class:`~fxmorph.analysis.cost.CostModel`'s
FLOPs polynomial and its derivative is taken exactly at the *alive* widths (channels whose gate exceeds
``threshold``; a group keeps at least one). For an op of cost ``C * w_in * w_out`` that is MorphNet's
surrogate ``C * (A_in * sum |gamma_out| + A_out * sum |gamma_in|)`` with ``A`` the alive counts; ops
linear in one group (depthwise convs) add ``C * sum |gamma|``; concatenations and flattens enter with their
exact coefficients. The derivative is recomputed from the current gates on every call, so the price of a
channel falls as its neighbours die.

Parameters are referenced by name and resolved on the live model at every call: the loss backpropagates
into the model being trained, and the model may be wrapped in ``DistributedDataParallel`` (or moved to
another device) before or after the regularizer is built. Under DDP, add the term to the loss and call
``backward`` once; every rank computes the same term from the same (synchronised) parameters, so DDP's
gradient averaging leaves it unchanged.

After training with the term, BatchNorm running statistics lag behind the shrinking scales: recalibrate
them before evaluating (``fxmorph.api.morph.recalibrate_norms``; ``fxmorph.morph`` does it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxmorph.analysis import ChannelGraph, Group, Role
from fxmorph.analysis.cost import CostModel
from fxmorph.api.analyze import analyze
from fxmorph.errors import InputError
from fxmorph.passes.importance import channel_positions

__all__ = ["FlopsRegularizer"]

logger = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class _Slice:
    """One parameter axis of a group: ``name``'s dim ``dim``; ``positions[c]`` are channel c's indices."""

    name: str
    dim: int
    role: Role
    positions: torch.Tensor  # [group size, k] int64


@dataclass(frozen=True)
class _Gate:
    """How one group's per-channel gate is read: ``bn`` (max |gamma|) or ``lasso`` (L2 over ``slices``)."""

    gid: int
    size: int
    kind: str
    gates: tuple[_Slice, ...]
    fan_out: tuple[_Slice, ...]


class _Marginals:
    """Exact partial derivatives of the FLOPs polynomial ``sum_t coef_t prod_k (A[f_tk] @ w)``."""

    def __init__(self, cg: ChannelGraph) -> None:
        n = len(cg.groups)
        rows: list[np.ndarray] = []
        terms: list[tuple[int, list[int]]] = []
        for term in cg.costs:
            forms = []
            for layout in term.factors:
                row = np.zeros(n, dtype=np.int64)
                for gid, inner in cg.layout_groups(layout):
                    row[gid] += inner
                rows.append(row)
                forms.append(len(rows) - 1)
            terms.append((int(term.coef), forms))
        self._a = np.vstack([*rows, np.zeros(n, dtype=np.int64)])  # the last row stands for a factor of 1
        width = max((len(f) for _, f in terms), default=1)
        self._coef = np.array([c for c, _ in terms], dtype=np.int64)
        self._idx = np.full((len(terms), max(width, 1)), len(rows), dtype=np.int64)
        for t, (_, forms) in enumerate(terms):
            self._idx[t, : len(forms)] = forms

    def __call__(self, widths: np.ndarray) -> np.ndarray:
        values = self._a @ np.asarray(widths, dtype=np.int64)
        values[-1] = 1
        factors = values[self._idx]  # [terms, k]
        grad = np.zeros(self._a.shape[1], dtype=np.int64)
        for k in range(factors.shape[1]):
            others = np.prod(np.delete(factors, k, axis=1), axis=1)
            grad += (self._coef * others) @ self._a[self._idx[:, k]]
        return grad


def _unwrap(model: Any) -> nn.Module:
    """The user's module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _slices(cg: ChannelGraph, group: Group, params: set[str]) -> list[_Slice]:
    out = []
    for m in group.params:
        if m.name in params:
            positions = channel_positions(cg, cg.bindings[(m.name, m.dim)].layout, group.id)
            out.append(_Slice(m.name, m.dim, m.role, torch.as_tensor(positions, dtype=torch.long)))
    return out


def _is_gamma(cg: ChannelGraph, s: _Slice) -> bool:
    owner, _, leaf = s.name.rpartition(".")
    return leaf == "weight" and s.role == Role.OUT and bool(owner) and isinstance(cg.gm.get_submodule(owner), _BN)


def _gate_of(cg: ChannelGraph, group: Group, params: set[str]) -> _Gate | None:
    slices = _slices(cg, group, params)
    if not slices:
        return None
    gammas = tuple(s for s in slices if _is_gamma(cg, s))
    fan_out = tuple(s for s in slices if s.role == Role.IN)
    if gammas:
        return _Gate(group.id, group.size, "bn", gammas, fan_out)
    return _Gate(group.id, group.size, "lasso", tuple(slices), fan_out)


def _rows(p: torch.Tensor, s: _Slice) -> torch.Tensor:
    """``[group size, k * rest]`` view of the entries of ``p`` that belong to each channel."""
    flat = p.movedim(s.dim, 0).reshape(p.shape[s.dim], -1)
    index = s.positions.to(p.device)
    return flat[index].reshape(index.shape[0], -1)


def _check_strength(strength: float) -> float:
    if (
        isinstance(strength, bool)
        or not isinstance(strength, int | float)
        or not math.isfinite(strength)
        or strength <= 0
    ):
        raise InputError(
            f"strength must be a positive finite number, got {strength!r}: MorphNet suggests starting near "
            "1 / FLOPs of the model (the default, strength=None) and scanning x0.3 to x10 around it."
        )
    return float(strength)


def _check_threshold(threshold: float) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise InputError(f"threshold must be a finite number >= 0, got {threshold!r} (MorphNet uses 1e-2 or 1e-3).")
    return float(threshold)


class FlopsRegularizer:
    """MorphNet's FLOPs regularizer over the live parameters of ``model``; a plain helper object.

    ``reg()`` (or ``reg.__call__()``) returns ``strength * sum_g marginal_FLOPs_g * sum_c gate_gc`` as a
    differentiable scalar (see the module docstring for the exact form). Add it to the training loss::

        reg = fxmorph.FlopsRegularizer(model, (x,))
        loss = F.cross_entropy(model(xb), yb) + reg()
        ...
        reg.zero_dead()                                  # gates below threshold -> exact zeros
        small = fxmorph.shrink(model, 1.0, (x,))         # its remove-dead pass drops them

    Preserves: the model is never modified except by :meth:`zero_dead`; the regularizer holds parameter
    names, not tensors, and reads them from the live model (unwrapped from DDP, DataParallel or
    ``torch.compile``) on every call, so it works before or after wrapping and after ``model.to(...)``.
    The architecture must stay the one analysed: after surgery, build a new regularizer.

    Args:
        model: the model being trained (or its DDP / DataParallel / compiled wrapper).
        example_inputs: a tensor or tuple of tensors the model accepts (used once, to trace and count FLOPs).
        strength: the weight lambda (> 0); ``None`` means ``1 / FLOPs`` of the model at construction.
        threshold: a channel is alive while its gate exceeds this (MorphNet: 1e-2 or 1e-3). It applies to
            ``|gamma|`` and to group-lasso norms alike.
        leaf_modules: extra leaf modules for tracing, as in :func:`fxmorph.trace`.

    Raises:
        InputError: no free group has a gate, or ``strength`` / ``threshold`` is out of range; bad model or
            inputs. Later, every method raises it when a parameter it reads is gone or changed shape (the
            architecture changed after construction: build a new regularizer). See ``docs/bad_input.md``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        strength: float | None = None,
        threshold: float = 1e-2,
        leaf_modules: Iterable[type | str] = (),
    ) -> None:
        self.threshold = _check_threshold(threshold)
        self._model = _unwrap(model)
        cg = analyze(self._model, example_inputs, leaf_modules=leaf_modules)
        self.cost = CostModel(cg)
        params = {name for name, _ in self._model.named_parameters()}
        gates = [_gate_of(cg, g, params) for g in cg.free_groups]
        self._gates = [g for g in gates if g is not None]
        if not self._gates:
            raise InputError(
                f"{type(self._model).__name__} has no channel gate to regularize: none of its "
                f"{len(cg.groups)} channel groups is both free and holds a parameter (every group is pinned, "
                "for example by the model's inputs and outputs). Fix: regularize a model with hidden layers "
                "whose width may change (conv/linear layers with BatchNorm or plain weights); `fxmorph.analyze("
                "model, inputs).explain()` lists each group and why it is pinned."
            )
        self._shapes = {
            s.name: tuple(self._model.get_parameter(s.name).shape) for g in self._gates for s in (*g.gates, *g.fan_out)
        }
        self._marginals = _Marginals(cg)
        self.initial_flops = self.cost.flops()
        self.strength = 1.0 / max(self.initial_flops, 1) if strength is None else _check_strength(strength)
        kinds = [g.kind for g in self._gates]
        logger.info(
            "FlopsRegularizer: %d gated groups (%d BatchNorm, %d group-lasso), %s FLOPs, strength %.3g",
            len(kinds),
            kinds.count("bn"),
            kinds.count("lasso"),
            f"{self.initial_flops:,}",
            self.strength,
        )

    # -- reading the model ---------------------------------------------------------------------------
    @property
    def groups(self) -> dict[int, str]:
        """Gated group ids and how each gate is read: ``"bn"`` or ``"lasso"``."""
        return {g.gid: g.kind for g in self._gates}

    def _param(self, name: str) -> torch.Tensor:
        try:
            p = self._model.get_parameter(name)
        except AttributeError as exc:
            raise InputError(
                f"the model no longer has parameter '{name}', which it had when this FlopsRegularizer was built: "
                "its architecture changed (surgery, a replaced layer); build a new FlopsRegularizer for it."
            ) from exc
        if tuple(p.shape) != self._shapes[name]:
            raise InputError(
                f"parameter '{name}' has shape {list(p.shape)}, but {list(self._shapes[name])} when this "
                "FlopsRegularizer was built: the model's architecture changed (surgery, a replaced layer); build a "
                "new FlopsRegularizer for it."
            )
        return p

    def _gate(self, gate: _Gate) -> torch.Tensor:
        if gate.kind == "bn":
            values = [_rows(self._param(s.name), s).abs().amax(1) for s in gate.gates]
            return torch.stack(values).amax(0)
        squares = sum(_rows(self._param(s.name), s).square().sum(1) for s in gate.gates)
        positive = squares > 0  # sqrt has no gradient at 0; a zero norm gets a zero (sub)gradient
        return torch.where(positive, squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt(), 0.0)

    def gates(self) -> dict[int, torch.Tensor]:
        """Per gated group, its gate per channel (differentiable, on the parameters' device)."""
        return {g.gid: self._gate(g) for g in self._gates}

    def _resolve(self, threshold: float | None) -> float:
        return self.threshold if threshold is None else _check_threshold(threshold)

    def dead_channels(self, threshold: float | None = None) -> dict[int, np.ndarray]:
        """Per gated group, the indices of channels whose gate is at most ``threshold`` (default: the
        regularizer's)."""
        limit = self._resolve(threshold)
        with torch.no_grad():
            return {gid: np.flatnonzero(gate.cpu().numpy() <= limit) for gid, gate in self.gates().items()}

    def alive_counts(self, threshold: float | None = None) -> dict[int, int]:
        """Per gated group, how many channels have a gate above ``threshold`` (may be 0)."""
        dead = self.dead_channels(threshold)
        return {g.gid: g.size - len(dead[g.gid]) for g in self._gates}

    def alive_widths(self, threshold: float | None = None) -> np.ndarray:
        """Width of every group (cost-model order) once dead channels are removed: alive counts, at least
        1 (remove-dead keeps one channel per group); ungated groups keep their size."""
        widths = self.cost.widths()
        for gid, count in self.alive_counts(threshold).items():
            widths[gid] = max(count, 1)
        return widths

    def flops_estimate(self, threshold: float | None = None) -> int:
        """FLOPs of the model with its dead channels removed (:meth:`alive_widths` in the cost model).
        Equals ``CostModel.flops()`` while every gate is above ``threshold``."""
        return self.cost.flops(self.alive_widths(threshold))

    def marginal_flops(self, widths: np.ndarray | None = None) -> dict[int, int]:
        """Per gated group, the exact FLOPs derivative ``dF/dw_g`` at ``widths`` (default: alive widths):
        the FLOPs one channel of the group costs given its neighbours' widths."""
        grad = self._marginals(self.alive_widths() if widths is None else widths)
        return {g.gid: int(grad[g.gid]) for g in self._gates}

    # -- the loss ------------------------------------------------------------------------------------
    def reg(self) -> torch.Tensor:
        """The regularization term: a scalar tensor that backpropagates into the model's gates."""
        gates = self.gates()
        with torch.no_grad():  # one device-to-host copy for all alive counts
            device = gates[self._gates[0].gid].device
            counts = torch.stack([(gates[g.gid] > self.threshold).sum().to(device) for g in self._gates]).cpu()
        widths = self.cost.widths()
        widths[[g.gid for g in self._gates]] = np.maximum(counts.numpy(), 1)
        marginal = self._marginals(widths)
        terms = [gates[g.gid].sum() * float(self.strength * marginal[g.gid]) for g in self._gates]
        return torch.stack(terms).sum()

    def __call__(self) -> torch.Tensor:
        """Same as :meth:`reg`."""
        return self.reg()

    # -- finishing ---------------------------------------------------------------------------------------
    def zero_dead(self, threshold: float | None = None, *, fan_out: bool = True) -> dict[int, np.ndarray]:
        """Set the dead channels' gates to exact zeros so that the remove-dead pass removes them.

        BatchNorm groups get ``gamma = 0``; with ``fan_out`` (default) their consumer weight columns are
        zeroed too, so remove-dead removes every dead channel wherever it sits, at the price of dropping
        the channel's constant output ``act(beta) * W`` (small after regularized training; fine-tune to
        recover). With ``fan_out=False`` remove-dead instead removes the channel exactly where its constant
        is 0 where it is read (``act(beta) = 0``), and folds a nonzero constant into the consumers' bias
        where no zero padding or grouping sits between them (see :class:`~fxmorph.passes.RemoveDeadPass`);
        it keeps the other channels.
        Group-lasso groups get every slice of the dead channel zeroed. Returns :meth:`dead_channels`.
        """
        dead = self.dead_channels(threshold)
        with torch.no_grad():
            for g in self._gates:
                index = dead[g.gid]
                if not len(index):
                    continue
                slices = g.gates + (g.fan_out if fan_out and g.kind == "bn" else ())
                for s in slices:
                    p = self._param(s.name)
                    positions = s.positions[torch.as_tensor(index)].reshape(-1).to(p.device)
                    p.movedim(s.dim, 0)[positions] = 0
        logger.info(
            "zero_dead: %d channels in %d groups",
            sum(len(v) for v in dead.values()),
            sum(bool(len(v)) for v in dead.values()),
        )
        return dead
