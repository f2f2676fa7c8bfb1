"""The ``remove-dead`` pass: remove channels that cannot affect the output.

Three kinds of dead channels are removed, each only where removal is exact:

1. **Zero fan-out**: every weight slice that reads the channel is exactly zero.
2. **Constant at every reader**: the channel's value where each layer reads it is the same for every
   input (:mod:`fxmorph.passes.dead_values` proves it from the weights: a BatchNorm with
   ``gamma = 0`` outputs ``beta``, a layer with zero weight rows its bias, through activations,
   elementwise ops, data movement and pooling). A reader that sees exactly 0 loses nothing when the
   channel goes, whatever its padding or groups (the most common dead channel: ``relu(beta <= 0)``
   after a zeroed gamma). A reader that sees ``k != 0`` gets ``k * W[:, c]`` folded into its bias,
   which is exact only for a Linear or an ungrouped convolution that no zero padding reaches (padding
   would replace ``k`` by 0 at the borders): otherwise the channel is kept.
3. **Silent on the data** (``calibrate=True``, with ``data``): the channel is exactly zero, on every
   calibration sample, at the input of every layer that reads it (a ReLU channel that never fires).
   Removal is exact on that data, and on any input that keeps the channel silent.

A channel of a group is dead only if it is dead at every reader of the group. Only groups whose
channels reach nothing but layers reading them through weights (and per-channel ops on the way)
qualify: the groups that can grow without changing the function. Preserves the function exactly (up
to floating-point rounding of the fold), in eval mode.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, Group, Role
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.passes.dead_index import GroupIndex, Site, as_numpy, reader_sites
from fxmorph.passes.dead_values import channel_values, zero_padded
from fxmorph.passes.importance import channel_positions
from fxmorph.passes.uniform import unsized_groups, width_classes
from fxmorph.surgery.apply import apply_plan
from fxmorph.validate import frozen_mode

__all__ = ["RemoveDeadPass"]

logger = logging.getLogger(__name__)


def _module(cg: ChannelGraph, path: str) -> nn.Module:
    """The submodule of the channel graph's model at ``path``."""
    return cg.gm.get_submodule(path)


def _zero_fan_out(index: GroupIndex, group: Group) -> np.ndarray:
    """Channels every weight slice reading them (role ``IN``) is exactly zero in."""
    reads = [m for m in group.params if m.role == Role.IN]
    dead = np.full(group.size, bool(reads))  # no reader through a weight: nothing shows a zero fan-out
    for m in reads:
        positions = channel_positions(index.cg, index.cg.bindings[(m.name, m.dim)].layout, group.id)
        # Every position of a channel (a flattened channel spans several input columns) must be zero.
        dead &= index.rows(m.name, m.dim, "zero")[positions].all(axis=1)
    return dead


def _foldable(module: nn.Module) -> bool:
    """Whether a constant input channel's contribution can be folded into the layer's bias exactly."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and module.groups == 1
        and not zero_padded(module)
    )


def _at_readers(values: dict[str, np.ndarray], sites: list[Site], size: int) -> dict[str, np.ndarray]:
    """Per reading layer, each channel's value at its input, the same at every call site (else NaN)."""
    out: dict[str, np.ndarray] = {}
    for site in sites:
        v = values.get(site.node, np.full(size, np.nan))
        prev = out.get(site.module)
        out[site.module] = v if prev is None else np.where(prev == v, v, np.nan)
    return out


def _constant_channels(
    cg: ChannelGraph, index: GroupIndex, group: Group, sites: list[Site] | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Channels whose value at every reader is a constant removal can account for (0, or ``k`` folded
    into a foldable reader's bias), and per reader the value to fold (0 where nothing is folded)."""
    if not sites:
        return np.zeros(group.size, dtype=bool), {}
    at = _at_readers(channel_values(index, group), sites, group.size)
    ok = np.ones(group.size, dtype=bool)
    for module, value in at.items():
        # A reader that sees 0 loses nothing; one that sees k != 0 must fold it exactly; NaN (not constant, or
        # unequal at its call sites) keeps the channel.
        ok &= (value == 0) | (np.isfinite(value) & _foldable(_module(cg, module)))
    return ok, {module: np.where(ok, value, 0.0) for module, value in at.items() if np.any(ok & (value != 0))}


def _folds(
    cg: ChannelGraph, group: Group, values: dict[str, np.ndarray], folded: np.ndarray
) -> dict[str, torch.Tensor]:
    """Per reading layer, ``sum over folded channels c of value_c * W[:, c]`` (summed over the kernel)."""
    deltas: dict[str, torch.Tensor] = {}
    for consumer, value in values.items():
        module = _module(cg, consumer)
        positions = channel_positions(cg, cg.bindings[(f"{consumer}.weight", 1)].layout, group.id)
        # In float64, so the fold is rounded once, when cast back to the layer's dtype. The kernel is summed: with
        # no zero padding, every tap of a constant channel reads k.
        weight = module.weight.detach().double().movedim(1, 0)  # [in, out, ...]
        per_in = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(2)  # [in, out]
        contribution = torch.zeros(per_in.shape[1], dtype=torch.float64)
        for c in np.flatnonzero(folded & (value != 0)):
            contribution += float(value[c]) * per_in[positions[c]].sum(0)
        deltas[consumer] = contribution.to(module.weight.dtype)
    return deltas


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps, per watched node, the max |value| per position of one dim."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, int]) -> None:
        super().__init__(gm)
        self.watch, self.peak = watch, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.watch and isinstance(value, torch.Tensor):
            dim = self.watch[n.name]
            others = [d for d in range(value.dim()) if d != dim]
            # The peak |value| per position over the batch and every other dim: silent means exactly 0 everywhere.
            peak = value.detach().abs().amax(others).double()
            self.peak[n.name] = torch.maximum(self.peak[n.name], peak) if n.name in self.peak else peak
        return value


def _silent(
    cg: ChannelGraph, sites: dict[int, list[Site] | None], data: Iterable[Any], batches: int
) -> dict[int, np.ndarray]:
    """Per group, the channels that are exactly zero at every reader's input on every batch."""
    readers = {gid: [(s.node, s.dim) for s in r] for gid, r in sites.items() if r}
    recorder = _Recorder(cg.gm, {node: dim for r in readers.values() for node, dim in r})
    # eval mode: BatchNorm judged (and left) with its running statistics, whatever the model's mode
    with torch.no_grad(), frozen_mode(cg.gm):
        for batch in itertools.islice(data, batches):
            inputs = batch[0] if isinstance(batch, list | tuple) else batch
            recorder.run(*(inputs if isinstance(inputs, list | tuple) else (inputs,)))
    out = {}
    for gid, reader_list in readers.items():
        silent = np.ones(cg.groups[gid].size, dtype=bool)
        for node, dim in reader_list:
            peak = recorder.peak.get(node)
            if peak is None:
                # No batch ran (empty data), or the value was no tensor: nothing is shown.
                silent[:] = False
                break
            layout = cg.spaces[node][dim]
            silent &= (peak.numpy()[channel_positions(cg, layout, gid)] == 0).all(axis=1)
        out[gid] = silent
    return out


@dataclass(frozen=True)
class RemoveDeadPass(Pass):
    """Remove dead channels (zero fan-out; constant where read: 0, or folded into the readers'
    biases; or, with ``calibrate`` and data, silent at every reader on every calibration batch).

    Preserves the function (exactly up to rounding of the folded bias), in eval mode: BatchNorm
    channels are judged and folded with their running statistics. Silent channels are removed
    exactly for the inputs on which they stay silent.

    Before/after: a conv whose BN has ``gamma = 0`` on 5 of 64 channels, read by a 1x1 conv ->
    the group has 59 channels and the 1x1 conv's bias holds ``act(beta) * W[:, c]`` of the 5. Read
    by a padded 3x3 conv instead, the channels with ``act(beta) = 0`` go (nothing to fold) and the
    others stay.
    """

    name: ClassVar[str] = "remove-dead"
    preserves_function: ClassVar[bool] = True
    calibrate: bool = False
    batches: int = 8
    uniform_blocks: bool = False
    """Remove as many channels from every group playing one role in the model's repeated blocks (see
    :mod:`fxmorph.passes.uniform`): as many as the group that can lose the fewest."""

    def promises_function(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        """Exact on every input, except channels removed as silent on the calibration data: those only on
        inputs that keep them silent, which the example inputs need not be."""
        return not (self.calibrate and ctx.data is not None)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        # Parameters with an exact zero somewhere: every kind of dead channel but silence starts from one.
        with_zeros = {name for name, p in gm.named_parameters() if not as_numpy(p).all()}
        calibrate = self.calibrate and ctx.data is not None
        if not with_zeros and not calibrate:  # a dead channel needs an exact zero somewhere
            return PassResult(gm, False, note="no dead channels")
        cg = self.analyse(gm)
        index = GroupIndex(cg)
        growable = [g for g in cg.groups if g.growable]
        sites = {g.id: reader_sites(index, g) for g in growable}
        silent = _silent(cg, sites, ctx.data, self.batches) if calibrate else {}
        found = {}
        for group in growable:
            dead = silent.get(group.id, np.zeros(group.size, dtype=bool))
            # No silent channel and no zero in the group's own tensors: nothing to find here.
            if dead.any() or any(p.name in with_zeros for p in group.params):
                found[group.id] = _dead_in(cg, index, group, dead, sites[group.id])
        if self.uniform_blocks:
            for gid in unsized_groups(cg):  # the model's config could not state these at another width
                found.pop(gid, None)
        _even_out(cg, found, width_classes(cg, [g.id for g in cg.groups], self.uniform_blocks)[0])
        plans: dict[int, GroupPlan] = {}
        deltas: dict[str, torch.Tensor] = {}
        for gid, channels in found.items():
            folded = channels.removed & ~channels.dead  # only channels that go are folded: a kept one adds itself
            if channels.fold_values and folded.any():
                for path, delta in _folds(cg, cg.groups[gid], channels.fold_values, folded).items():
                    deltas[path] = deltas.get(path, 0) + delta
            if channels.removed.any():
                plans[gid] = GroupPlan(tuple(int(i) for i in np.flatnonzero(~channels.removed)))
        if not plans:
            return PassResult(gm, False, note="no dead channels")
        plan = WidthPlan(plans, bias_deltas=deltas)
        changes = {g: (cg.groups[g].size, p.width) for g, p in plans.items()}
        removed = sum(a - b for a, b in changes.values())
        return PassResult(apply_plan(gm, cg, plan, seed=ctx.seed), True, changes, f"{removed} dead channels", plan)


@dataclass
class _Dead:
    """The channels of one group that can go: ``removed`` (dead or constant), ``dead`` (read by nothing that
    sees them), and the constant values a fold adds to the readers' biases."""

    removed: np.ndarray
    dead: np.ndarray
    fold_values: Any


def _dead_in(cg: ChannelGraph, index: GroupIndex, group: Group, silent: np.ndarray, sites: list[Site] | None) -> _Dead:
    """The channels of ``group`` that can go: silent, of zero fan-out, or constant at every reader."""
    dead = silent | _zero_fan_out(index, group)
    constant, fold_values = _constant_channels(cg, index, group, sites)
    removed = dead | constant
    if removed.all():
        removed[0] = False  # a group keeps one channel (so that one is not folded either)
    return _Dead(removed, dead, fold_values)


def _even_out(cg: ChannelGraph, found: dict[int, _Dead], classes: list[list[int]]) -> None:
    """Remove as many channels from every group of a class as from the one that can lose the fewest (none
    where a group is not in ``found``), in proportion to their sizes (a class may tie a stream to the heads and
    the MLP a config field sizes with it), keeping the dead ones removed first (they need no fold)."""
    for members in classes:
        lead = min(cg.groups[g].size for g in members)
        ratio = {g: cg.groups[g].size // lead for g in members}
        units = min((int(found[g].removed.sum()) // ratio[g] if g in found else 0) for g in members)
        for g in members:
            if g not in found:
                continue
            count = units * ratio[g]
            removed, dead = found[g].removed, found[g].dead
            # removable channels, those of zero fan-out first, in index order: the first ``count`` go
            order = sorted(np.flatnonzero(removed), key=lambda c: (not dead[c], c))
            found[g].removed = np.isin(np.arange(len(removed)), order[:count])
