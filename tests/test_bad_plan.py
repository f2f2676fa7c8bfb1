"""Bad width plans at ``fxmorph.resize`` (the engine's entry point): each a :class:`fxmorph.PlanError` that
names the group, the cause and the fix, raised by fxmorph before any tensor is rebuilt, with the user's
model unchanged. One parameter per row of the ``resize`` section of ``docs/bad_input.md``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fxmorph
from fxmorph import GroupPlan, PlanError, WidthPlan
from tests.conftest import SmallNet
from tests.test_bad_input import assert_error, assert_unchanged, snapshot

X = torch.randn(2, 3, 8, 8)
ALL = tuple(range(32))  # SmallNet's group 0 (conv + bn) and group 1 (conv2) have 32 channels; group 2 is the output


def _layernorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


CASES: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "group id that does not exist": (lambda: {9: GroupPlan((0,))}, ("group 9 does not exist", "3 groups")),
    "group id not an integer": (lambda: {"0": GroupPlan((0,))}, ("group ids are integers", "'0'")),
    "not a GroupPlan": (lambda: {0: (0, 1)}, ("expected a groupplan, got tuple", "groupplan(keep=")),
    "keep index out of range": (lambda: {0: GroupPlan((0, 40))}, ("keep indices must lie in [0, 32)",)),
    "keep indices repeat": (lambda: {0: GroupPlan((0, 0))}, ("keep indices repeat",)),
    "keep indices not integers": (lambda: {0: GroupPlan((0.0, 1.0))}, ("integers only", "[0.0, 1.0]")),
    "negative new": (lambda: {0: GroupPlan((0,), new=-1)}, ("negative number of channels",)),
    "new not an integer": (lambda: {0: GroupPlan(ALL, new=1.5)}, ("new is a number of channels", "1.5")),
    "no channel left": (lambda: {0: GroupPlan(())}, ("no channels left", "keep at least one")),
    "a pinned group changes": (lambda: {2: GroupPlan((0, 1))}, ("group 2 is pinned", "model output")),
    "init for an unknown tensor": (
        lambda: {0: GroupPlan(ALL, new=2, init={"nope.weight": torch.zeros(2, 3, 3, 3)})},
        ("'nope.weight'", "not a parameter or buffer", "conv.weight"),
    ),
    "init for a tensor the group does not bind": (
        lambda: {0: GroupPlan(ALL, new=2, init={"fc.weight": torch.zeros(5, 2)})},
        ("fc.weight", "no changing group binds"),
    ),
    "init of the wrong shape": (
        lambda: {0: GroupPlan(ALL, new=2, init={"conv.weight": torch.zeros(2, 2, 3, 3)})},
        ("has shape [2, 2, 3, 3]", "['new', 3, 3, 3]"),
    ),
    "init without new channels": (
        lambda: {0: GroupPlan(ALL, init={"conv.weight": torch.zeros(2, 3, 3, 3)})},
        ("init gives values for new channels", "new is 0"),
    ),
    "init value not a tensor": (
        lambda: {0: GroupPlan(ALL, new=2, init={"conv.weight": [[0.0]]})},
        ("must be a tensor", "list"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resize_refuses_a_bad_plan(case: str) -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    before = snapshot(model)
    cg = fxmorph.analyze(model, (X,))
    plan, words = CASES[case]
    assert_error(lambda: fxmorph.resize(cg, WidthPlan(plan())), PlanError, *words)
    assert_unchanged(model, before)


def test_resize_refuses_to_grow_a_layernorm_group() -> None:
    """README: groups where new channels cannot keep the function (a LayerNorm's) refuse growth, saying why."""
    model = _layernorm_mlp()
    before = snapshot(model)
    cg = fxmorph.analyze(model, (torch.randn(2, 8),))
    plan = WidthPlan({0: GroupPlan(tuple(range(16)), new=2)})
    assert_error(lambda: fxmorph.resize(cg, plan), PlanError, "group 0 cannot grow", "layernorm's statistics")
    assert_unchanged(model, before)


def test_resize_accepts_keep_as_a_list_or_an_integer_tensor() -> None:
    """Supported: ``keep`` as a list or an integer tensor, and explicit ``init`` values of the documented shape."""
    model = SmallNet().eval()
    cg = fxmorph.analyze(model, (X,))
    for keep in ([0, 2, 5], torch.tensor([0, 2, 5])):
        small = fxmorph.resize(cg, WidthPlan({0: GroupPlan(keep)}))
        assert torch.equal(small.get_parameter("conv.weight"), model.conv.weight[[0, 2, 5]])
    values = torch.full((2, 3, 3, 3), 0.5)
    big = fxmorph.resize(cg, WidthPlan({0: GroupPlan(ALL, new=2, init={"conv.weight": values})}))
    assert torch.equal(big.get_parameter("conv.weight")[32:], values)
    with torch.no_grad():  # the other defaults (zero fan-out) keep the function
        assert torch.allclose(big(X), model(X), atol=1e-6)


def test_resize_refuses_arguments_of_the_wrong_kind() -> None:
    """A model instead of its channel graph, or no plan: an InputError that shows the call to make."""
    model = SmallNet().eval()
    cg = fxmorph.analyze(model, (X,))
    assert_error(lambda: fxmorph.resize(model, WidthPlan({})), fxmorph.InputError, "got smallnet", "fxmorph.analyze")
    assert_error(lambda: fxmorph.resize(cg, None), fxmorph.InputError, "got nonetype", "widthplan({0: groupplan(")
    assert_error(lambda: fxmorph.resize(cg, {0: GroupPlan(5)}), PlanError, "keep is a sequence", "got int")


def test_resize_takes_a_dict_and_keep_as_an_array_or_range() -> None:
    """Supported: a plain dict of GroupPlans, ``keep`` as a NumPy array or a range (normalised to a tuple)."""
    model = SmallNet().eval()
    cg = fxmorph.analyze(model, (X,))
    for keep in (np.arange(4), range(4)):
        plan = GroupPlan(keep)
        assert plan.keep == (0, 1, 2, 3)
        assert fxmorph.resize(cg, {0: plan}).get_parameter("conv.weight").shape[0] == 4
