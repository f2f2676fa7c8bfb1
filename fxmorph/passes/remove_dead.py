"""The ``remove-dead`` pass: remove channels that cannot affect the output.

Two kinds of dead channels are removed, each only where removal is exact:

1. **Zero fan-out**: every weight slice that reads the channel is exactly zero.
2. **Constant**: the channel's value is a constant ``k`` everywhere (its producer's weight rows are
   zero, so it outputs its bias; or a BatchNorm with ``gamma = 0`` outputs its ``beta``), possibly
   through elementwise activations (``act(k)``). Its contribution ``k * W[:, c]`` is folded into each
   consumer's bias. That is exact only when no zero padding sits between the channel and the
   consumer (padding would replace ``k`` by 0 at the borders), so a channel read by a padded
   convolution is kept; so is one read by a grouped convolution, or made by one (its channels
   repeat once per group).

3. **Silent on the data** (``calibrate=True``, with ``data``): the channel is exactly zero, on every
   calibration sample, at the input of every layer that reads it (a ReLU channel that never fires).
   Removal is exact on that data, and on any input that keeps the channel silent.

A channel of a group is dead only if it is dead in every member. Only groups whose channels reach
nothing but parameter reads and elementwise ops qualify (the same groups that can grow without
changing the function). Preserves the function exactly (up to floating-point rounding of the fold).
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

from fxmorph.analysis import ChannelGraph, Group
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.passes.importance import channel_positions
from fxmorph.plan import GroupPlan, WidthPlan
from fxmorph.surgery.apply import apply_plan
from fxmorph.trace import frozen_mode

__all__ = ["RemoveDeadPass"]

logger = logging.getLogger(__name__)

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_NORM = nn.modules.batchnorm._BatchNorm
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
              nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout)  # fmt: skip


def _module(cg: ChannelGraph, path: str) -> nn.Module:
    return cg.gm.get_submodule(path)


def _slices(cg: ChannelGraph, group: Group, role: str) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """(path, tensor moved to put the bound dim first, positions per channel) of every ``role`` slice."""
    out = []
    for m in group.params:
        if m.role != role:
            continue
        owner, _, leaf = m.name.rpartition(".")
        tensor = getattr(_module(cg, owner) if owner else cg.gm, leaf)
        positions = channel_positions(cg, cg.bindings[(m.name, m.dim)].layout, group.id)
        out.append((m.name, tensor.detach().movedim(m.dim, 0), positions))
    return out


def _zero_rows(tensor: torch.Tensor, positions: np.ndarray) -> np.ndarray:
    flat = tensor.reshape(tensor.shape[0], -1)
    zero = (flat == 0).all(dim=1).numpy()
    return zero[positions].all(axis=1)


def _zero_fan_out(cg: ChannelGraph, group: Group) -> np.ndarray:
    reads = _slices(cg, group, "in")
    if not reads:
        return np.zeros(group.size, dtype=bool)
    dead = np.ones(group.size, dtype=bool)
    for _, tensor, positions in reads:
        dead &= _zero_rows(tensor, positions)
    return dead


@dataclass
class _Chain:
    """A group made by one layer, optionally a BatchNorm, then elementwise activations."""

    layer: str
    norm: str | None
    activations: list[nn.Module]
    consumers: list[str]


def _chain(cg: ChannelGraph, group: Group) -> _Chain | None:
    producers = {p.name.rpartition(".")[0] for p in group.producers}
    layers = [p for p in producers if isinstance(_module(cg, p), _LAYERS)]
    norms = [p for p in producers if isinstance(_module(cg, p), _NORM)]
    if len(layers) != 1 or len(norms) > 1 or len(producers) != len(layers) + len(norms):
        return None
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    activations: list[nn.Module] = []
    for member in group.tensors:
        node = nodes.get(member.name)
        if node is None or node.op != "call_module":
            return None
        module = _module(cg, str(node.target))
        if isinstance(module, _POINTWISE):
            activations.append(module)
        elif str(node.target) not in producers:
            return None
    consumers = sorted({p.name.rpartition(".")[0] for p in group.consumers})
    return _Chain(layers[0], norms[0] if norms else None, activations, consumers)


def _foldable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        padding = module.padding
        return module.padding_mode == "zeros" and padding != "same" and all(p == 0 for p in np.atleast_1d(padding))
    return False


def _single_occurrence(cg: ChannelGraph, chain: _Chain, group: Group) -> bool:
    """True if each channel is one row of the producer (not repeated, as in a grouped conv's output)."""
    names = [f"{chain.layer}.weight"] + ([f"{chain.norm}.weight"] if chain.norm else [])
    return all(channel_positions(cg, cg.bindings[(n, 0)].layout, group.id).shape[1] == 1 for n in names)


def _constant_values(cg: ChannelGraph, chain: _Chain, group: Group) -> tuple[np.ndarray, np.ndarray]:
    """Which channels are constant, and their value after the chain's norm and activations."""
    layer = _module(cg, chain.layer)
    rows = channel_positions(cg, cg.bindings[(f"{chain.layer}.weight", 0)].layout, group.id)[:, 0]
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    constant = (weight[rows] == 0).all(dim=1).numpy()
    value = torch.zeros(group.size, dtype=torch.float64)
    if layer.bias is not None:
        value = layer.bias.detach()[rows].double()
    if chain.norm is not None:
        bn = _module(cg, chain.norm)
        idx = channel_positions(cg, cg.bindings[(f"{chain.norm}.weight", 0)].layout, group.id)[:, 0]
        gamma, beta = bn.weight.detach().double()[idx], bn.bias.detach().double()[idx]
        mean, var = bn.running_mean.double()[idx], bn.running_var.double()[idx]
        constant |= (gamma == 0).numpy()
        value = torch.where(gamma == 0, beta, gamma * (value - mean) / torch.sqrt(var + bn.eps) + beta)
    with torch.no_grad():
        for act in chain.activations:
            with frozen_mode(act):  # eval behaviour without leaving the module's flag changed
                value = act(value)
    return constant, value.numpy()


def _folds(
    cg: ChannelGraph, chain: _Chain, group: Group, dead: np.ndarray, value: np.ndarray
) -> dict[str, torch.Tensor]:
    deltas: dict[str, torch.Tensor] = {}
    for consumer in chain.consumers:
        module = _module(cg, consumer)
        binding = cg.bindings[(f"{consumer}.weight", 1)]
        positions = channel_positions(cg, binding.layout, group.id)
        weight = module.weight.detach().double().movedim(1, 0)  # [in, out, ...]
        per_in = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(2)  # [in, out]
        contribution = torch.zeros(per_in.shape[1], dtype=torch.float64)
        for c in np.flatnonzero(dead):
            contribution += float(value[c]) * per_in[positions[c]].sum(0)
        deltas[consumer] = contribution.to(module.weight.dtype)
    return deltas


def _reader_inputs(cg: ChannelGraph, group: Group) -> list[tuple[str, int]] | None:
    """``(node, dim)`` of the tensor each layer reading the group takes in (None if one is unknown)."""
    by_target = {str(n.target): n for n in cg.gm.graph.nodes if n.op == "call_module"}
    out = []
    for m in group.consumers:
        node = by_target.get(m.name.rpartition(".")[0])
        if node is None or not isinstance(node.args[0], fx.Node):
            return None
        dims = [d for d, layout in (cg.spaces.get(node.args[0].name) or {}).items()
                if any(g == group.id for g, _ in cg.layout_groups(layout))]  # fmt: skip
        if len(dims) != 1:
            return None
        out.append((node.args[0].name, dims[0]))
    return out or None


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
            peak = value.detach().abs().amax(others).double()
            self.peak[n.name] = torch.maximum(self.peak[n.name], peak) if n.name in self.peak else peak
        return value


def _silent(cg: ChannelGraph, groups: list[Group], data: Iterable[Any], batches: int) -> dict[int, np.ndarray]:
    """Per group, the channels that are exactly zero at every reader's input on every batch."""
    readers = {g.id: r for g in groups if (r := _reader_inputs(cg, g)) is not None}
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
                silent[:] = False
                break
            layout = cg.spaces[node][dim]
            silent &= (peak.numpy()[channel_positions(cg, layout, gid)] == 0).all(axis=1)
        out[gid] = silent
    return out


@dataclass(frozen=True)
class RemoveDeadPass(Pass):
    """Remove dead channels (zero fan-out, or constant and folded into the consumers' biases, or,
    with ``calibrate`` and data, silent at every reader on every calibration batch).

    Preserves the function (exactly up to rounding of the folded bias), in eval mode: BatchNorm
    channels are judged and folded with their running statistics. Silent channels are removed
    exactly for the inputs on which they stay silent.

    Before/after: a conv whose BN has ``gamma = 0`` on 5 of 64 channels, read by a 1x1 conv ->
    the group has 59 channels and the 1x1 conv's bias holds ``act(beta) * W[:, c]`` of the 5.
    """

    name: ClassVar[str] = "remove-dead"
    preserves_function: ClassVar[bool] = True
    calibrate: bool = False
    batches: int = 8

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        with_zeros = {name for name, p in gm.named_parameters() if not bool(p.detach().all())}
        calibrate = self.calibrate and ctx.data is not None
        if not with_zeros and not calibrate:  # a dead channel needs an exact zero somewhere
            return PassResult(gm, False, note="no dead channels")
        cg = self.analyse(gm)
        growable = [g for g in cg.groups if g.growable]
        silent = _silent(cg, growable, ctx.data, self.batches) if calibrate else {}
        plans: dict[int, GroupPlan] = {}
        deltas: dict[str, torch.Tensor] = {}
        for group in growable:
            dead = silent.get(group.id, np.zeros(group.size, dtype=bool))
            if not dead.any() and not any(p.name in with_zeros for p in group.params):
                continue
            dead = dead | _zero_fan_out(cg, group)
            chain = _chain(cg, group)
            foldable = chain is not None and all(_foldable(_module(cg, c)) for c in chain.consumers)
            constant, value = np.zeros(group.size, dtype=bool), np.zeros(group.size)
            if chain is not None and foldable and _single_occurrence(cg, chain, group):
                constant, value = _constant_values(cg, chain, group)
            removed = dead | constant
            if removed.all():
                removed[0] = False  # a group keeps one channel
            folded = removed & constant & ~dead  # only channels that go are folded: a kept one still adds itself
            if folded.any():
                assert chain is not None
                for path, delta in _folds(cg, chain, group, folded, value).items():
                    deltas[path] = deltas.get(path, 0) + delta
            if removed.any():
                plans[group.id] = GroupPlan(tuple(int(i) for i in np.flatnonzero(~removed)))
        if not plans:
            return PassResult(gm, False, note="no dead channels")
        plan = WidthPlan(plans, bias_deltas=deltas)
        changes = {g: (cg.groups[g].size, p.width) for g, p in plans.items()}
        removed = sum(a - b for a, b in changes.values())
        return PassResult(apply_plan(gm, cg, plan, seed=ctx.seed), True, changes, f"{removed} dead channels", plan)
