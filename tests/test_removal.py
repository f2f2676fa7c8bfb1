"""Groups removed whole: which can go, what goes with them, and that the result is the model with them zeroed.

A group goes to width 0 only where its channels reach the rest of the model through concatenations alone (a dense
layer's new features); the ops that compute it go with it, and the concatenations leave it out. The mask oracle (the
original with the group's channels zeroed at every tensor) must equal the result, the cost model must count the
result's FLOPs and parameters exactly, and the result comes back as the user's class where its containers can drop
the modules that went.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxmorph
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.latency import LatencyFunction, kernels_of
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.api.removals import confirm_removals
from fxmorph.meta import KEPT_MODULES_KEY
from fxmorph.passes.select import greedy_widths
from fxmorph.testing import masked_reference, random_plan, run_double
from tests.test_latency_budget import FakeRuntime


class _Layer(nn.Module):
    """A dense layer: norm, activation, 1x1 bottleneck, norm, activation, 3x3 to ``growth`` new features."""

    def __init__(self, width: int, growth: int = 8) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(width), nn.Conv2d(width, 16, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(16), nn.Conv2d(16, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class _Dense(nn.Module):
    """A small DenseNet: a stem, four dense layers held in a ModuleDict (the forward runs what it holds), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layers = nn.ModuleDict({f"layer{k}": _Layer(16 + 8 * k) for k in range(4)})
        self.norm = nn.BatchNorm2d(48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers.values():
            features.append(layer(features))
        x = torch.relu(self.norm(torch.cat(features, 1)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Branches(nn.Module):
    """Two branches joined by a concatenation, held as attributes the forward calls by name (as Inception's)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.out = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        t = torch.relu_(h) if self.inplace else h  # written in place, before branch a reads h
        return self.out(torch.cat([self.a(h), self.b(t)], 1))


class _HeldBranches(nn.Module):
    """The same two branches, held in a ModuleDict whose entries the forward runs in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleDict({"a": nn.Conv2d(8, 4, 1), "b": nn.Conv2d(8, 4, 3, padding=1)})
        self.out = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.out(torch.cat([branch(h) for branch in self.branches.values()], 1))


def _input(side: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def _made_by(cg: fxmorph.ChannelGraph, path: str) -> int:
    """The group of the output channels of the layer at ``path``."""
    return next(g.id for g in cg.groups if any(p.name == f"{path}.weight" and p.dim == 0 for p in g.params))


@pytest.fixture(scope="module")
def densenet121() -> fxmorph.ChannelGraph:
    torch.manual_seed(0)
    return fxmorph.analyze(torchvision.models.densenet121().eval(), torch.randn(1, 3, 64, 64))


def test_densenet121s_new_features_can_go_whole_with_their_layer(densenet121: fxmorph.ChannelGraph) -> None:
    cg = densenet121
    removable = [g for g in cg.groups if cg.removal(g.id).possible]
    assert len(removable) == 6 + 12 + 24 + 16  # one group of new features per dense layer
    for g in removable:
        removal = cg.removal(g.id)
        assert g.size == 32 and len(removal.dead) == 7  # norm1, relu1, conv1, norm2, relu2, conv2 and the cat
        (bottleneck,) = removal.vanished
        assert cg.groups[bottleneck].size == 128
    first = cg.removal(next(g.id for g in cg.groups if any(p.name == "features.conv0.weight" for p in g.params)))
    assert not first.possible and "denselayer1_conv1" in (first.refused or "")


def test_removed_dense_layers_match_the_mask_oracle_and_the_cost_model() -> None:
    torch.manual_seed(0)
    model, x = _Dense().eval(), _input()
    before = copy.deepcopy(model.state_dict())
    cg = fxmorph.analyze(model, x)
    plans = dict(random_plan(cg, seed=3).items())
    for layer in ("layer1", "layer3"):
        plans[_made_by(cg, f"layers.{layer}.conv2")] = GroupPlan(())
    bottleneck = next(iter(cg.removal(_made_by(cg, "layers.layer3.conv2")).vanished))
    with pytest.raises(fxmorph.PlanError, match=f"group {bottleneck} would have no channels left"):
        fxmorph.resize(cg, WidthPlan({bottleneck: GroupPlan(())}))  # alone, its layer's conv2 would read nothing
    plans[bottleneck] = GroupPlan(())  # with the layer's new features, it goes with the layer
    plan = WidthPlan(plans)
    cost = CostModel(cg)
    widths = cost.widths({g: p.width for g, p in plan.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        small = fxmorph.resize(cg, plan)
    assert isinstance(small, _Dense) and list(small.layers) == ["layer0", "layer2"]
    assert torch.allclose(run_double(small, x), masked_reference(cg, plan, x), atol=1e-10)
    assert fxmorph.count_flops(small, x) == cost.flops(widths)
    assert sum(p.numel() for p in small.parameters()) == cost.params(widths)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched


def test_densenet121_without_layers_exports_to_onnx(densenet121: fxmorph.ChannelGraph, tmp_path: Path) -> None:
    cg = densenet121
    gone = [g.id for g in cg.groups if cg.removal(g.id).possible][::4]
    small = fxmorph.resize(cg, WidthPlan({g: GroupPlan(()) for g in gone}))
    x = torch.randn(1, 3, 64, 64)
    assert isinstance(small, torchvision.models.DenseNet)
    assert sum(len(block) for name, block in small.features.named_children() if "denseblock" in name) == 58 - len(gone)
    assert torch.allclose(run_double(small, x), masked_reference(cg, WidthPlan({g: GroupPlan(()) for g in gone}), x))
    fxmorph.export_onnx(small, (x,), tmp_path / "small.onnx")  # checked against torch in onnxruntime


def test_a_group_that_cannot_go_whole_says_why() -> None:
    model, x = _Branches().eval(), _input()
    cg = fxmorph.analyze(model, x)
    stem = _made_by(cg, "stem")
    # its branches would compute their biases, which the concatenation would not take at one value per channel
    with pytest.raises(fxmorph.PlanError, match="cannot be removed whole \\('a' would read no channels"):
        fxmorph.resize(cg, WidthPlan({stem: GroupPlan(())}))
    assert "pinned" in (cg.removal(_made_by(cg, "out")).refused or "")  # the model's output


def test_groups_that_fill_a_concatenation_together_go_one_at_a_time() -> None:
    model, x = _HeldBranches().eval(), _input()
    cg = fxmorph.analyze(model, x)
    a, b = _made_by(cg, "branches.a"), _made_by(cg, "branches.b")
    cost = CostModel(cg)
    assert cost.removable[[a, b]].all() and frozenset({a, b}) in cost.joint
    with pytest.raises(fxmorph.PlanError, match="leave 'cat' with no channels"):
        fxmorph.resize(cg, WidthPlan({a: GroupPlan(()), b: GroupPlan(())}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        small = fxmorph.resize(cg, WidthPlan({a: GroupPlan(())}))
    assert isinstance(small, _HeldBranches) and list(small.branches) == ["b"]
    assert torch.allclose(run_double(small, x), masked_reference(cg, WidthPlan({a: GroupPlan(())}), x))
    scores = {g: np.ones(int(cost.sizes[g])) for g in (a, b)}
    widths = greedy_widths(cost, scores, 0, 1, 0)  # a budget of nothing: every step it may take
    assert min(widths[a], widths[b]) == 0 and max(widths[a], widths[b]) > 0


def test_a_branch_the_forward_calls_by_name_goes_only_when_asked() -> None:
    model, x = _Branches().eval(), _input()
    cg = fxmorph.analyze(model, x)
    a, b = _made_by(cg, "a"), _made_by(cg, "b")
    assert cg.removal(a).possible and not cg.removal(a).droppable  # exact, but the class cannot run without self.a
    cost = CostModel(cg)
    assert not cost.removable[[a, b]].any()  # so selection keeps it
    with pytest.warns(fxmorph.WriteBackWarning, match="'a' went with a group removed whole, and _Branches's forward"):
        small = fxmorph.resize(cg, WidthPlan({a: GroupPlan(())}))  # resize removes it, as a GraphModule
    assert torch.allclose(run_double(small, x), masked_reference(cg, WidthPlan({a: GroupPlan(())}), x))
    with pytest.raises(fxmorph.WriteBackError, match="calls it by name"):
        fxmorph.resize(cg, WidthPlan({a: GroupPlan(())}), keep_class=True)


def test_an_op_that_writes_into_a_tensor_that_stays_keeps_its_group() -> None:
    model, x = _Branches(inplace=True).eval(), _input()
    cg = fxmorph.analyze(model, x)
    b = _made_by(cg, "b")
    with pytest.raises(fxmorph.PlanError, match="cannot be removed whole \\('relu_' writes in place into 'stem'"):
        fxmorph.resize(cg, WidthPlan({b: GroupPlan(())}))


def test_the_cost_model_steps_a_group_to_nothing_as_it_counts_it() -> None:
    cg = fxmorph.analyze(_Dense().eval(), _input())
    cost = CostModel(cg)
    w = cost.widths()
    gone = np.flatnonzero(cost.removable)
    assert len(gone) == 4
    for counted, steps in ((cost.flops, cost.flops_steps), (cost.params, cost.params_steps)):
        assert steps(w, [(int(g), 0) for g in gone]).tolist() == [
            counted(np.where(np.arange(len(w)) == g, 0, w)) for g in gone
        ]


def test_the_latency_model_drops_every_op_that_goes_with_a_group(densenet121: fxmorph.ChannelGraph) -> None:
    cg = densenet121
    cost = CostModel(cg)
    function = LatencyFunction(cost, FakeRuntime().profile(kernels_of(cg)))
    full = cost.widths()
    gone = np.flatnonzero(cost.removable)
    thinnest = full.copy()
    thinnest[gone] = 1
    removed = full.copy()
    removed[gone] = 0
    assert function(removed) < function(thinnest) - 58 * 1.0  # at least the fixed cost of each layer's cat
    assert function.steps(full, gone, np.zeros_like(gone)) == pytest.approx(
        [function(np.where(np.arange(len(full)) == g, 0, full)) for g in gone]
    )


def test_a_latency_budget_removes_layers_a_flops_budget_thins(densenet121: fxmorph.ChannelGraph) -> None:
    cg = densenet121
    cost = CostModel(cg)
    free = [g.id for g in cg.free_groups]
    scores = {g: np.ones(int(cost.sizes[g])) for g in free}
    half = greedy_widths(cost, scores, cost.flops() // 2, 16, 0, param_cost=0)
    assert (half[free] > 0).all()  # FLOPs go in proportion either way: the balance keeps every group
    function = LatencyFunction(cost, FakeRuntime().profile(kernels_of(cg)))
    priced = cost.priced(function)
    fast = greedy_widths(priced, scores, function(cost.widths()) / 2, 16, 0)
    assert (fast[free] == 0).any() and function(fast) <= function(cost.widths()) / 2
    WidthPlan.from_widths(cg, {g: int(fast[g]) for g in free}).validate(cg)  # the groups gone may go together


def test_min_width_zero_is_accepted_and_a_negative_one_is_not() -> None:
    model, x = _Dense().eval(), _input()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fxmorph.InputError, match="min_width must be a non-negative integer"):
        fxmorph.shrink(model, budget_flops=0.5, example_inputs=x, min_width=-1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    small = fxmorph.shrink(model, budget_flops=0.5, example_inputs=x, min_width=0)
    assert fxmorph.count_flops(small, x) <= fxmorph.count_flops(model, x) / 2


class _Zipped(nn.Module):
    """Branches held in a ModuleList that the forward zips with the chunks of a split by position (as timm's Res2Net
    blocks and mixed convolutions do): without one of them, the class would feed the next one its chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.width = nn.Conv2d(3, 16, 3, padding=1), 4
        self.convs = nn.ModuleList(nn.Conv2d(4, 8, 3, padding=1) for _ in range(4))
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(self.stem(x), self.width, 1)
        return self.head(torch.cat([conv(chunks[i]) for i, conv in enumerate(self.convs)], 1))


def test_a_container_the_class_cannot_run_without_a_module_keeps_its_groups() -> None:
    torch.manual_seed(0)
    model, x = _Zipped().eval(), _input(64)  # the fake runtime takes 0.05 ms whatever runs: a cut needs FLOPs
    gm = fxmorph.trace(model, (x,))
    branches = [g.id for g in build_channel_graph(gm).groups if g.size == 8]
    assert len(branches) == 4 and all(build_channel_graph(gm).removal(g).droppable for g in branches)
    confirm_removals(model, gm)  # the trial removes one branch: write-back refuses the class without it
    assert gm.meta[KEPT_MODULES_KEY] == ("convs.0", "convs.1", "convs.2", "convs.3")
    cg = build_channel_graph(gm)
    assert all(cg.removal(g).possible and not cg.removal(g).droppable for g in branches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        small, report = fxmorph.shrink(
            model, example_inputs=x, budget_latency="90%", runtime=FakeRuntime(), return_report=True
        )
    assert isinstance(small, _Zipped) and len(small.convs) == 4
    assert report.settings["min_width"] == 0 and all(r.after > 0 for r in report.groups)


def test_a_latency_budget_lets_groups_go_whole_by_default_and_a_flops_budget_does_not() -> None:
    torch.manual_seed(0)
    model, x = _Dense().eval(), _input(64)
    gm = fxmorph.trace(model, (x,))
    confirm_removals(model, gm)  # torchvision-style containers run what they hold: every layer may go
    assert gm.meta[KEPT_MODULES_KEY] == ()
    _, latency = fxmorph.shrink(
        model, example_inputs=x, budget_latency="90%", runtime=FakeRuntime(), return_report=True
    )
    _, flops = fxmorph.shrink(model, example_inputs=x, budget_flops="50%", return_report=True)
    assert latency.settings["min_width"] == 0 and flops.settings["min_width"] == 1
    _, explicit = fxmorph.shrink(
        model, example_inputs=x, budget_latency="90%", runtime=FakeRuntime(), min_width=1, return_report=True
    )
    assert explicit.settings["min_width"] == 1 and all(r.after > 0 for r in explicit.groups)
