"""The gradient-activation bridging operator of each growable group, by probing a grown copy.

For a group ``g`` let ``Psi`` be the fan-in of one new channel (its rows in every weight that computes
the group, concatenated) and ``Omega`` its fan-out (its columns in every weight that reads the group).
With the activations between them linearised at zero, the loss gradient is bilinear in the two:
``dL/dOmega = B psi`` when the fan-out is zero and ``dL/dPsi = B^T omega`` when the fan-in is zero,
and either way the model computes exactly what it computed before. ``B`` is GradMax's bridging matrix
``E[g_{l+1} h_{l-1}^T]`` generalised to whatever sits between producer and consumer: BatchNorm (eval
statistics), depthwise convolutions, residual adds, concatenations, pooling.

Both products come from one backward pass of a copy of the model grown by probe channels, in eval
mode, with every activation on a probed group replaced by the identity on the probe channels only.
Two passes give a randomised SVD (Halko, Martinsson and Tropp 2011; no power iteration, ``OVERSAMPLE``
times as many probe channels as singular values kept): ``Y = B Psi_0`` for a random orthonormal
``Psi_0``, ``Q = orth(Y)``, then ``Q^T B`` from ``B^T Q`` and its small SVD. The singular values rank
groups (gain per FLOP); the left singular vectors are GradMax fan-outs, the right ones dual fan-ins.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.ops import OpKind, node_facts
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.errors import InputError
from fxmorph.passes.grow_values import Slot, Spec, axes, embed, group_slots, read_new, stage_plan
from fxmorph.surgery.apply import apply_plan
from fxmorph.surgery.probes import insert_probe_mix, keep_activation_input

__all__ = [
    "Bridge",
    "base_specs",
    "bridges",
    "forward_backward",
    "orthonormal",
    "split_rows",
    "take_batches",
    "vector_spec",
]

logger = logging.getLogger(__name__)

OVERSAMPLE = 2
"""Probe channels per singular value asked for (randomised SVD oversampling)."""


@dataclass(frozen=True)
class Bridge:
    """Top of the SVD of a group's bridging operator: singular values ``s`` (descending), left
    vectors ``u`` (``[fan-out size, r]``, over ``fanout`` slots) and right vectors ``v`` (``[fan-in
    size, r]``, over ``fanin`` slots)."""

    s: np.ndarray
    u: torch.Tensor
    v: torch.Tensor
    fanin: tuple[Slot, ...]
    fanout: tuple[Slot, ...]


def take_batches(data: Iterable[Any] | None, count: int) -> list[Any]:
    """The first ``count`` batches of ``data`` (read once, so every pass sees the same batches)."""
    if data is None:
        return []
    batches = list(itertools.islice(data, count))
    if not batches:
        raise InputError("data yielded no batch: pass an iterable of (inputs, targets) with at least one batch.")
    return batches


def _split(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(inputs as a tuple, target)`` of one ``(inputs, target)`` batch."""
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise InputError("each batch of data must be a pair (inputs, targets).")
    inputs = batch[0]
    return (tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)), batch[1]


def forward_backward(model: nn.Module, batches: Sequence[Any], loss_fn: Callable[..., Any]) -> None:
    """Accumulate the mean gradient of ``loss_fn`` over ``batches`` into ``model``'s ``.grad``."""
    with torch.enable_grad():
        for batch in batches:
            inputs, target = _split(batch)
            loss = loss_fn(model(*inputs), target)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise InputError("loss_fn must return a scalar tensor: reduce the loss (for example with .mean()).")
            (loss / len(batches)).backward()  # gradients accumulate over the batches: their mean


def split_rows(vector: torch.Tensor, slots: Sequence[Slot]) -> list[torch.Tensor]:
    """Cut ``[count, sum of row sizes]`` into one ``[count, *row_shape]`` tensor per slot."""
    out, start = [], 0
    for slot in slots:
        out.append(vector[:, start : start + slot.row_numel].reshape(vector.shape[0], *slot.row_shape))
        start += slot.row_numel
    return out


def _constant(value: float, dim: int, new: int) -> Spec:
    """A spec filling the new channels of ``dim`` with ``value``."""

    def spec(staged: torch.Tensor) -> torch.Tensor:
        shape = list(staged.shape)
        shape[dim] = new
        return torch.full(shape, value, dtype=staged.dtype)

    return spec


def _identity_kernel(dim: int, new: int) -> Spec:
    """A spec giving the new channels of a depthwise weight ``[C, 1, *kernel]`` the identity kernel."""

    def spec(staged: torch.Tensor) -> torch.Tensor:
        shape = list(staged.shape)
        shape[dim] = new
        out = torch.zeros(shape, dtype=staged.dtype)
        out[(slice(None), slice(None), *(k // 2 for k in shape[2:]))] = 1.0  # one at the centre tap
        return out

    return spec


# A BatchNorm of new channels starts as the identity (up to its eps) and biases add nothing, so the probe sees the
# bridge, not an offset.
_CONSTANTS = {"norm_weight": 1.0, "norm_bias": 0.0, "mean": 0.0, "var": 1.0, "bias": 0.0}


def base_specs(slots: Sequence[Slot], new: int) -> dict[tuple[str, int], Spec]:
    """Specs of the per-channel slots: BatchNorm scale 1, shift 0, statistics (0, 1), biases 0,
    depthwise kernels the identity (a one at the centre tap)."""
    out: dict[tuple[str, int], Spec] = {}
    for slot in slots:
        if slot.kind in _CONSTANTS:
            out[(slot.path, slot.dim)] = _constant(_CONSTANTS[slot.kind], slot.dim, new)
        elif slot.kind == "kernel":
            out[(slot.path, slot.dim)] = _identity_kernel(slot.dim, new)
    return out


def vector_spec(cg: ChannelGraph, structure: WidthPlan, slot: Slot, rows: torch.Tensor) -> Spec:
    """A spec giving the new channels ``rows`` (``[new, *row_shape]``) in ``slot``."""
    return lambda staged: embed(cg, structure, slot, rows, staged)


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An activation the probe linearises: by the op table, a nonlinear elementwise activation with
    ``f(0) = 0`` that does not write into its input (``relu_``: the graph relies on the mutation)."""
    facts = node_facts(node, gm)
    return facts.kind is OpKind.ACTIVATION and facts.zero_preserving and not facts.inplace


def linearise(model: fx.GraphModule, cg: ChannelGraph, plan: WidthPlan, probed: set[int]) -> None:
    """Make every activation on a probed group act as the identity on the new channels (in place)."""
    count = 0
    # The masks live where the model does (a model without parameters: the CPU)
    device = next(iter(model.parameters()), torch.empty(0)).device
    for node in list(model.graph.nodes):
        spaces = cg.spaces.get(node.name)
        if not isinstance(spaces, dict) or not _is_activation(model, node) or not keep_activation_input(model, node):
            continue
        for dim, layout in spaces.items():
            amap = axes(cg, plan, layout)
            positions = [p for p, g, _, _ in amap.slots if g in probed]
            if not positions:
                continue
            mask = torch.zeros(len(amap.source), dtype=torch.bool, device=device)
            mask[positions] = True
            insert_probe_mix(model, node, mask, dim, count)
            count += 1
            break
    model.recompile()


def _probe(
    cg: ChannelGraph,
    slots: Mapping[int, list[Slot]],
    structure: dict[int, GroupPlan],
    vectors: Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]],
    batches: Sequence[Any],
    loss_fn: Callable[..., Any],
) -> fx.GraphModule:
    """Grow a copy by the probe channels (fan-in and fan-out rows from ``vectors``, zero where
    ``None``), linearise it, and accumulate the gradient of the loss."""
    plain = WidthPlan(structure)
    specs: dict[int, dict[tuple[str, int], Spec]] = {}
    for gid, (fanin, fanout) in vectors.items():
        new = structure[gid].new
        per = base_specs(slots[gid], new)
        for kind, rows in (("fanin", fanin), ("fanout", fanout)):
            chosen = [s for s in slots[gid] if s.kind == kind]
            values = split_rows(rows, chosen) if rows is not None else [None] * len(chosen)
            for slot, value in zip(chosen, values, strict=True):
                value = value if value is not None else torch.zeros((new, *slot.row_shape), dtype=torch.float64)
                per[(slot.path, slot.dim)] = vector_spec(cg, plain, slot, value)
        specs[gid] = per
    plan = stage_plan(cg, structure, specs)
    model = apply_plan(cg.gm, cg, plan)
    linearise(model, cg, plan, set(vectors))
    # Eval mode: BatchNorm uses its running statistics (the bridge is defined with them) and dropout is off.
    model.eval()
    for p in model.parameters():
        # The copy's own tensors: the gradients of parameters the user froze are needed too.
        p.requires_grad_(True)
        p.grad = None
    forward_backward(model, batches, loss_fn)
    return model


def _read(cg: ChannelGraph, plan: WidthPlan, model: fx.GraphModule, slots: Sequence[Slot], gid: int) -> torch.Tensor:
    """``[new, sum of row sizes]``: the gradients of group ``gid``'s new channels in ``slots``, concatenated."""
    parts = [read_new(cg, plan, model, s, gid, grad=True).reshape(plan[gid].new, -1) for s in slots]
    return torch.cat(parts, dim=1)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``[rows, cols]`` matrix with orthonormal columns, drawn from ``generator``."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def bridges(
    cg: ChannelGraph, groups: Sequence[int], batches: Sequence[Any], loss_fn: Callable[..., Any], rank: int, seed: int
) -> dict[int, Bridge]:
    """The top-``rank`` SVD of the bridging operator of every group in ``groups`` (two probe passes)."""
    generator = torch.Generator().manual_seed(seed)
    slots = {g: group_slots(cg, cg.groups[g]) for g in groups}
    fanin = {g: [s for s in slots[g] if s.kind == "fanin"] for g in groups}
    fanout = {g: [s for s in slots[g] if s.kind == "fanout"] for g in groups}
    size_in = {g: sum(s.row_numel for s in fanin[g]) for g in groups}
    size_out = {g: sum(s.row_numel for s in fanout[g]) for g in groups}
    # B has no more singular values than its smaller side.
    ranks = {g: min(OVERSAMPLE * rank, size_in[g], size_out[g]) for g in groups}
    live = [g for g in groups if ranks[g] > 0]
    if not live:
        return {}
    structure = {g: GroupPlan(tuple(range(cg.groups[g].size)), ranks[g]) for g in live}
    psi0 = {g: _orthonormal(size_in[g], ranks[g], generator) for g in live}
    model = _probe(cg, slots, structure, {g: (psi0[g].T, None) for g in live}, batches, loss_fn)
    plain = WidthPlan(structure)
    q = {}
    for g in live:
        y = _read(cg, plain, model, fanout[g], g)  # [r, out] = (B psi0)^T
        # An all-zero gradient (the loss does not reach the group) has no range to orthonormalise: a random basis,
        # and the second pass shows B is zero there.
        q[g] = torch.linalg.qr(y.T)[0] if y.abs().max() > 0 else _orthonormal(size_out[g], ranks[g], generator)
    # The first probe copy goes before the second is built: two at once could double the memory of a large model.
    del model
    model = _probe(cg, slots, structure, {g: (None, q[g].T) for g in live}, batches, loss_fn)
    out = {}
    for g in live:
        z = _read(cg, plain, model, fanin[g], g)  # [r, in] = Q^T B
        u_small, s, vh = torch.linalg.svd(z, full_matrices=False)
        top = min(rank, len(s))
        out[g] = Bridge(s[:top].numpy(), (q[g] @ u_small)[:, :top], vh[:top].T, tuple(fanin[g]), tuple(fanout[g]))
        logger.debug("group %d: top singular values %s", g, np.round(s.numpy()[:3], 6))
    return out


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A seeded random ``[rows, cols]`` matrix with orthonormal columns (``cols <= rows``)."""
    return _orthonormal(rows, cols, torch.Generator().manual_seed(seed))
