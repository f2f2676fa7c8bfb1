"""remove-dead removes channels that are exactly zero where they are read (issue 18, item 2).

A BatchNorm channel with ``gamma = 0`` outputs ``beta``; after a ReLU of a non-positive ``beta`` it is
exactly 0, and zero padding adds zeros to zeros, so removing it is exact whatever reads it (padded,
grouped or depthwise convolutions, concatenations). The pass used to keep every constant channel read
by a padded convolution: nothing was removed from ResNet-18, VGG-11-BN or DenseNet-121 with a quarter
of their BatchNorm channels dead, and 3% of MobileNetV2's FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxmorph
from fxmorph.analysis import ChannelGraph, Role
from fxmorph.passes.base import PassContext
from fxmorph.passes.importance import channel_positions
from fxmorph.passes.remove_dead import RemoveDeadPass
from tests.conftest import assert_close_trees

ZOO = ["resnet18", "vgg11_bn", "densenet121", "mobilenet_v2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _kill_every_fourth_bn_channel(model: nn.Module) -> None:
    """``gamma = beta = 0`` on channels 0, 4, 8, ... of every BatchNorm; the live channels get random
    statistics and shifts, so the outputs are far from zero and from the initialisation's symmetry."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1, generator=generator)
                bn.running_var.uniform_(0.5, 1.5, generator=generator)
                bn.weight.uniform_(0.5, 1.5, generator=generator)
                bn.bias.uniform_(-0.2, 0.2, generator=generator)
                bn.weight[::4] = 0.0
                bn.bias[::4] = 0.0


def _dead_per_group(cg: ChannelGraph) -> dict[int, int]:
    """Independently of the pass: per free group, the channels dead (gamma = beta = 0) in every
    BatchNorm the group has (a channel is dead only where it is dead in every member)."""
    out = {}
    for g in cg.free_groups:
        dead = None
        for m in g.params:
            owner, _, leaf = m.name.rpartition(".")
            if leaf != "weight" or not isinstance(bn := cg.gm.get_submodule(owner), nn.BatchNorm2d):
                continue
            positions = channel_positions(cg, cg.bindings[(m.name, m.dim)].layout, g.id)
            here = ((bn.weight == 0) & (bn.bias == 0)).detach().numpy()[positions].all(axis=1)
            dead = here if dead is None else dead & here
        if dead is not None and dead.any():
            out[g.id] = int(dead.sum())
    return out


def _width(cg: ChannelGraph, gid: int, model: nn.Module) -> int:
    """The width of group ``gid`` of ``cg`` in ``model``, read from a parameter the group alone indexes."""
    for m in cg.groups[gid].params:
        pieces = cg.layout_groups(cg.bindings[(m.name, m.dim)].layout)
        if all(g == gid for g, _ in pieces) and m.role == Role.OUT:
            return model.get_parameter(m.name).shape[m.dim] // sum(inner for _, inner in pieces)
    raise AssertionError(f"group {gid} has no parameter of its own")


def _assert_same_function(small: nn.Module, model: nn.Module, inputs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in inputs:
            assert_close_trees(small.eval()(x), model(x), rtol=1e-5, what="remove-dead equivalence")


@pytest.mark.parametrize("name", ZOO)
def test_shrink_at_full_budget_removes_every_dead_batchnorm_channel(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    _kill_every_fourth_bn_channel(model)
    x = torch.randn(1, 3, 32, 32)  # the smallest input all four take: 1x1 after the last downsampling
    cg = fxmorph.analyze(model, (x,))
    dead = _dead_per_group(cg)
    assert sum(dead.values()) > 100
    small, report = fxmorph.shrink(model, 1.0, (x,), return_report=True)
    for g in cg.free_groups:
        assert _width(cg, g.id, small) == g.size - dead.get(g.id, 0), f"group {g.id} ({g.size} channels)"
    rows = {r.id: r for r in report.groups}
    assert all(rows[g].before - rows[g].after == n for g, n in dead.items())
    expected = fxmorph.CostModel(cg).flops({g: cg.groups[g].size - n for g, n in dead.items()})
    assert report.flops_after == fxmorph.count_flops(small, (x,)) == expected < report.flops_before
    _assert_same_function(small, model, [x, torch.randn(3, 3, 48, 48)])  # another batch and image size


class _NegativeBeta(nn.Module):
    """conv-BN-ReLU whose dead channels (gamma = 0) have a negative, zero or positive beta, read by a
    padded 3x3 conv; then a depthwise block whose input has dead channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=True)
        self.bn3 = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for bn in (self.bn, self.bn2, self.bn3):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
            self.bn.weight[[1, 2, 3, 4]] = 0.0
            self.bn.bias[[1, 2, 3, 4]] = torch.tensor([-0.7, 0.0, 0.4, -0.1])  # 3 has relu(0.4) > 0: kept
            self.bn2.weight[[0, 5, 9]] = 0.0
            self.bn2.bias[[0, 5, 9]] = -0.5  # zero into the depthwise conv, which outputs its bias there
            self.dw.bias.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))  # functional relu: the pass asks the rule table, not a module list
        h = F.relu(self.bn2(self.conv2(h)))
        h = F.relu6(self.bn3(self.dw(h)))
        return self.fc(self.pw(h).mean((2, 3)))


def test_zero_constants_go_whatever_the_padding_and_depthwise_outputs_fold() -> None:
    torch.manual_seed(0)
    model = _NegativeBeta().eval()
    x = torch.randn(2, 3, 12, 12)
    result = RemoveDeadPass()(fxmorph.trace(model, (x,)), PassContext((x,)))
    small = result.gm
    # relu(-0.7) = relu(0) = relu(-0.1) = 0: removed though conv2 pads; relu(0.4) is not 0 at the borders
    assert small.get_submodule("conv").out_channels == 13
    # channels 0, 5, 9 reach the depthwise conv as zeros: it outputs its bias, a constant that bn3 and
    # relu6 map to another constant, folded into pw (1x1, unpadded)
    assert small.get_submodule("dw").out_channels == 21
    assert small.get_submodule("pw").in_channels == 21
    _assert_same_function(small, model, [x, torch.randn(5, 3, 20, 16)])


class _Unsafe(nn.Module):
    """Dead channels whose value where they are read is not 0 and cannot be folded: they stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 3)
        self.fill = 2.0
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.weight[:4] = 0.0
                bn.bias[:4] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.bn(self.conv(x))) + 1.0)  # relu(-1) + 1 = 1, read through padding
        h = F.relu(self.bn2(h))  # zeros...
        return self.conv3(F.pad(h, (1, 1, 1, 1), value=self.fill))  # ...padded with 2 by the graph itself


def test_nonzero_constants_behind_padding_stay() -> None:
    model = _Unsafe().eval()
    x = torch.randn(2, 3, 8, 8)
    result = RemoveDeadPass()(fxmorph.trace(model, (x,)), PassContext((x,)))
    assert not result.modified
    model.fill = 0.0  # the same model with a zero pad: bn2's four dead channels go
    result = RemoveDeadPass()(fxmorph.trace(model, (x,)), PassContext((x,)))
    assert result.changes and sum(a - b for a, b in result.changes.values()) == 4
    _assert_same_function(result.gm, model, [x, torch.randn(1, 3, 9, 7)])


class _Gated(nn.Module):
    """A squeeze-and-excitation gate: ``x * s`` is 0 where ``x`` is, whatever ``s``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 6, 3, padding=1)
        with torch.no_grad():
            self.bn.weight[::3] = 0.0
            self.bn.bias[::3] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.out(h * s)


def test_gated_zero_channels_go() -> None:
    model = _Gated().eval()
    x = torch.randn(2, 3, 10, 10)
    result = RemoveDeadPass()(fxmorph.trace(model, (x,)), PassContext((x,)))
    assert result.gm.get_submodule("conv").out_channels == 10
    assert result.gm.get_submodule("fc2").out_channels == 10
    _assert_same_function(result.gm, model, [x, torch.randn(4, 3, 6, 6)])


def test_every_channel_dead_keeps_one() -> None:
    model = _Gated().eval()
    with torch.no_grad():
        model.bn.weight.zero_()
        model.bn.bias.zero_()
    x = torch.randn(2, 3, 10, 10)
    result = RemoveDeadPass()(fxmorph.trace(model, (x,)), PassContext((x,)))
    assert result.gm.get_submodule("conv").out_channels == 1
    _assert_same_function(result.gm, model, [x])
