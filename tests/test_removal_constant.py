"""Residual branches removed whole: the layer closing the branch reads no channels and computes its bias, and the
branch folds into one value per channel that the residual add takes.

The result must equal the mask oracle (the original with the group's channels zeroed), come back as the user's class
where its forward runs without the branch's modules (the branch replaced by a ``Constant``, a norm that fed only it
skipped), fall back to a GraphModule where the class cannot (an in-place add into the branch's output, an
activation shared with the stream), and refuse what cannot fold exactly.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxmorph
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.analysis.removal import combined
from fxmorph.api.removals import confirm_removals
from fxmorph.meta import KEPT_MODULES_KEY
from fxmorph.surgery.constant import Constant, Skipped
from fxmorph.testing import masked_reference, random_plan, run_double


class _Inverted(nn.Module):
    """An inverted residual: ``x + branch(x)``, the branch a Sequential (expand, depthwise, project, norm)."""

    def __init__(self, width: int = 8, hidden: int = 24) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(width, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, width, 1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class _InPlace(_Inverted):
    """The same block adding its input into the branch's output in place (as torchvision's ConvNeXt block does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        out += x
        return out


class _Encoder(nn.Module):
    """A transformer block's MLP half: ``x + mlp(norm(x))``, the norm called by name."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _Net(nn.Module):
    """A stem, three blocks of ``block`` and a head."""

    def __init__(self, block: type[nn.Module] = _Inverted) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(block() for _ in range(3)))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _input(side: int = 12) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def _hidden(cg: fxmorph.ChannelGraph, path: str) -> int:
    """The group of the output channels of the layer at ``path``."""
    return next(g.id for g in cg.groups if any(p.name == f"{path}.weight" and p.dim == 0 for p in g.params))


def _model(block: type[nn.Module] = _Inverted) -> nn.Module:
    torch.manual_seed(0)
    model = _Net(block).eval()
    for m in model.modules():  # statistics of their own, so that the norms' constants differ from their shifts
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return model


def test_a_branch_left_reading_nothing_folds_into_its_norms_constant() -> None:
    model, x = _model(), _input()
    before = copy.deepcopy(model.state_dict())
    cg = fxmorph.analyze(model, x)
    gid = _hidden(cg, "blocks.1.branch.0")
    removal = cg.removal(gid)
    assert removal.possible and removal.droppable
    assert [s for s, _ in removal.sources] == ["blocks_1_branch_6"]
    assert [(f.node, f.module) for f in removal.folds] == [("blocks_1_branch_7", "blocks.1.branch")]
    plan = WidthPlan({**dict(random_plan(cg, seed=2).items()), gid: GroupPlan(())})
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        small = fxmorph.resize(cg, plan)
    assert isinstance(small, _Net) and isinstance(small.blocks[1].branch, Constant)
    assert torch.allclose(run_double(small, x), masked_reference(cg, plan, x), atol=1e-10)
    cost = CostModel(cg)
    widths = cost.widths({g: p.width for g, p in plan.items()})
    assert fxmorph.count_flops(small, x) <= cost.flops(widths)  # the constant's norm is not run any more
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_norm_that_fed_only_the_branch_is_skipped_and_the_class_comes_back() -> None:
    torch.manual_seed(0)
    model, x = _Encoder().eval(), torch.randn(2, 5, 16)
    cg = fxmorph.analyze(model, x)
    gid = _hidden(cg, "mlp.0")
    plan = WidthPlan({gid: GroupPlan(())})
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        small = fxmorph.resize(cg, plan)
    assert isinstance(small, _Encoder) and isinstance(small.norm, Skipped) and isinstance(small.mlp, Constant)
    assert torch.allclose(run_double(small, x), masked_reference(cg, plan, x), atol=1e-10)
    assert torch.allclose(small(x), x + model.mlp[3].bias)  # the second Linear's bias, broadcast


def test_an_in_place_add_into_the_branch_gives_a_graph_module_and_is_kept_by_selection() -> None:
    model, x = _model(_InPlace), _input()
    cg = fxmorph.analyze(model, x)
    plan = WidthPlan({_hidden(cg, "blocks.0.branch.0"): GroupPlan(())})
    with pytest.warns(fxmorph.WriteBackWarning, match="in place"):
        small = fxmorph.resize(cg, plan)  # the trace records `out += x` as an add: only running the class shows it
    assert isinstance(small, torch.fx.GraphModule)
    assert torch.allclose(run_double(small, x), masked_reference(cg, plan, x), atol=1e-10)
    gm = fxmorph.trace(model, (x,))
    confirm_removals(model, gm)
    assert "blocks.0.branch" in gm.meta[KEPT_MODULES_KEY]
    assert not any(build_channel_graph(gm).removal(g.id).droppable for g in build_channel_graph(gm).groups)


def test_what_cannot_fold_exactly_is_refused_with_the_reason() -> None:
    model, x = _model(), _input()
    cg = fxmorph.analyze(model.train(), x)
    assert "training mode" in (cg.removal(_hidden(cg, "blocks.0.branch.0")).refused or "")
    cg = fxmorph.analyze(model.eval(), x)
    # the stem's channels are the stream: every block goes with them, and the head would compute the output alone
    assert "'head' would read no channels" in (cg.removal(_hidden(cg, "stem")).refused or "")
    assert "the model would return it" in (cg.removal(_hidden(cg, "stem")).refused or "")


def test_mobilenet_v2_loses_its_inverted_residuals_and_stays_a_mobilenet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 32, 32)
    cg = fxmorph.analyze(model, x)
    branches = [g.id for g in cg.groups if cg.removal(g.id).folds]
    assert len(branches) == 10  # one per block with a residual connection
    removal = combined(cg, branches)
    assert removal.possible and len(removal.folds) == 10
    plan = WidthPlan({g: GroupPlan(()) for g in branches})
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        small = fxmorph.resize(cg, plan)
    assert isinstance(small, torchvision.models.MobileNetV2)
    assert torch.allclose(run_double(small, x), masked_reference(cg, plan, x), atol=1e-8)
    assert sum(isinstance(m, Constant) for m in small.modules()) == 10
    assert fxmorph.count_params(small) < 0.7 * fxmorph.count_params(model)
    fxmorph.export_onnx(small, (x,), tmp_path / "small.onnx")  # checked against torch in onnxruntime
