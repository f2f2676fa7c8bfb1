"""Factor splits and merges: a Linear or convolution becomes two layers through an SVD of its weight, and
a factorized pair becomes one layer again.

``Linear(in, out)`` splits into ``Linear(in, r, bias=False) -> Linear(r, out)`` and ``ConvNd(c_in, c_out,
k)`` into ``ConvNd(c_in, r, k, bias=False) -> ConvNd(r, c_out, 1)`` (the first keeps the stride, padding,
dilation and padding mode), with ``W = U S V^T`` split as ``U sqrt(S)`` and ``sqrt(S) V^T``. The factors
live in an ``nn.Sequential`` at the layer's path (``fc1`` -> ``fc1.0``, ``fc1.1``) that the graph calls
one member after the other. Which layers to split, at which rank, and which pairs to merge is decided by
:mod:`fxmorph.passes.factorize` and :mod:`fxmorph.passes.merge_factors`; this module only rewrites. Like
:func:`~fxmorph.surgery.apply.apply_plan`, it never writes to the GraphModule it is given.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["CONVS", "Split", "WeightSVD", "factor_pair", "merge_pairs", "merged_layer", "split_layers", "weight_svd"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions that can be split (``groups=1``) and merged back."""


@dataclass(frozen=True)
class WeightSVD:
    """The thin SVD of a layer's weight as a ``[out, K]`` matrix (``K`` counts a convolution's kernel
    elements), in float64 on the CPU: ``W = u @ diag(s) @ vh``, singular values descending."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


@dataclass(frozen=True)
class Split:
    """Split the layer at ``path`` into two factors keeping the top ``rank`` singular values of ``svd``."""

    path: str
    svd: WeightSVD
    rank: int


def weight_svd(module: nn.Module) -> WeightSVD:
    """The SVD of ``module.weight`` (reads the weight only). Float64 so that a full-rank split
    reproduces the weight to float32 rounding."""
    weight = module.weight.detach()
    u, s, vh = torch.linalg.svd(weight.to("cpu", torch.float64).reshape(weight.shape[0], -1), full_matrices=False)
    return WeightSVD(u, s, vh)


def _factor_layers(module: nn.Module, svd: WeightSVD, rank: int) -> tuple[nn.Module, nn.Module]:
    """The two layers whose composition is ``module`` at full rank (its best rank-``rank`` version below)."""
    weight = module.weight.detach()
    out, r = weight.shape[0], rank
    # sqrt(S) on both sides: the two factors get the same scale, which keeps their gradients balanced in training.
    root = svd.s[:r].sqrt()
    first_w = (root[:, None] * svd.vh[:r]).to(weight.device, weight.dtype)
    second_w = (svd.u[:, :r] * root).to(weight.device, weight.dtype)
    factory = {"device": weight.device, "dtype": weight.dtype}
    grad = module.weight.requires_grad
    if isinstance(module, nn.Linear):
        first: nn.Module = nn.Linear(module.in_features, r, bias=False, **factory)
        second: nn.Module = nn.Linear(r, out, bias=module.bias is not None, **factory)
        first.weight = nn.Parameter(first_w, requires_grad=grad)
        second.weight = nn.Parameter(second_w, requires_grad=grad)
    else:
        kind = type(module)
        first = kind(
            module.in_channels,
            r,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
            **factory,
        )
        second = kind(r, out, 1, bias=module.bias is not None, **factory)
        first.weight = nn.Parameter(first_w.reshape(r, *weight.shape[1:]), requires_grad=grad)
        ones = (1,) * (weight.dim() - 2)  # the second factor is a 1x1(x1) convolution
        second.weight = nn.Parameter(second_w.reshape(out, r, *ones), requires_grad=grad)
    if module.bias is not None:
        # The bias adds after the product, so it moves to the second factor as it is.
        second.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    # A new module starts in training mode: the factors take the mode of the layer they replace.
    first.train(module.training)
    second.train(module.training)
    return first, second


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root``, in place of the module there."""
    owner, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, module)


def split_layers(gm: fx.GraphModule, splits: Sequence[Split]) -> fx.GraphModule:
    """A copy of ``gm`` in which the one call of each layer in ``splits`` calls its two factors instead."""
    out = copy.deepcopy(gm)
    for split in splits:
        first, second = _factor_layers(out.get_submodule(split.path), split.svd, split.rank)
        _install(out, split.path, nn.Sequential(first, second))
        # The pass splits only layers called once: the first call is the only one.
        node = next(n for n in out.graph.nodes if n.op == "call_module" and n.target == split.path)
        with out.graph.inserting_after(node):
            a = out.graph.call_module(f"{split.path}.0", node.args, dict(node.kwargs))
        with out.graph.inserting_after(a):
            b = out.graph.call_module(f"{split.path}.1", (a,))
        node.replace_all_uses_with(b)
        out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    return out


def merged_layer(first: nn.Module, second: nn.Module) -> nn.Module:
    """The single layer computing ``second(first(x))`` (weights multiplied in float64)."""
    out, rank = second.weight.shape[:2]
    w = first.weight.detach()
    # The second factor is a 1x1 layer without stride or padding (as split_layers builds it), so its weight is a
    # plain [out, rank] matrix and the merged layer takes the first factor's geometry.
    outer = second.weight.detach().to("cpu", torch.float64).reshape(out, rank)
    product = outer @ w.to("cpu", torch.float64).reshape(rank, -1)
    factory = {"device": w.device, "dtype": w.dtype}
    bias = _merged_bias(first, second, outer)
    has_bias = bias is not None
    if isinstance(first, nn.Linear):
        layer: nn.Module = nn.Linear(first.in_features, out, bias=has_bias, **factory)
    else:
        assert isinstance(first, CONVS)
        layer = type(first)(
            first.in_channels,
            out,
            first.kernel_size,
            first.stride,
            first.padding,
            first.dilation,
            bias=has_bias,
            padding_mode=first.padding_mode,
            **factory,
        )
    layer.weight = nn.Parameter(product.reshape(out, *w.shape[1:]).to(**factory), requires_grad=w.requires_grad)
    if bias is not None:
        grad = any(b is not None and b.requires_grad for b in (first.bias, second.bias))
        layer.bias = nn.Parameter(bias.to(**factory), requires_grad=grad)
    layer.train(second.training)
    return layer


def _merged_bias(first: nn.Module, second: nn.Module, outer: torch.Tensor) -> torch.Tensor | None:
    """``second.bias + outer @ first.bias`` in float64, or None when neither factor has a bias.

    ``split_layers`` builds the first factor without a bias, but remove-dead may give it one (it folds
    constant channels into the bias of the layer reading them), so both must be carried. Exact for
    convolutions too: the second factor is 1x1 without padding, so the first's bias reaches every position.
    """
    total = None if second.bias is None else second.bias.detach().to("cpu", torch.float64)
    if first.bias is not None:
        folded = outer @ first.bias.detach().to("cpu", torch.float64)
        total = folded if total is None else total + folded
    return total


def _calls(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The call_module nodes of ``gm`` by module path."""
    return {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}


def factor_pair(gm: fx.GraphModule, path: str) -> tuple[fx.Node, fx.Node] | None:
    """The call nodes of ``path.0`` and ``path.1``, if the first feeds only the second (a pair that
    :func:`merge_pairs` can join), else None."""
    return _pair(_calls(gm), path)


def _pair(nodes: dict[str, fx.Node], path: str) -> tuple[fx.Node, fx.Node] | None:
    """The two call nodes of the pair at ``path`` in ``nodes`` (see :func:`factor_pair`), or None."""
    a, b = nodes.get(f"{path}.0"), nodes.get(f"{path}.1")
    # The first factor feeds only the second, and the second reads nothing else: otherwise the product is not the
    # layer the graph uses.
    if a is None or b is None or list(a.users) != [b] or b.args != (a,) or b.kwargs:
        return None
    return a, b


def merge_pairs(gm: fx.GraphModule, paths: Sequence[str]) -> fx.GraphModule:
    """A copy of ``gm`` in which each factorized pair at ``paths`` is one layer again, called where the
    first factor was. Every path must be a pair :func:`factor_pair` finds."""
    out = copy.deepcopy(gm)
    nodes = _calls(out)
    for path in paths:
        pair = _pair(nodes, path)
        assert pair is not None, f"{path} is not a factorized pair"
        a, b = pair
        _install(out, path, merged_layer(out.get_submodule(f"{path}.0"), out.get_submodule(f"{path}.1")))
        # The merged layer replaces the Sequential at ``path``; the first factor's call (and its arguments) calls it
        # now.
        a.target = path
        b.replace_all_uses_with(a)
        out.graph.erase_node(b)
    out.graph.lint()
    out.recompile()
    return out
