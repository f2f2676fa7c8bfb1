"""Running statistics of new BatchNorm channels, and the signs of dual fan-ins behind activations."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.grow_init import dual_rows, vector_specs, zero_specs
from fxmorph.passes.grow_probe import Bridge, base_specs, forward_backward
from fxmorph.passes.grow_values import axes, group_slots, new_positions, read_new, stage_plan
from fxmorph.surgery.apply import apply_plan
from fxmorph.surgery.norm_stats import write_norm_stats
from fxmorph.validate import frozen_mode

__all__ = ["batch_inputs", "calibrate_norms", "dual_signs"]


def batch_inputs(batches: Sequence[Any], example_inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The model inputs of every batch (the example inputs when there is no data)."""
    if not batches:
        return [example_inputs]
    return [tuple(b[0]) if isinstance(b[0], list | tuple) else (b[0],) for b in batches]


def calibrate_norms(
    model: fx.GraphModule, cg: ChannelGraph, plan: WidthPlan, groups: Sequence[int], inputs: Sequence[tuple[Any, ...]]
) -> WidthPlan:
    """Set the running statistics of the new BatchNorm channels of ``groups`` from their inputs on
    ``inputs`` (eval mode; :func:`~fxmorph.surgery.norm_stats.write_norm_stats` writes them into
    ``model``); return ``plan`` with those values in its ``init``."""
    positions: dict[str, list[int]] = {}  # norm path -> positions of the new channels to measure
    for g in groups:
        for slot in group_slots(cg, cg.groups[g]):
            if slot.kind == "mean":
                amap = axes(cg, plan, cg.bindings[(slot.path, slot.dim)].layout)
                new = new_positions(amap, g, plan[g].new)[:, 0]  # a norm's channel axis holds each channel once
                positions.setdefault(slot.path.rpartition(".")[0], []).extend(new)
    if not positions:
        return plan
    # Measured on ``model`` (the grown model, so later norms see earlier new channels normalised), then copied into
    # the plan's init so that applying the plan elsewhere gives the same statistics.
    write_norm_stats(model, positions, inputs)
    out = {}
    for g, p in plan.items():
        init = dict(p.init)
        if g in groups:
            for slot in group_slots(cg, cg.groups[g]):
                if slot.kind in ("mean", "var"):
                    # Every mean and var slot has an init from base_specs already.
                    init[slot.path] = read_new(cg, plan, model, slot, g).to(init[slot.path].dtype)
        out[g] = GroupPlan(p.keep, p.new, init)
    return WidthPlan(out)


def dual_signs(
    cg: ChannelGraph,
    new: Mapping[int, int],
    found: Mapping[int, Bridge],
    batches: Sequence[Any],
    loss_fn: Callable[..., Any],
    seed: int,
) -> dict[int, np.ndarray]:
    """Per group, the sign (+-1) of each dual fan-in whose new channel gets the larger fan-out gradient.

    The bridging operator is linear, so it cannot tell ``psi`` from ``-psi``; an activation between
    (``relu`` keeps one side) can. A copy grown by both signs of every fan-in (fan-out zero, BatchNorm
    statistics measured) is run forward and backward on the batches, with its real activations."""
    # Both signs side by side: new channels 0..k-1 get ``+psi``, k..2k-1 get ``-psi``.
    structures = {g: GroupPlan(tuple(range(cg.groups[g].size)), 2 * k) for g, k in new.items()}
    plain = WidthPlan(structures)
    specs = {}
    for g, k in new.items():
        slots = group_slots(cg, cg.groups[g])
        rows = dual_rows(cg, g, found[g], k, seed)
        fanin = [s for s in slots if s.kind == "fanin"]
        fanout = [s for s in slots if s.kind == "fanout"]
        specs[g] = base_specs(slots, 2 * k) | vector_specs(cg, plain, fanin, torch.cat([rows, -rows]))
        specs[g] |= zero_specs(cg, plain, fanout, 2 * k)
    plan = stage_plan(cg, structures, specs)
    model = apply_plan(cg.gm, cg, plan)
    # Measured statistics, as the grown model will have them (dual measures them too): the activations see the
    # values they will see after growth.
    calibrate_norms(model, cg, plan, list(new), batch_inputs(batches, ()))
    with frozen_mode(model):
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        forward_backward(model, batches, loss_fn)
    out = {}
    for g, k in new.items():
        fanout = [s for s in group_slots(cg, cg.groups[g]) if s.kind == "fanout"]
        grads = torch.cat([read_new(cg, plan, model, s, g, grad=True).reshape(2 * k, -1) for s in fanout], dim=1)
        norms = grads.norm(dim=1).numpy()
        out[g] = np.where(norms[:k] >= norms[k:], 1.0, -1.0)  # a tie keeps +psi
    return out
