"""Parameters used directly (``h @ self.w``, ``F.linear(h, self.w)``, ``self.w @ h``, a ViT's class token
and position embedding): shrink works, the result keeps every parameter a parameter, and the mask
oracle holds. Issue 18, item 1: surgery used to leave an empty *buffer* beside every rebuilt parameter
of the root module (GraphModule's deepcopy registers a plain stand-in tensor as a buffer), so
``named_buffers``, ``state_dict`` and the shrink report read a tensor of shape ``(0,)`` and the report
raised a raw ``IndexError``."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph.errors import FxmorphError, PassError
from fxmorph.passes.base import PassContext
from fxmorph.passes.prune import PrunePass
from fxmorph.testing import random_plan
from tests.conftest import check_prune

pytestmark = pytest.mark.usefixtures("one_thread")


class MatmulHead(nn.Module):
    """The issue's example: a parameter read on its first dim by ``h @ w``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 128)
        self.w3 = nn.Parameter(torch.randn(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.l1(x)) @ self.w3


class LinearHead(nn.Module):
    """``F.linear(h, w, b)`` with the parameters used directly."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 128)
        self.w = nn.Parameter(torch.randn(10, 128) / 10)
        self.b = nn.Parameter(torch.randn(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(self.l1(x)), self.w, self.b)


class LinearMaker(nn.Module):
    """A parameter that makes the channels on its first dim: ``F.linear(x, w1, b1)`` then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(128, 20) / 5)
        self.b1 = nn.Parameter(torch.randn(128))
        self.l2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.relu(F.linear(x, self.w1, self.b1)))


class LeftMatmul(nn.Module):
    """``self.w @ h`` on (N, C, L) features: the parameter makes channels on dim 0 and reads them on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(20, 128, 1)
        self.w = nn.Parameter(torch.randn(64, 128) / 10)
        self.c2 = nn.Conv1d(64, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.w @ F.relu(self.c(x))))


class NestedParams(nn.Module):
    """Direct parameters and buffers inside a plain container that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 128)
        self.head = nn.Module()
        self.head.w = nn.Parameter(torch.randn(128, 10))
        self.head.register_buffer("scale", torch.rand(128) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.relu(self.l1(x)) * self.head.scale) @ self.head.w


CASES = {
    "matmul_head": (MatmulHead, (2, 20)),
    "functional_linear_head": (LinearHead, (2, 20)),
    "functional_linear_maker": (LinearMaker, (2, 20)),
    "left_matmul": (LeftMatmul, (2, 20, 7)),
    "nested_params": (NestedParams, (2, 20)),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cls, shape = CASES[name]
    return cls().eval(), torch.randn(*shape)


def _assert_tensors_sound(original: nn.Module, small: nn.Module) -> None:
    """Every tensor the model had is still there, as the same kind, non-empty, under one name only."""
    for module in small.modules():
        assert not module._parameters.keys() & module._buffers.keys()
    params, buffers = dict(small.named_parameters()), dict(small.named_buffers())
    assert set(params) == {n for n, _ in original.named_parameters()}
    assert set(buffers) == {n for n, _ in original.named_buffers()}
    assert all(t.numel() > 0 for t in (*params.values(), *buffers.values()))
    assert small.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("name", list(CASES))
def test_shrink_with_parameters_used_directly(name: str, tmp_path: pathlib.Path) -> None:
    model, x = _build(name)
    small, report = fxmorph.shrink(model, 0.5, (x,), return_report=True)
    assert report.flops_after <= report.budget_flops < report.flops_before
    assert fxmorph.count_flops(small, (x,)) == report.flops_after
    _assert_tensors_sound(model, small)
    with torch.no_grad():
        assert small(torch.cat([x, x])).shape == model(torch.cat([x, x])).shape
    for row in report.groups:  # the report's widths are the model's
        assert row.after <= row.before
    assert sum(r.before - r.after for r in report.groups) > 0
    fxmorph.save(small, tmp_path / "small.pt")
    loaded = fxmorph.load(tmp_path / "small.pt", model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


@pytest.mark.parametrize("name", list(CASES))
def test_prune_of_direct_parameters_obeys_mask_oracle(name: str) -> None:
    model, x = _build(name)
    cg = fxmorph.analyze(model, (x,))
    result = PrunePass(fxmorph.CostModel(cg).flops() // 2, round_to=1)(cg.gm, PassContext((x,)))
    assert result.plan
    _assert_tensors_sound(model, check_prune(cg, result.plan, x))
    for seed in range(3):
        _assert_tensors_sound(model, check_prune(cg, random_plan(cg, seed), x))


def test_resize_keeps_root_parameters_parameters() -> None:
    model, x = _build("matmul_head")
    cg = fxmorph.analyze(model, (x,))
    small = fxmorph.resize(cg, random_plan(cg, 0))
    assert isinstance(small.w3, nn.Parameter) and small.w3.requires_grad
    assert dict(small.named_buffers()) == {}
    assert small.state_dict()["w3"].shape == small.w3.shape


def test_check_rejects_a_name_that_is_both_parameter_and_buffer() -> None:
    model = nn.Linear(4, 2)
    model._buffers["weight"] = torch.zeros(0)
    with pytest.raises(fxmorph.ConsistencyError, match="both a parameter and a buffer"):
        fxmorph.check(model, (torch.randn(1, 4),))


def test_report_failure_is_an_fxmorph_error_naming_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety net: whatever goes wrong while building the report surfaces as a PassError naming it."""
    import sys

    shrink_module = sys.modules["fxmorph.api.shrink"]

    def broken(*args: object) -> None:
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(shrink_module, "_rows", broken)
    model, x = _build("matmul_head")
    with pytest.raises(PassError, match="step 'report' failed after \\['remove-dead', 'prune'\\]") as info:
        fxmorph.shrink(model, 0.5, (x,))
    assert isinstance(info.value, FxmorphError) and isinstance(info.value.__cause__, IndexError)


def test_timm_vit_shrinks() -> None:
    """timm's ViTs keep their class token and position embedding on the root module (the issue's
    ``deit_tiny_patch16_224`` is the same VisionTransformer class). 32x32 pixels: four patches."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    small, report = fxmorph.shrink(model, 0.5, (x,), return_report=True)
    assert report.flops_after <= report.budget_flops
    _assert_tensors_sound(model, small)
    assert small.cls_token.shape[-1] == small.pos_embed.shape[-1] < model.cls_token.shape[-1]
    cg = fxmorph.analyze(model, (x,))
    check_prune(cg, random_plan(cg, 0), x)
