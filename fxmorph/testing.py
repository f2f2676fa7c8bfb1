"""Test oracles shipped with fxmorph: random plans and the mask oracle for removals.

The mask oracle runs a float64 copy of the original graph in which every removed channel is zeroed
at every tensor and parameter axis of its group (normalisations over channels are computed over the
kept channels only, which is what removing them means). A physically pruned model must give the same
outputs; this checks the analysis and the surgery together, for any keep-set, on any model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict

from fxmorph.analysis import ChannelGraph, Layout
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.capture.trace import mutable_args
from fxmorph.surgery.indices import axis_map

__all__ = ["masked_reference", "random_plan", "run_double"]


def random_plan(cg: ChannelGraph, seed: int = 0, low: float = 0.3, high: float = 0.7, grow: int = 0) -> WidthPlan:
    """Keep a random ``low``..``high`` share of every free group (at least one channel), in random
    order of choice but sorted; with ``grow > 0`` also append up to ``grow`` channels per group."""
    rng = np.random.default_rng(seed)
    plans = {}
    for g in cg.free_groups:
        k = max(1, round(g.size * rng.uniform(low, high)))
        keep = tuple(sorted(rng.choice(g.size, size=k, replace=False).tolist()))
        plans[g.id] = GroupPlan(keep, int(rng.integers(0, grow + 1)) if grow else 0)
    return WidthPlan(plans)


def _mask(cg: ChannelGraph, plan: WidthPlan, layout: Layout) -> torch.Tensor | None:
    """``[width]`` float64: 1 at the original positions of ``layout`` the plan keeps, 0 at removed ones; None
    when the axis does not change."""
    amap = axis_map(cg, plan, layout)
    if amap.identity:
        return None
    width = cg.atoms.width(layout)
    mask = torch.zeros(width, dtype=torch.float64)
    mask[torch.as_tensor(amap.source[amap.source >= 0], dtype=torch.long)] = 1.0
    return mask


def _apply_mask(t: torch.Tensor, dim: int, mask: torch.Tensor) -> torch.Tensor:
    """``t`` with zeros where ``mask`` (broadcast along ``dim``) is 0. A removed channel is zero even where the
    op made it NaN (a weight_norm row whose g and v are both masked: ``0 * 0 / 0``), which a product would keep."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return torch.where(mask.view(shape) != 0, t, torch.zeros((), dtype=t.dtype, device=t.device))


class _MaskedInterpreter(fx.Interpreter):
    """Runs the graph with every node's value zeroed at the removed channels, and norms over kept channels."""

    def __init__(self, gm: fx.GraphModule, masks: dict[str, Any]) -> None:
        super().__init__(gm)
        self.masks = masks

    def run_node(self, n: fx.Node) -> Any:
        masked_norm = self._masked_norm(n)
        if masked_norm is None:
            masked_norm = self._masked_mean(n)
        result = masked_norm if masked_norm is not None else super().run_node(n)
        # Masked after every node, not only at the parameters: a bias, a BatchNorm shift or an add of an unmasked
        # tensor would otherwise bring a removed channel back to life.
        return self._mask_value(result, self.masks.get(n.name))

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Some library functions mutate their list arguments.
        return super().call_function(target, mutable_args(args), mutable_args(kwargs))

    def _mask_value(self, value: Any, masks: Any) -> Any:
        if masks is None:
            return value
        if isinstance(value, torch.Tensor) and isinstance(masks, dict):
            for dim, mask in masks.items():
                value = _apply_mask(value, dim, mask)
            return value
        if isinstance(value, tuple | list) and isinstance(masks, tuple):
            return type(value)(self._mask_value(v, m) for v, m in zip(value, masks, strict=False))
        return value

    def _masked_norm(self, n: fx.Node) -> torch.Tensor | None:
        """A norm over partly removed channels (LayerNorm, RMSNorm, GroupNorm, as modules or functions):
        normalise over the kept channels only, which is what removing the others means."""
        if n.op == "call_module":
            m = self.module.get_submodule(str(n.target))
            if isinstance(m, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm):
                x = self.env[n.args[0]]
                # GroupNorm normalises over the channel dim; LayerNorm and RMSNorm (over one dim) over the last.
                dim = 1 if isinstance(m, nn.GroupNorm) else x.dim() - 1
                mask = (self.masks.get(n.args[0].name) or {}).get(dim)
                if mask is not None:
                    return _norm_kept(x, dim, mask, m)
        if n.op == "call_function" and n.target in _NORM_FUNCTIONS:
            names = _NORM_FUNCTIONS[n.target]
            bound = dict(zip(names, (self._value(a) for a in n.args), strict=False))
            bound.update({k: self._value(v) for k, v in n.kwargs.items()})
            x = bound["input"]
            dim = 1 if "num_groups" in names else x.dim() - 1
            mask = (self.masks.get(n.args[0].name) or {}).get(dim)
            if mask is not None and (dim == 1 or len(bound["normalized_shape"]) == 1):
                return _kept(x, dim, mask, n.target, bound)
        return None

    def _masked_mean(self, n: fx.Node) -> torch.Tensor | None:
        """A mean over partly removed channels is the mean over the kept ones: the sum (removed channels are
        zero here) divided by the number of positions kept."""
        if n.target not in (torch.mean, "mean") or n.op not in ("call_function", "call_method"):
            return None
        masks = self.masks.get(n.args[0].name) if isinstance(n.args[0], fx.Node) else None
        x = self.env[n.args[0]]
        raw = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if not masks or not isinstance(x, torch.Tensor):
            return None
        dims = range(x.dim()) if raw is None else [raw] if isinstance(raw, int) else list(raw)
        dims = [d % x.dim() for d in dims]
        if not any(d in masks for d in dims):
            return None
        kept = 1
        for d in dims:
            kept *= int(masks[d].sum().item()) if d in masks else x.shape[d]
        keepdim = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        return x.sum(dim=dims, keepdim=keepdim) / kept

    def _value(self, arg: Any) -> Any:
        """The value of a node argument in the interpreter's environment (a constant as it is)."""
        return self.env[arg] if isinstance(arg, fx.Node) else arg


_NORM_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    torch.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    torch.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    torch.group_norm: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
}


def _kept(x: torch.Tensor, dim: int, mask: torch.Tensor, fn: Any, bound: dict[str, Any]) -> torch.Tensor:
    """``fn`` applied to the kept channels of ``x`` along ``dim`` (removed positions stay zero)."""
    idx = torch.nonzero(mask).flatten()
    if not len(idx):  # a group removed whole: the op goes with it, and its output is all zeros
        return torch.zeros_like(x)
    sub = x.index_select(dim, idx)
    w, b = (bound.get(k) for k in ("weight", "bias"))
    w = w.index_select(0, idx) if w is not None else None
    b = b.index_select(0, idx) if b is not None else None
    if "num_groups" in bound:
        normed = F.group_norm(sub, bound["num_groups"], w, b, bound.get("eps", 1e-5))
    elif fn in (F.rms_norm, torch.rms_norm):
        normed = F.rms_norm(sub, (len(idx),), w, bound.get("eps"))
    else:
        normed = F.layer_norm(sub, (len(idx),), w, b, bound.get("eps", 1e-5))
    out = torch.zeros_like(x)
    out.index_copy_(dim, idx, normed)
    return out


def _norm_kept(x: torch.Tensor, dim: int, mask: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """A norm module applied to the kept channels of ``x`` along ``dim``, through :func:`_kept`."""
    if isinstance(m, nn.GroupNorm):
        bound = {"num_groups": m.num_groups, "weight": m.weight, "bias": m.bias, "eps": m.eps}
        return _kept(x, dim, mask, F.group_norm, bound)
    if isinstance(m, nn.RMSNorm):
        return _kept(x, dim, mask, F.rms_norm, {"weight": m.weight, "eps": m.eps})
    return _kept(x, dim, mask, F.layer_norm, {"weight": m.weight, "bias": m.bias, "eps": m.eps})


def _node_masks(cg: ChannelGraph, plan: WidthPlan, value: Any) -> Any:
    """The masks of a node's value: per dim for a tensor, nested for a tuple; None where nothing is masked."""
    if isinstance(value, dict):
        masks = {d: m for d, lay in value.items() if (m := _mask(cg, plan, lay)) is not None}
        return masks or None
    if isinstance(value, tuple):
        return tuple(_node_masks(cg, plan, v) for v in value)
    return None


def masked_reference(cg: ChannelGraph, plan: WidthPlan, *inputs: Any) -> Any:
    """Outputs of the original graph in float64 with the plan's removed channels zeroed everywhere."""
    # float64, so rounding cannot hide a wrong channel nor fake one; eval mode, so dropout and BatchNorm statistics
    # are fixed.
    ref = copy.deepcopy(cg.gm).double().eval()
    with torch.no_grad():
        for binding in cg.bindings.values():
            mask = _mask(cg, plan, binding.layout)
            if mask is None:
                continue
            owner, _, leaf = binding.target.rpartition(".")
            module = ref.get_submodule(owner) if owner else ref
            tensor = getattr(module, leaf)
            # In place on the copy: the masked weights are what the graph reads.
            tensor.copy_(_apply_mask(tensor, binding.dim, mask))
        masks = {name: _node_masks(cg, plan, value) for name, value in cg.spaces.items()}
        masks = {k: v for k, v in masks.items() if v is not None}
        return _plain(_MaskedInterpreter(ref, masks).run(*_double(inputs)))


def _plain(value: Any) -> Any:
    """fx's immutable containers as plain dicts and lists, so outputs compare with eager ones."""
    if isinstance(value, dict):
        # a container type of the model's own (transformers' ModelOutput) is rebuilt as itself
        plain = {k: _plain(v) for k, v in value.items()}
        return plain if type(value) in (dict, immutable_dict) else type(value)(plain)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # a namedtuple (torch.return_types) keeps its type
        return tuple(_plain(v) for v in value)
    return value


def _double(inputs: Any) -> Any:
    """The inputs with every floating tensor in float64."""
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def run_double(model: nn.Module, *inputs: Any) -> Any:
    """Run a float64 eval-mode copy of ``model``."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(*_double(inputs))
