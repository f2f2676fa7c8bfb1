"""Shared helpers for the test-suite."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

import fxmorph
from fxmorph.analysis import ChannelGraph
from fxmorph.plan import WidthPlan
from fxmorph.testing import masked_reference, run_double


def assert_close_trees(actual: Any, expected: Any, rtol: float = 1e-7, what: str = "outputs") -> None:
    """Every tensor of two output structures agrees to ``rtol`` of the expected tensor's scale."""
    a, sa = tree_flatten(actual)
    b, sb = tree_flatten(expected)
    assert sa == sb, f"{what}: output structures differ: {sa} vs {sb}"
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape, f"{what}: shape {tuple(u.shape)} vs {tuple(v.shape)}"
        scale = max(v.abs().max().item(), 1e-6)
        err = (u - v).abs().max().item()
        assert err <= rtol * scale, f"{what}: max difference {err:.3e} (scale {scale:.3e})"


def output_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        out = copy.deepcopy(model).eval()(x)
    return [tuple(t.shape) for t in tree_flatten(out)[0]]


def check_prune(cg: ChannelGraph, plan: WidthPlan, x: torch.Tensor) -> fx.GraphModule:
    """Apply a removal plan and assert: check passes, shapes unchanged, mask oracle, FLOPs predicted."""
    before = output_shapes(cg.gm, x)
    small = fxmorph.resize(cg, plan)
    fxmorph.check(small, (x,))
    assert output_shapes(small, x) == before
    assert_close_trees(run_double(small, x), masked_reference(cg, plan, x), what="mask oracle")
    predicted = fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    assert fxmorph.count_flops(small, (x,)) == predicted
    return small


def check_grow(cg: ChannelGraph, plan: WidthPlan, x: torch.Tensor) -> fx.GraphModule:
    """Apply a growth plan (default init) and assert the function is unchanged."""
    big = fxmorph.resize(cg, plan)
    fxmorph.check(big, (x,))
    assert_close_trees(run_double(big, x), run_double(cg.gm, x), what="growth equivalence")
    predicted = fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    assert fxmorph.count_flops(big, (x,)) == predicted
    return big
