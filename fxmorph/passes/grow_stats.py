"""Running statistics of new BatchNorm channels, and the signs of dual fan-ins behind activations."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.grow_init import dual_rows, vector_specs, zero_specs
from fxmorph.passes.grow_probe import Bridge, base_specs, forward_backward
from fxmorph.passes.grow_values import axes, group_slots, new_positions, read_new, stage_plan
from fxmorph.surgery.apply import apply_plan
from fxmorph.validate import frozen_mode

__all__ = ["batch_inputs", "calibrate_norms", "dual_signs"]


def batch_inputs(batches: Sequence[Any], example_inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The model inputs of every batch (the example inputs when there is no data)."""
    if not batches:
        return [example_inputs]
    return [tuple(b[0]) if isinstance(b[0], list | tuple) else (b[0],) for b in batches]


class _Stats:
    """Forward pre-hook: running mean and variance of some channels of a BatchNorm's input, written
    into its statistics as they are measured (so norms further down see the new channels normalised)."""

    def __init__(self, positions: list[int]) -> None:
        self.pos = torch.as_tensor(positions, dtype=torch.long)
        self.n = 0
        self.total = torch.zeros(len(positions), dtype=torch.float64)
        self.squares = torch.zeros(len(positions), dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().index_select(1, self.pos.to(args[0].device)).movedim(1, 0).cpu().double()
        x = x.reshape(len(self.pos), -1)
        self.n += x.shape[1]
        self.total = self.total + x.sum(1)
        self.squares = self.squares + x.square().sum(1)
        mean = self.total / self.n
        var = (self.squares / self.n - mean.square()).clamp_min(0) * (self.n / max(self.n - 1, 1))
        var = torch.where(var > 1e-8, var, torch.ones_like(var))
        with torch.no_grad():
            pos = self.pos.to(module.running_mean.device)
            module.running_mean[pos] = mean.to(module.running_mean)
            module.running_var[pos] = var.to(module.running_var)


def calibrate_norms(
    model: fx.GraphModule, cg: ChannelGraph, plan: WidthPlan, groups: Sequence[int], inputs: Sequence[tuple[Any, ...]]
) -> WidthPlan:
    """Set the running statistics of the new BatchNorm channels of ``groups`` from their inputs on
    ``inputs`` (eval mode); return ``plan`` with those values in its ``init``."""
    hooks: dict[str, list[int]] = {}
    for g in groups:
        for slot in group_slots(cg, cg.groups[g]):
            if slot.kind == "mean":
                amap = axes(cg, plan, cg.bindings[(slot.path, slot.dim)].layout)
                hooks.setdefault(slot.path.rpartition(".")[0], []).extend(new_positions(amap, g, plan[g].new)[:, 0])
    if not hooks:
        return plan
    handles = [model.get_submodule(owner).register_forward_pre_hook(_Stats(pos)) for owner, pos in hooks.items()]
    try:
        with frozen_mode(model), torch.no_grad():
            for args in inputs:
                model(*args)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for g, p in plan.items():
        init = dict(p.init)
        if g in groups:
            for slot in group_slots(cg, cg.groups[g]):
                if slot.kind in ("mean", "var"):
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
        out[g] = np.where(norms[:k] >= norms[k:], 1.0, -1.0)
    return out
