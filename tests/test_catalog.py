"""One small topology per channel rule: removal obeys the mask oracle, growth keeps the function."""

from __future__ import annotations

import pytest
import torch

import fxmorph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.testing import random_plan
from tests.catalog import CATALOG
from tests.conftest import check_grow, check_prune


def _analyse(name: str):
    factory, make_input = CATALOG[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = make_input()
    return model, x, fxmorph.analyze(model, (x,))


def _group_of(cg, param: str, dim: int = 0):
    for g in cg.groups:
        if any(p.name == param and p.dim == dim for p in g.params):
            return g
    raise AssertionError(f"no group indexes {param} dim {dim}")


@pytest.mark.parametrize("name", sorted(CATALOG))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_removal_obeys_mask_oracle(name: str, seed: int) -> None:
    _, x, cg = _analyse(name)
    plan = random_plan(cg, seed=seed)
    if name != "unknown_op":
        assert plan, f"{name}: nothing is free to prune"
    check_prune(cg, plan, x)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_growth_keeps_function(name: str) -> None:
    _, x, cg = _analyse(name)
    plan = WidthPlan({g.id: GroupPlan(tuple(range(g.size)), new=3) for g in cg.groups if g.growable})
    check_grow(cg, plan, x)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_user_model_untouched(name: str) -> None:
    model, _, cg = _analyse(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxmorph.resize(cg, random_plan(cg, seed=3))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_se_gate_couples_with_its_input() -> None:
    _, _, cg = _analyse("se_gate")
    assert _group_of(cg, "a.weight") is _group_of(cg, "fc2.weight")
    assert not _group_of(cg, "a.weight").pins


def test_spatial_mask_does_not_couple() -> None:
    _, _, cg = _analyse("spatial_mask")
    main = _group_of(cg, "a.weight")
    assert main is not _group_of(cg, "m.weight")
    assert not main.pins, main.pinned


def test_depthwise_couples_input_and_output_and_grouped_removes_uniformly() -> None:
    _, x, cg = _analyse("depthwise_grouped")
    stem = _group_of(cg, "a.weight")
    assert any(p.name == "dw.weight" for p in stem.params), "depthwise output follows its input"
    # The grouped conv sees 16 = 8 stem channels x multiplier 2 in 4 groups: removal must be the
    # same in every group, so one group of 2 stem channels spans its per-group input.
    grouped_in = _group_of(cg, "g.weight", 1)
    assert grouped_in is stem and stem.size == 2
    small = check_prune(cg, WidthPlan({stem.id: GroupPlan((1,))}), x)
    assert (small.get_submodule("g").in_channels, small.get_submodule("g").groups) == (8, 4)
    assert small.get_submodule("dw").groups == 4


def test_reshape_heads_keep_divisible_by_head_count() -> None:
    _, x, cg = _analyse("reshape_heads")
    stream = _group_of(cg, "inp.weight")
    assert stream.size == 16 // 2 and not stream.pins
    small = check_prune(cg, WidthPlan({stream.id: GroupPlan((1, 3, 4))}), x)
    assert small.get_submodule("inp").out_features == 6


def test_multihead_attention_head_dim_group() -> None:
    _, x, cg = _analyse("multihead_attention")
    head = _group_of(cg, "attn.in_proj_weight")
    assert head.size == 4 and not head.pins
    small = check_prune(cg, WidthPlan({head.id: GroupPlan((0, 3))}), x)
    attn = small.get_submodule("attn")
    assert (attn.embed_dim, attn.head_dim, attn.num_heads) == (8, 2, 4)


def test_parameters_used_directly_follow_their_channels() -> None:
    _, x, cg = _analyse("tokens")
    stream = _group_of(cg, "patch.weight")
    names = {p.name for p in stream.params}
    assert {"cls", "pos", "scale"} <= names
    small = check_prune(cg, WidthPlan({stream.id: GroupPlan((0, 5, 9))}), x)
    assert small.pos.shape == (1, 5, 3)


def test_module_called_twice_is_one_group() -> None:
    _, _, cg = _analyse("reused_module")
    assert _group_of(cg, "shared.weight", 0) is _group_of(cg, "shared.weight", 1)


def test_flatten_maps_channel_blocks_into_linear() -> None:
    _, x, cg = _analyse("flatten_linear")
    group = _group_of(cg, "b.weight")
    small = check_prune(cg, WidthPlan({group.id: GroupPlan((1, 4))}), x)
    assert small.get_submodule("fc3").in_features == 2 * 16


def test_unknown_op_pins_with_op_name() -> None:
    _, _, cg = _analyse("unknown_op")
    group = _group_of(cg, "b.weight")
    assert group.pinned is not None and "cumsum" in group.pinned
    assert not _group_of(cg, "a.weight").pins


def test_channel_shuffle_and_pixel_shuffle_stay_prunable() -> None:
    for name, param in (("channel_shuffle", "a.weight"), ("pixel_shuffle", "a.weight")):
        _, _, cg = _analyse(name)
        assert not _group_of(cg, param).pins, f"{name}: {_group_of(cg, param).pinned}"


def test_explain_lists_groups_and_pins() -> None:
    _, _, cg = _analyse("unknown_op")
    table = cg.explain()
    assert "cumsum" in table and "free" in table and "pinned" in table


def test_index_select_of_input_features_is_a_group_that_does_not_grow() -> None:
    _, x, cg = _analyse("feature_select")
    features = _group_of(cg, "fc1.weight", 1)
    assert features is _group_of(cg, "fc2.weight", 1) and features.size == 12
    assert not features.pins and not features.growable
    small = check_prune(cg, WidthPlan({features.id: GroupPlan((0, 4, 11))}), x)
    assert small.kept.tolist() == [0, 7, 19]
    assert small.get_submodule("fc1").in_features == 3


def test_index_select_along_channels_pins_them() -> None:
    class Picks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("order", torch.tensor([2, 0, 1, 3]))
            self.conv, self.head = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).index_select(1, self.order))

    cg = fxmorph.analyze(Picks().eval(), (torch.randn(1, 3, 4, 4),))
    assert "index_select along a channel dim" in (_group_of(cg, "conv.weight").pinned or "")
