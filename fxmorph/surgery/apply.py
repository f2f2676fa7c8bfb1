"""Apply a WidthPlan: build new modules with sliced or extended tensors, rewrite graph constants.

This is the only code that changes widths. It never writes to the GraphModule it is given: the
result is an independent deep copy in which every module that changes is a new object.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.context import ArgSlot, Binding, ModuleAttr, Rewrite, Role, ScaleKeptRows, ScaleRows
from fxmorph.analysis.plan import WidthPlan
from fxmorph.analysis.removal import Removal, removed_modules
from fxmorph.errors import PlanError, SurgeryError
from fxmorph.meta import REMOVED_KEY
from fxmorph.surgery.constant import fold_constants
from fxmorph.surgery.defaults import new_channel_default, new_channel_values
from fxmorph.surgery.indices import axis_map

__all__ = ["apply_plan"]

logger = logging.getLogger(__name__)


def _split_path(path: str) -> tuple[str, str]:
    """``"a.b.c"`` -> ``("a.b", "c")``; a top-level name has the owner ``""`` (the root module)."""
    owner, _, leaf = path.rpartition(".")
    return owner, leaf


def _affected(cg: ChannelGraph, plan: WidthPlan) -> dict[str, list[Binding]]:
    """Per tensor path, its bindings, for every tensor a changing group indexes; the others stay as they are."""
    # A group named in the plan with every channel kept in order changes nothing: leaving its tensors out keeps them
    # bit for bit and spares their copies.
    changing = {g for g, p in plan.items() if p.new or p.keep != tuple(range(cg.groups[g].size))}
    out: dict[str, list[Binding]] = defaultdict(list)
    for binding in cg.bindings.values():
        if any(gid in changing for gid, _ in cg.layout_groups(binding.layout)):
            out[binding.target].append(binding)
    for owner in plan.bias_deltas:
        bias = f"{owner}.bias"
        if bias not in out:
            # A bias the fold creates (the layer had none) follows the layer's output channels, as the
            # weight's output axis does: sliced with them when that group changes in the same plan.
            weights = out.get(f"{owner}.weight", [])
            out[bias] = [Binding(bias, 0, b.layout, Role.OUT) for b in weights if b.role == Role.OUT]
    return out


def _source_tensor(cg: ChannelGraph, plan: WidthPlan, path: str) -> torch.Tensor:
    """The tensor at ``path`` with the plan's bias deltas folded in (a missing bias counts as zero)."""
    owner, leaf = _split_path(path)
    delta = plan.bias_deltas.get(owner) if leaf == "bias" else None
    if _is_param(cg.gm, path):
        tensor = cg.gm.get_parameter(path)
    elif delta is not None and getattr(cg.gm.get_submodule(owner), "bias", None) is None:
        # The fold's delta becomes the new bias (a copy: the plan's tensor never enters a model)
        return delta.detach().clone()
    else:
        tensor = cg.gm.get_buffer(path)
    # The delta has the weight's dtype, which a bias need not share.
    return tensor if delta is None else tensor.detach() + delta.to(tensor.dtype)


def _new_tensor(cg: ChannelGraph, plan: WidthPlan, path: str, bindings: list[Binding], seed: int) -> torch.Tensor:
    """The tensor at ``path`` rebuilt along every bound axis (kept channels gathered, new ones filled)."""
    tensor = _source_tensor(cg, plan, path)
    default = new_channel_default(cg.gm, path)  # the op table's value for a new channel, matched through the MRO
    init = {g: dict(p.init) for g, p in plan.items() if p.init}
    # One generator per tensor, seeded alike: the draws of one tensor do not depend on how many tensors were rebuilt
    # before it.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = tensor.detach()
        # Axes one after the other, in dim order: the random fan-in draws come in a fixed order, and
        # grow_values.stage_plan stages its values in this same order. Each fill is shaped like ``out`` as rebuilt
        # so far.
        for binding in sorted(bindings, key=lambda b: b.dim):
            amap = axis_map(cg, plan, binding.layout)
            if amap.identity:
                continue
            fill = None
            if amap.slots:
                fill = new_channel_values(out, binding.dim, amap, binding.role, default, path, init, generator)
            out = amap.gather(out, binding.dim, fill)
    return out.clone()  # never a view of the input's storage: _scale_rows later scales the new tensors in place


def _is_param(root: nn.Module, path: str) -> bool:
    """Whether ``path`` names a parameter of ``root`` (a buffer, or nothing, gives False)."""
    try:
        root.get_parameter(path)
    except AttributeError:
        return False
    return True


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root``, in place of the module there."""
    owner, leaf = _split_path(path)
    parent = root.get_submodule(owner) if owner else root
    parent._modules[leaf] = module


def _rebuilt(root: nn.Module, path: str) -> nn.Module:
    """A new module object with the state of ``root.<path>``, its containers copied."""
    old = root.get_submodule(path)
    new = copy.copy(old)
    new.__dict__ = dict(old.__dict__)
    new._parameters = dict(old._parameters)
    new._buffers = dict(old._buffers)
    new._modules = dict(old._modules)
    _install(root, path, new)
    return new


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """An empty tensor of the same kind (Parameter or plain) that a deep copy puts in ``tensor``'s place."""
    empty = torch.empty(0, dtype=tensor.dtype)
    return nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


def _as_stored(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``value`` as the kind of tensor it replaces (``like``): a Parameter with its gradient flag, or plain."""
    if like is None or isinstance(like, nn.Parameter):  # a bias created by a fold is a parameter
        return nn.Parameter(value, requires_grad=like.requires_grad if like is not None else True)
    return value


def _set_tensor(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """Register ``value`` as ``module.<leaf>``: a parameter if it is a Parameter, else a buffer."""
    # One name is either a parameter or a buffer, never both (a stale twin would shadow it in state_dict).
    if isinstance(value, nn.Parameter):
        module._buffers.pop(leaf, None)
        module._parameters[leaf] = value
    else:
        module._parameters.pop(leaf, None)
        module._buffers[leaf] = value


def _apply_rewrite(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], rw: Rewrite, value: Any, cg: ChannelGraph, plan: WidthPlan
) -> None:
    """Put ``value`` (computed from the new widths) where ``rw.location`` says."""
    node = nodes[rw.node]
    location = rw.location
    if isinstance(location, ScaleKeptRows):
        _scale_kept_rows(gm, location, value, axis_map(cg, plan, location.layout).source)
    elif isinstance(location, ModuleAttr):
        owner_path, _, attr = location.path.rpartition(".")
        target = str(node.target) + (f".{owner_path}" if owner_path else "")
        setattr(gm.get_submodule(target), attr, value)
    elif isinstance(location, ScaleRows):
        _scale_rows(gm, location, value)
    elif isinstance(location, ArgSlot):
        _set_argument(node, location, value)
    else:
        raise SurgeryError(f"node '{rw.node}': unknown rewrite location {location!r} (a bug in a channel rule)")


def _set_argument(node: fx.Node, slot: ArgSlot, value: Any) -> None:
    """Put ``value`` in the node's positional or keyword argument (or one item of it) that ``slot`` names."""
    if isinstance(slot.arg, int):
        args = list(node.args)
        args[slot.arg] = _replace(args[slot.arg], slot.item, value)
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[slot.arg] = _replace(kwargs.get(slot.arg), slot.item, value)
        node.kwargs = kwargs


def _scale_rows(root: nn.Module, fix: ScaleRows, factor: float) -> None:
    """Multiply one block of rows of each tensor at ``fix.paths`` (in ``root``, the new model) by ``factor``."""
    if factor == 1.0:  # the width the factor depends on is unchanged: leave the tensors bit for bit
        return
    with torch.no_grad():
        for path in fix.paths:
            tensor = _tensor_at(root, path)
            if tensor is not None:
                rows = tensor.shape[0] // fix.chunks
                # In place, on the new model's own tensor: _new_tensor returned a copy, or the deep copy made one.
                tensor[fix.chunk * rows : (fix.chunk + 1) * rows].mul_(factor)


def _scale_kept_rows(root: nn.Module, fix: ScaleKeptRows, factor: float, source: np.ndarray) -> None:
    """Multiply the rows of each tensor at ``fix.paths`` (in ``root``, the new model) that were the original rows
    ``fix.rows`` by ``factor``; ``source`` gives each new row's original position (-1 for a new one)."""
    if factor == 1.0:  # the width the factor depends on is unchanged: leave the tensors bit for bit
        return
    rows = torch.as_tensor(np.flatnonzero(np.isin(source, fix.rows)), dtype=torch.long)
    with torch.no_grad():
        for path in fix.paths:
            tensor = _tensor_at(root, path)
            if tensor is None:
                continue
            if tensor.shape[0] != source.size:
                raise SurgeryError(f"'{path}' has {tensor.shape[0]} rows where its plan has {source.size}")
            index = rows.to(tensor.device)
            # In place, on the new model's own tensor, as _scale_rows does.
            tensor.index_copy_(0, index, tensor.index_select(0, index) * factor)


def _tensor_at(root: nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at a dotted path, or None where a part is missing or None (an absent bias)."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _replace(container: Any, index: int | None, value: Any) -> Any:
    """``container`` with item ``index`` set to ``value`` (``value`` itself when ``index`` is None), as a new
    tuple or list."""
    if index is None:
        return value
    items = list(container)
    items[index] = value
    return type(container)(items) if isinstance(container, tuple) else items


@torch.inference_mode(False)  # the new model's tensors are ordinary (trainable) even under inference_mode
def apply_plan(gm: fx.GraphModule, cg: ChannelGraph, plan: WidthPlan, *, seed: int = 0) -> fx.GraphModule:
    """Return a new GraphModule with ``plan`` applied; ``gm`` is left untouched.

    Every parameter and buffer indexed by a changing group is rebuilt (kept positions gathered in the
    plan's order, new positions filled as :func:`new_channel_values` says); every module that owns
    one, or whose attributes depend on a width, is replaced by a new object; graph constants that
    depend on widths (view sizes, split sizes, slice bounds, attention scales) are recomputed.
    """
    if cg.gm is not gm:
        raise SurgeryError("the channel graph was built for another GraphModule: analyse this one first")
    plan.validate(cg)
    affected = _affected(cg, plan)
    for gid, group_plan in plan.items():
        # Checked before any tensor is built: values for a tensor no changing group indexes would go unused without
        # a word.
        unbound = sorted(set(group_plan.init) - set(affected))
        if unbound:
            raise PlanError(
                f"group {gid}: init names {', '.join(unbound)}, which no changing group binds: "
                "give values only for tensors the group's channels live in"
            )
    try:
        new_tensors = {path: _new_tensor(cg, plan, path, bs, seed) for path, bs in affected.items()}
        originals = {path: _lookup_tensor(gm, path) for path in affected}
        # Stand-ins keep the deep copy from duplicating tensors about to be replaced. A parameter's
        # stand-in must be a Parameter: GraphModule's deepcopy re-installs every get_attr target and
        # registers a plain tensor as a *buffer*, which would leave a stale empty buffer beside the
        # new parameter of the same name (in named_buffers and state_dict).
        memo = {id(t): _stand_in(t) for t in originals.values() if t is not None}
        out = copy.deepcopy(gm, memo)
        for path, value in new_tensors.items():
            stored = _as_stored(value, originals[path])
            # a tied tensor is built once, for its first name, and the one new tensor goes to every name
            for name in (path, *(alias for alias, first in cg.ties.items() if first == path)):
                owner, leaf = _split_path(name)
                _set_tensor(_rebuilt(out, owner) if owner else out, leaf, stored)
        removal = plan.removal(cg)
        _rewrite_constants(out, cg, plan, removal.dead)
        _remove_dead(out, removal)
        out.recompile()
    except PlanError:  # a bad init shape names its group already: pass it on unwrapped
        raise
    except Exception as exc:
        raise SurgeryError(f"applying the width plan failed: {type(exc).__name__}: {exc}") from exc
    logger.debug("surgery rebuilt %d tensors", len(new_tensors))
    return out


def _lookup_tensor(gm: fx.GraphModule, path: str) -> torch.Tensor | None:
    """The parameter or buffer at ``path`` (None for an absent one, such as a bias a fold creates)."""
    if _is_param(gm, path):
        return gm.get_parameter(path)
    owner, leaf = _split_path(path)
    module = gm.get_submodule(owner) if owner else gm
    return module._buffers.get(leaf)


def _remove_dead(out: fx.GraphModule, removal: Removal) -> None:
    """Leave the tensors of the groups removed whole out of the concatenations that stay, and erase every node that
    goes with them (:mod:`fxmorph.analysis.removal`), and the modules no node calls any more (recorded for
    write-back)."""
    if not removal.dead:
        return
    out.meta[REMOVED_KEY] = (*out.meta.get(REMOVED_KEY, ()), *removed_modules(out, removal.dead))
    fold_constants(out, removal)  # a residual branch left constant: its value goes where its module was
    for node in out.graph.nodes:
        # the removal is refused unless every op that stays and reads a node that goes joins a list of tensors
        items = node.args[0] if node.args and node.name not in removal.dead else None
        if isinstance(items, list | tuple) and any(isinstance(a, fx.Node) and a.name in removal.dead for a in items):
            kept = [a for a in items if not (isinstance(a, fx.Node) and a.name in removal.dead)]
            node.args = (type(items)(kept), *node.args[1:])
    for node in reversed(list(out.graph.nodes)):  # readers first: a node is erased once nothing reads it
        if node.name in removal.dead:
            out.graph.erase_node(node)
    out.delete_all_unused_submodules()
    logger.debug("surgery removed groups %s whole, with %d nodes", sorted(removal.groups), len(removal.dead))


def _rewrite_constants(out: fx.GraphModule, cg: ChannelGraph, plan: WidthPlan, dead: frozenset[str]) -> None:
    """Recompute every width-dependent constant (module attributes, graph arguments, scaled rows) in ``out``, but
    those of the nodes ``dead`` (which go with a group removed whole)."""
    measure = plan.measure(cg)
    nodes = {n.name: n for n in out.graph.nodes}
    rebuilt: set[str] = set()
    changing = {g for g, p in plan.items() if p.new or p.keep != tuple(range(cg.groups[g].size))}
    if not changing:
        return
    # Rewrites run in the order the rules recorded them. A called module is rebuilt once, before its first rewrite,
    # so that an attribute set on it lands on a module object of its own.
    for rw in cg.rewrites:
        if rw.node in dead:
            continue
        node = nodes[rw.node]
        if node.op == "call_module" and str(node.target) not in rebuilt:
            _rebuilt(out, str(node.target))
            rebuilt.add(str(node.target))
        _apply_rewrite(out, nodes, rw, rw.value(measure), cg, plan)
