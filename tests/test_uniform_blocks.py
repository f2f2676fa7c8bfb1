"""uniform_blocks: the groups playing one role in repeated blocks keep one width (layer3.*.conv1, a ViT's
MLP in every encoder layer), the budget still lands within 1% at round_to=1, and the mask oracle holds."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxmorph
from fxmorph.analysis.cost import CostModel
from fxmorph.api.shrink import run_pipeline
from fxmorph.capture.blocks import block_pattern, repeated_blocks
from fxmorph.passes.base import PassContext
from fxmorph.passes.prune import PrunePass
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.passes.uniform import same_role_classes
from fxmorph.passes.width import WidthPass
from tests.conftest import check_prune


def _shapes_by_role(model: nn.Module, blocks: tuple[str, ...]) -> dict[tuple[str, tuple[int, ...]], set]:
    """For every parameter inside a repeated block: its role (the path with block indices as ``*``) and its
    shape in ``model`` -> the shapes it has in the blocks."""
    out: dict[tuple[str, tuple[int, ...]], set] = collections.defaultdict(set)
    for name, p in model.named_parameters():
        pattern = block_pattern(name, blocks)
        if "*" in pattern:
            out[pattern].add(tuple(p.shape))
    return out


def assert_uniform(original: nn.Module, result: nn.Module) -> None:
    """Parameters of one role that had one shape in every block of ``original`` have one shape in ``result``
    (and some did change: the test is not passed by a model left whole)."""
    blocks = repeated_blocks(original)
    assert blocks, "the model has no repeated blocks"
    before, after = _shapes_by_role(original, blocks), _shapes_by_role(result, blocks)
    uneven = {role: shapes for role, shapes in after.items() if len(before[role]) == 1 and len(shapes) != 1}
    assert not uneven, f"roles with several widths: {dict(list(uneven.items())[:4])}"
    assert any(after[role] != before[role] for role in before), "no block changed width"


def _within_one_percent(report: fxmorph.ShrinkReport) -> None:
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops


@pytest.mark.parametrize(
    ("name", "build", "x"),
    [
        ("resnet50", lambda: torchvision.models.resnet50(), torch.randn(1, 3, 128, 128)),
        # vit_b_16 whole (12 layers of width 768, MLP 3072) on 64x64 images: 16 patches keep the test quick
        ("vit_b_16", lambda: torchvision.models.vit_b_16(image_size=64), torch.randn(1, 3, 64, 64)),
    ],
)
def test_repeated_blocks_keep_one_width_and_the_budget_lands(name: str, build, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build()
    small, report = fxmorph.shrink(model, "50%", x, round_to=1, uniform_blocks=True, return_report=True)
    assert type(small) is type(model)
    _within_one_percent(report)
    assert_uniform(model, small)
    assert report.settings["uniform_blocks"] is True
    assert "classes kept at one width" in report.passes[-1].note


@pytest.mark.slow
def test_vit_b_16_at_224_keeps_one_width_per_role() -> None:
    model, x = torchvision.models.vit_b_16(), torch.randn(1, 3, 224, 224)
    small, report = fxmorph.shrink(model, "40%", x, round_to=1, uniform_blocks=True, return_report=True)
    _within_one_percent(report)
    assert_uniform(model, small)


@pytest.mark.parametrize("strategy", ["prune", "width"])
def test_uniform_cuts_obey_the_mask_oracle(strategy: str) -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet34(), torch.randn(1, 3, 32, 32)
    cg = fxmorph.analyze(model, (x,))
    budget = CostModel(cg).flops() // 2
    cut = (PrunePass if strategy == "prune" else WidthPass)(budget, round_to=1, uniform_blocks=True)
    result = cut(cg.gm, PassContext((x,)))
    for members in same_role_classes(cg):
        assert len({result.plan[g].width if g in result.plan else cg.groups[g].size for g in members}) == 1
    check_prune(cg, result.plan, x)


def test_tied_costs_are_the_group_costs_of_the_expanded_widths() -> None:
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)
    cg = fxmorph.analyze(model, (x,))
    cost = CostModel(cg)
    classes = same_role_classes(cg)
    assert classes  # layer1.*.conv1, ...
    tied = cost.tied(classes)
    assert len(tied.sizes) == len(cg.groups) - sum(len(c) - 1 for c in classes)
    rng = np.random.default_rng(0)
    for _ in range(5):
        units = rng.integers(1, tied.sizes + 1)
        assert tied.flops(units) == cost.flops(tied.expand(units))
        assert tied.params(units) == cost.params(tied.expand(units))
        steps = [(u, int(rng.integers(1, tied.sizes[u] + 1))) for u in range(len(tied.sizes))]
        expected = [cost.flops(tied.expand(np.where(np.arange(len(units)) == u, w, units))) for u, w in steps]
        assert tied.flops_steps(units, steps).tolist() == expected


def test_a_class_with_a_protected_block_keeps_its_width_everywhere() -> None:
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    small = fxmorph.shrink(model, "60%", x, round_to=1, uniform_blocks=True, protect=["layer2.1"])
    for k in range(2):  # layer2.1's own groups cannot change, so layer2.0's same-role groups keep theirs too
        assert small.layer2[k].conv1.out_channels == 128
    assert small.layer3[0].conv1.out_channels == small.layer3[1].conv1.out_channels < 256


def test_grow_to_a_budget_keeps_one_width_per_role() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32)
    big = fxmorph.grow(model, (x,), budget_flops="150%", round_to=1, uniform_blocks=True)
    assert_uniform(model, big)
    with torch.no_grad():
        torch.testing.assert_close(big.eval()(x), model(x), rtol=1e-4, atol=1e-4)


def test_width_strategy_above_the_model_keeps_one_width_per_role() -> None:
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)
    big, report = fxmorph.shrink(model, "140%", x, strategy="width", uniform_blocks=True, return_report=True)
    assert report.flops_after <= report.budget_flops
    assert_uniform(model, big)


def test_remove_dead_takes_as_many_channels_from_every_block_of_a_class() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # dead channels: BatchNorm gamma and beta 0 (ReLU then gives exact zeros)
        for bn, count in ((model.layer1[0].bn1, 5), (model.layer1[1].bn1, 3)):
            bn.weight[:count] = 0
            bn.bias[:count] = 0
    expected = model(x)
    cg = fxmorph.analyze(model, (x,))
    lean = run_pipeline([RemoveDeadPass(uniform_blocks=True)], cg.gm, PassContext((x,)), copy_model=True).gm
    widths = [lean.get_submodule(f"layer1.{k}.conv1").out_channels for k in range(2)]
    assert widths == [61, 61]
    torch.testing.assert_close(lean(x), expected, rtol=1e-5, atol=1e-5)
    uneven = run_pipeline([RemoveDeadPass()], cg.gm, PassContext((x,)), copy_model=True).gm
    assert [uneven.get_submodule(f"layer1.{k}.conv1").out_channels for k in range(2)] == [59, 61]


class _Stacked(nn.Module):
    """Repeated blocks in a ModuleDict, a Sequential MLP of plain layers, and two blocks as attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleDict({k: nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for k in ("a", "b")})
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        self.left, self.right = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return self.right(self.left(self.mlp(x)))


def test_repeated_blocks_are_container_children_with_submodules_of_one_type() -> None:
    assert repeated_blocks(torchvision.models.resnet18())[:3] == ("layer1.0", "layer1.1", "layer2.0")
    assert repeated_blocks(torchvision.models.vit_b_16(image_size=32))[0] == "encoder.layers.encoder_layer_0"
    # the MLP's layers have no submodules, and left/right are attributes of a plain module: not blocks
    assert repeated_blocks(_Stacked()) == ("stages.a", "stages.b")
    assert block_pattern("stages.b.0.weight", ("stages.a", "stages.b")) == "stages.*.0.weight"
    assert block_pattern("layer3.1.conv1.weight", ("layer3.1",)) == "layer3.*.conv1.weight"
    gm = fxmorph.trace(_Stacked(), (torch.randn(2, 8),))  # the GraphModule's containers are plain modules
    assert repeated_blocks(gm) == ("stages.a", "stages.b")


def test_uniform_blocks_must_be_a_bool() -> None:
    with pytest.raises(fxmorph.InputError, match="uniform_blocks must be True or False"):
        fxmorph.shrink(_Stacked(), "50%", torch.randn(2, 8), uniform_blocks="yes")  # type: ignore[arg-type]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(8, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class _Tower(nn.Module):
    """A stem, three repeated residual blocks and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(_Block() for _ in range(3)))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_morph_keeps_one_width_per_role() -> None:
    torch.manual_seed(0)
    model, x = _Tower(), torch.randn(4, 1, 12, 12)
    with torch.no_grad():  # 2, 4 and 6 dead channels (gamma and beta 0 before a ReLU: no gradient revives them)
        for k, block in enumerate(model.blocks):
            block.bn.weight[: 2 * k + 2] = 0
            block.bn.bias[: 2 * k + 2] = 0
    data = [(torch.randn(4, 1, 12, 12), torch.randint(0, 4, (4,))) for _ in range(6)]
    widths = {}
    for uniform in (False, True):
        result, report = fxmorph.morph(
            model, "60%", (x,), data, torch.nn.functional.cross_entropy, epochs=1, finetune_epochs=0, round_to=1,
            progress=False, uniform_blocks=uniform,
        )  # fmt: skip
        assert type(result) is _Tower
        assert fxmorph.count_flops(result, (x,)) <= report.budget_flops
        widths[uniform] = [block.conv1.out_channels for block in result.blocks]
    assert len(set(widths[False])) > 1, widths  # each block lost its own dead channels
    assert len(set(widths[True])) == 1, widths


class _SplitStages(nn.Module):
    """Res2Net's and CSPNet's splits in small: pieces of one size read from attributes (one of them halved in
    the forward), each through a convolution of its own, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.width, self.expand_chs = nn.Conv2d(3, 24, 1), 8, 24
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.mid = nn.Conv2d(24, 24, 1)
        self.halves = nn.ModuleList(nn.Conv2d(12, 12, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        pieces = torch.split(x, self.width, 1)
        x = torch.cat([conv(pieces[k]) for k, conv in enumerate(self.convs)], 1)
        a, b = self.mid(x).split(self.expand_chs // 2, dim=1)
        return torch.cat([self.halves[0](a), self.halves[1](b)], 1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_pieces_of_a_split_by_one_size_keep_one_width_and_the_class_comes_back(capture: str) -> None:
    torch.manual_seed(0)
    model, x = _SplitStages().eval(), torch.randn(1, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    assert sorted(len(c) for c in cg.same_width) == [2, 3]  # the halves, the three pieces
    small, report = fxmorph.shrink(model, "50%", (x,), round_to=1, capture=capture, return_report=True)
    assert type(small) is _SplitStages, report.delivery
    assert report.flops_after <= report.budget_flops
    widths = {conv.in_channels for conv in small.convs}
    assert len(widths) == 1 and small.width == widths.pop() < 8  # one width, restated
    assert small.expand_chs == 2 * small.halves[0].in_channels  # the attribute that the forward halves
    with torch.no_grad():
        assert small(x).shape[2:] == model(x).shape[2:]
