"""Initial values of grown channels: every init keeps the function at the moment of growth.

- ``gradmax`` (Evci et al. 2022): zero fan-in and bias, fan-out the top left singular vectors of the
  bridging operator (``scale`` times the mean fan-out norm of the existing channels). The new channel
  outputs exactly zero, so the function is unchanged whatever the fan-out; its fan-in gradient is
  ``sigma'(0) * B^T omega``, the largest possible. Valid only where every op between producer and
  consumer keeps zero at zero with a nonzero slope there: not behind PyTorch's ``relu`` (slope 0 at 0)
  and not behind BatchNorm (a zero-variance channel scales its gradient by ``1/sqrt(eps)`` in train
  mode); such groups fall back to ``dual``.
- ``dual``: zero fan-out, fan-in the top right singular vectors (the mean fan-in norm of the existing
  channels), each with the sign that gives its channel the larger fan-out gradient through the real
  activations (``relu`` keeps one side; the linear operator cannot tell). The fan-out gradient
  ``E[g h_new]`` is nonzero from the first step; BatchNorm channels get statistics measured on the data.
- ``net2net`` (Chen et al. 2016): split the most important channels: each split channel is replaced
  by copies of itself (fan-in, biases, norm parameters and statistics copied), their fan-outs sharing
  the original, times ``1 + noise * n_j`` with ``sum_j n_j = 0`` so the sum is exact and the copies
  learn apart. Needs no data. Only where every reader is a dense weight and every channel sits at
  one position of each axis; elsewhere ``dual`` with data, ``zero`` without.
- ``zero``: zero fan-out, fan-in drawn as PyTorch draws Linear and Conv weights (surgery's default).
- ``auto``: ``gradmax`` where valid and ``dual`` elsewhere when there is data; ``net2net`` where valid
  and ``zero`` elsewhere when there is none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from fxmorph.analysis import ChannelGraph, Group
from fxmorph.analysis.ops import OpKind, node_facts
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.grow_probe import Bridge, base_specs, split_rows, vector_spec
from fxmorph.passes.grow_values import Slot, Spec, dense_reader, group_slots, original_rows, tensor_at
from fxmorph.passes.importance import channel_positions

__all__ = [
    "DATA_INITS",
    "INITS",
    "Choice",
    "choose",
    "dual_rows",
    "gradmax_problem",
    "net2net_problem",
    "specs_for",
    "structure_for",
    "vector_specs",
    "zero_specs",
]

SpecMap = dict[tuple[str, int], Spec]
"""Specs by (parameter path, dim)."""

INITS = ("auto", "gradmax", "dual", "net2net", "zero")
DATA_INITS = ("gradmax", "dual")
"""Inits that need data (the bridging operator comes from gradients)."""


@dataclass(frozen=True)
class Choice:
    """The init a group gets (``init``) and why, where it differs from the one asked for (``note``)."""

    init: str
    note: str = ""


def _node_problem(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a zero channel through ``node`` would not stay zero with a nonzero gradient (op table facts)."""
    if node.op in ("get_attr", "placeholder", "output"):
        return None
    facts = node_facts(node, gm)
    # A layer makes the group (zero fan-in and bias: a zero channel) or reads it; a shape query reads no value.
    if facts.kind in (OpKind.LAYER, OpKind.SHAPE):
        return None
    if node.op == "call_module":
        what = type(gm.get_submodule(str(node.target))).__name__
    elif node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
    else:
        what = f".{node.target}()"
    if facts.zero_preserving and facts.slope_at_zero == 0:
        return f"{what} has zero slope at 0"
    if facts.zero_preserving and facts.slope_at_zero is not None:
        return None
    return f"'{what}' is not known to keep zero at zero with a nonzero slope"


def gradmax_problem(cg: ChannelGraph, group: Group, slots: Sequence[Slot]) -> str | None:
    """Why a zero-fan-in channel of ``group`` would not train or not stay zero (``None`` if it would)."""
    if any(s.kind in ("norm_weight", "mean") for s in slots):
        return "BatchNorm would see a zero-variance channel (gradient ~1/sqrt(eps))"
    if any(s.kind == "other" for s in slots):
        return "the group has parameters of unknown kind"
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    for member in group.tensors:
        node = nodes.get(member.name.split("[", 1)[0])  # an element of a tuple-valued node counts for the node
        problem = None if node is None else _node_problem(cg.gm, node)
        if problem is not None:
            return problem
    return None


def net2net_problem(cg: ChannelGraph, slots: Sequence[Slot]) -> str | None:
    """Why splitting channels of a group would not be exact (``None`` if it would)."""
    if any(s.spread != 1 for s in slots):
        return "a channel repeats along an axis (flatten, grouped convolution or repeated pieces)"
    if len({s.path for s in slots}) < len(slots):  # its rows are copied and its columns shared: one spec per path
        return "a parameter both reads and makes the group's channels (a layer applied to its own output)"
    if any(s.kind == "fanout" and not dense_reader(cg, s) for s in slots):
        return "a reader is not a Linear or an ungrouped convolution"
    return None


def choose(
    requested: str, cg: ChannelGraph, group: Group, slots: Sequence[Slot], bridge: Bridge | None, has_data: bool
) -> Choice:
    """The init ``group`` gets when ``requested`` is asked for."""
    fallback = "dual" if bridge is not None else "zero"
    if requested == "auto":
        if has_data and bridge is not None:
            return Choice("gradmax") if gradmax_problem(cg, group, slots) is None else Choice("dual")
        return Choice("net2net") if net2net_problem(cg, slots) is None else Choice("zero")
    if requested in DATA_INITS and bridge is None:
        return Choice("zero", f"{requested} -> zero: no bridging operator (no fan-in or no fan-out weights)")
    if requested == "gradmax" and (problem := gradmax_problem(cg, group, slots)) is not None:
        return Choice("dual", f"gradmax -> dual: {problem}")
    if requested == "net2net" and (problem := net2net_problem(cg, slots)) is not None:
        return Choice(fallback, f"net2net -> {fallback}: {problem}")
    return Choice(requested)


def _norms(cg: ChannelGraph, group: Group, slots: Sequence[Slot]) -> float:
    """Mean norm, over the existing channels, of their values concatenated over ``slots``."""
    total = np.zeros(group.size)
    for slot in slots:
        tensor = tensor_at(cg.gm, slot.path).detach().cpu().double().movedim(slot.dim, 0)
        per_position = tensor.reshape(tensor.shape[0], -1).square().sum(1).numpy()
        total += per_position[channel_positions(cg, cg.bindings[(slot.path, slot.dim)].layout, group.id)].sum(1)
    return float(np.sqrt(total).mean()) if slots else 0.0


def _directions(basis: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``[count, dim]`` unit rows: the columns of ``basis`` first, then seeded random directions."""
    rows = [basis.T[:count]]
    # The basis has at most rank-many columns; channels beyond them get random directions.
    if count > basis.shape[1]:
        extra = torch.randn(
            count - basis.shape[1], basis.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        rows.append(extra / extra.norm(dim=1, keepdim=True).clamp_min(1e-12))  # the clamp only guards a zero draw
    return torch.cat(rows)


def vector_specs(cg: ChannelGraph, plain: WidthPlan, slots: Sequence[Slot], rows: torch.Tensor) -> SpecMap:
    """Specs giving the new channels ``rows`` (``[new, sum of row sizes]``) cut over ``slots``."""
    return {(s.path, s.dim): vector_spec(cg, plain, s, r) for s, r in zip(slots, split_rows(rows, slots), strict=True)}


def zero_specs(cg: ChannelGraph, plain: WidthPlan, slots: Sequence[Slot], new: int) -> SpecMap:
    """Specs giving the new channels zeros in ``slots``."""
    return {
        (s.path, s.dim): vector_spec(cg, plain, s, torch.zeros(new, *s.row_shape, dtype=torch.float64)) for s in slots
    }


def _uniform(cg: ChannelGraph, plain: WidthPlan, slots: Sequence[Slot], new: int, seed: int) -> SpecMap:
    """Rows drawn uniformly in +-1/sqrt(fan_in), as PyTorch initialises Linear and Conv weights."""
    out = {}
    generator = torch.Generator().manual_seed(seed)
    for s in slots:
        bound = 1.0 / math.sqrt(max(s.row_numel, 1))
        rows = (torch.rand(new, *s.row_shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        out[(s.path, s.dim)] = vector_spec(cg, plain, s, rows)
    return out


def _split_specs(
    cg: ChannelGraph, slots: Sequence[Slot], gid: int, sources: Sequence[int], noise: float, seed: int
) -> SpecMap:
    """Net2Net: copies of the ``sources`` in every defining slot; shares of their fan-out."""
    copies = np.asarray(sources, dtype=np.int64)
    # Per copy, how many copies its source has: each takes 1/count of the source's fan-out.
    counts = np.bincount(copies, minlength=int(copies.max()) + 1)[copies]
    mix = torch.randn(len(copies), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for c in np.unique(copies):
        where = torch.as_tensor(np.flatnonzero(copies == c))
        # Centred per source: the copies' shares still sum to exactly 1, so the split keeps the function.
        mix[where] -= mix[where].mean()
    share = torch.as_tensor(1.0 / counts) * (1.0 + noise * mix)
    return {(s.path, s.dim): _copy_spec(cg, s, gid, copies, share if s.kind == "fanout" else None) for s in slots}


def _copy_spec(cg: ChannelGraph, slot: Slot, gid: int, copies: np.ndarray, share: torch.Tensor | None) -> Spec:
    """The old channels ``copies`` of ``slot``, each times its ``share`` (when given)."""

    def spec(staged: torch.Tensor) -> torch.Tensor:
        rows = original_rows(cg, slot, gid, copies, staged)
        if share is None:
            return rows
        shape = [1] * rows.dim()
        shape[slot.dim] = -1
        return rows * share.to(rows.dtype).view(shape)

    return spec


def _sources(size: int, new: int, scores: np.ndarray | None) -> list[int]:
    """Channels to split for ``new`` more, most important first (cycling when ``new > size``), sorted:
    each appears once per extra copy."""
    order = np.argsort(-(scores if scores is not None else np.ones(size)), kind="stable")
    # Sorted so the copies of one channel sit together, in channel order.
    return sorted(int(order[i % size]) for i in range(new))


def structure_for(cg: ChannelGraph, gid: int, init: str, new: int, scores: np.ndarray | None) -> GroupPlan:
    """Keep and new of group ``gid`` growing by ``new`` channels: Net2Net replaces each split channel by
    its copies (so the split channels leave ``keep``); the others keep every channel."""
    size = cg.groups[gid].size
    if init != "net2net":
        return GroupPlan(tuple(range(size)), new)
    removed = set(_sources(size, new, scores))
    # A split channel leaves keep and comes back as one more copy.
    return GroupPlan(tuple(c for c in range(size) if c not in removed), new + len(removed))


def dual_rows(cg: ChannelGraph, gid: int, bridge: Bridge, new: int, seed: int) -> torch.Tensor:
    """``[new, fan-in size]``: the dual init's fan-ins (top right singular vectors, then random
    directions), at the mean fan-in norm of the existing channels."""
    group = cg.groups[gid]
    fanin = [s for s in group_slots(cg, group) if s.kind == "fanin"]
    return _directions(bridge.v, new, seed + gid) * _norms(cg, group, fanin)


def specs_for(
    cg: ChannelGraph,
    plain: WidthPlan,
    gid: int,
    init: str,
    *,
    bridge: Bridge | None,
    scores: np.ndarray | None = None,
    signs: np.ndarray | None = None,
    scale: float = 0.5,
    noise: float = 0.01,
    seed: int = 0,
) -> SpecMap:
    """Value specs of the new channels of group ``gid`` under ``init``; ``plain`` holds the structure
    (keep, new) of every growing group, from :func:`structure_for` (Net2Net with the same ``scores``).
    ``signs`` (``+-1`` per new channel) flip dual fan-ins."""
    group = cg.groups[gid]
    slots = group_slots(cg, group)
    new = plain[gid].new
    if init == "net2net":
        # ``plain`` counts the split channels among the new ones (structure_for): take them off to get the channels
        # asked for, then each source once more for the copy that replaces the original.
        sources = _sources(group.size, new - (group.size - len(plain[gid].keep)), scores)
        copies = sorted(sources + sorted(set(sources)))
        # A prime stride keeps (seed, group) pairs from sharing a random stream.
        return _split_specs(cg, slots, gid, copies, noise, seed * 1_000_003 + gid)
    specs = base_specs(slots, new)
    fanin = [s for s in slots if s.kind == "fanin"]
    fanout = [s for s in slots if s.kind == "fanout"]
    if init == "gradmax":
        assert bridge is not None
        rows = _directions(bridge.u, new, seed + gid) * scale * _norms(cg, group, fanout)
        specs.update(zero_specs(cg, plain, fanin, new) | vector_specs(cg, plain, fanout, rows))
    elif init == "dual":
        assert bridge is not None
        rows = dual_rows(cg, gid, bridge, new, seed)
        if signs is not None:
            rows = rows * torch.as_tensor(signs, dtype=rows.dtype)[:, None]
        specs.update(vector_specs(cg, plain, fanin, rows) | zero_specs(cg, plain, fanout, new))
    else:
        kernels = [s for s in slots if s.kind == "kernel"]
        # A depthwise kernel is the channel's fan-in: drawn like the other fan-ins.
        specs.update(_uniform(cg, plain, fanin + kernels, new, seed + gid) | zero_specs(cg, plain, fanout, new))
    return specs
