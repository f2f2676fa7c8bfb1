"""The ``merge-factors`` pass: join a factorized pair back into one layer where that costs no more.

:class:`~fxmorph.passes.factorize.FactorizePass` splits a layer into ``first`` (``K`` inputs per output
position, ``r`` outputs) and ``second`` (``r`` to ``out``, pointwise). After pruning, the pair costs
``r * (K + out)`` multiply-adds per position against ``K * out`` for the single layer with weight
``second @ first``: where the rank kept is at or above ``K * out / (K + out)`` the single layer is
cheaper (and one op fewer), for exactly the same function up to rounding.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from fxmorph.capture.trace import propagate_shapes
from fxmorph.meta import FACTORS_KEY
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.passes.factorize import CONVS
from fxmorph.validate import frozen_mode

__all__ = ["MergeFactorsPass", "merged_layer"]

logger = logging.getLogger(__name__)


def merged_layer(first: nn.Module, second: nn.Module) -> nn.Module:
    """The single layer computing ``second(first(x))`` (weights multiplied in float64)."""
    out, rank = second.weight.shape[:2]
    w = first.weight.detach()
    outer = second.weight.detach().to("cpu", torch.float64).reshape(out, rank)
    product = outer @ w.to("cpu", torch.float64).reshape(rank, -1)
    factory = {"device": w.device, "dtype": w.dtype}
    has_bias = second.bias is not None
    if isinstance(first, nn.Linear):
        layer: nn.Module = nn.Linear(first.in_features, out, bias=has_bias, **factory)
    else:
        assert isinstance(first, CONVS)
        layer = type(first)(first.in_channels, out, first.kernel_size, first.stride, first.padding, first.dilation,
                            bias=has_bias, padding_mode=first.padding_mode, **factory)  # fmt: skip
    layer.weight = nn.Parameter(product.reshape(out, *w.shape[1:]).to(**factory), requires_grad=w.requires_grad)
    if second.bias is not None:
        layer.bias = nn.Parameter(second.bias.detach().clone(), requires_grad=second.bias.requires_grad)
    layer.train(second.training)
    return layer


def _calls(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The call_module nodes of ``gm`` by module path."""
    return {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}


def _pair(nodes: dict[str, fx.Node], path: str) -> tuple[fx.Node, fx.Node] | None:
    """The call nodes of ``path.0`` and ``path.1`` (from :func:`_calls`), if the first feeds only the second."""
    a, b = nodes.get(f"{path}.0"), nodes.get(f"{path}.1")
    if a is None or b is None or list(a.users) != [b] or b.args != (a,) or b.kwargs:
        return None
    return a, b


def _worth_merging(first: nn.Module, second: nn.Module) -> bool:
    """True when the single layer costs at most what the pair costs per output position."""
    if not isinstance(first, (nn.Linear, *CONVS)) or type(second) is not type(first):
        return False
    if isinstance(second, CONVS) and (
        any(k != 1 for k in second.kernel_size) or any(t != 1 for t in second.stride)
        or second.padding not in ("valid", (0,) * len(second.kernel_size)) or second.groups != 1
    ):  # fmt: skip
        return False
    rank, fan_in = first.weight.shape[0], first.weight[0].numel()
    out = second.weight.shape[0]
    return fan_in * out <= rank * (fan_in + out)


@dataclass(frozen=True)
class MergeFactorsPass(Pass):
    """Merge each factorized pair (recorded in ``gm.meta[FACTORS_KEY]``) whose rank is at or above the
    break-even ``K * out / (K + out)`` back into one layer. **Preserves the function** up to
    floating-point rounding of the product; FLOPs fall or stay equal. Pairs below the break-even, or
    no longer adjacent, are left as they are; a model without factorized layers is returned unchanged.

    Before/after: ``fc1.0 = Linear(784, 250, bias=False) -> fc1.1 = Linear(250, 300)`` (250 >= 217.3)
    becomes ``fc1 = Linear(784, 300)``.
    """

    name: ClassVar[str] = "merge-factors"
    preserves_function: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        record = gm.meta.get(FACTORS_KEY, {})
        nodes = _calls(gm)
        chosen = [path for path in record if self._mergeable(gm, nodes, path)]
        if not chosen:
            return PassResult(gm, False, note="nothing merged: every factorized pair is cheaper than its product")
        out = copy.deepcopy(gm)
        nodes = _calls(out)
        for path in chosen:
            self._merge(out, nodes, path)
        out.graph.lint()
        out.recompile()
        out.meta[FACTORS_KEY] = {p: r for p, r in record.items() if p not in chosen}
        with frozen_mode(out):
            propagate_shapes(out, ctx.example_inputs)
        note = f"merged {len(chosen)} factorized pair(s) back into one layer: {', '.join(chosen[:6])}"
        logger.info("merge-factors: %s", note)
        return PassResult(out, True, note=note)

    @staticmethod
    def _mergeable(gm: fx.GraphModule, nodes: dict[str, fx.Node], path: str) -> bool:
        pair = _pair(nodes, path)
        return pair is not None and _worth_merging(gm.get_submodule(f"{path}.0"), gm.get_submodule(f"{path}.1"))

    @staticmethod
    def _merge(gm: fx.GraphModule, nodes: dict[str, fx.Node], path: str) -> None:
        pair = _pair(nodes, path)
        assert pair is not None
        a, b = pair
        layer = merged_layer(gm.get_submodule(f"{path}.0"), gm.get_submodule(f"{path}.1"))
        owner, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, layer)
        a.target = path
        b.replace_all_uses_with(a)
        gm.graph.erase_node(b)
