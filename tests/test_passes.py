"""Pass infrastructure: names, contracts, checks after every pass, errors that name the pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx, nn

import fxmorph
from fxmorph.passes import PASSES, Pass, PassContext, PassResult, Pipeline, PrunePass, RemoveDeadPass
from tests.zoo import build, example_input


@dataclass(frozen=True)
class _BreakConv(Pass):
    """Replaces a convolution by one of the wrong width (a broken pass, for the test)."""

    name: ClassVar[str] = "break-conv"
    preserves_function: ClassVar[bool] = False

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        gm.get_submodule("layer1.0").conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        return PassResult(gm, True)


@dataclass(frozen=True)
class _ReturnsNothing(Pass):
    name: ClassVar[str] = "returns-nothing"
    preserves_function: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return None  # type: ignore[return-value]


def test_registry_has_kebab_case_names_and_docstrings() -> None:
    assert set(PASSES) == {"remove-dead", "prune", "width", "grow", "drop-inputs", "factorize", "merge-factors"}
    for name, cls in PASSES.items():
        assert name == name.lower() and " " not in name and "_" not in name
        assert cls.__doc__ and isinstance(cls.preserves_function, bool)


def test_passes_are_frozen_dataclasses() -> None:
    p = PrunePass(1000)
    with pytest.raises(AttributeError):
        p.budget_flops = 5  # type: ignore[misc]


def test_failing_check_names_the_pass_and_its_predecessors() -> None:
    model, x = build("resnet18"), example_input("resnet18")
    gm = fxmorph.trace(model, (x,))
    pipeline = Pipeline([RemoveDeadPass(), _BreakConv()])
    with pytest.raises(fxmorph.PassError, match=r"'break-conv' failed after \['remove-dead'\].*shape replay"):
        pipeline(gm, PassContext((x,)))
    assert isinstance(model.layer1[0].conv2, nn.Conv2d) and model.layer1[0].conv2.in_channels == 64


def test_pass_must_return_a_pass_result() -> None:
    gm = fxmorph.trace(build("resnet18"), (example_input("resnet18"),))
    with pytest.raises(fxmorph.PassError, match=r"returns-nothing.*PassResult"):
        Pipeline([_ReturnsNothing()])(gm, PassContext((example_input("resnet18"),)))


def test_pipeline_copies_once_and_records_each_pass() -> None:
    model, x = build("mobilenet_v3_small"), example_input("mobilenet_v3_small")
    gm = fxmorph.trace(model, (x,))
    budget = gm.meta["fxmorph.flops"] // 2
    result = Pipeline([RemoveDeadPass(), PrunePass(budget)])(gm, PassContext((x,)))
    assert [r["pass"] for r in result.records] == ["remove-dead", "prune"]
    assert result.records[1]["modified"] and not result.records[0]["modified"]
    assert result.gm.meta["fxmorph.flops"] <= budget
    assert all(p is not q for p in result.gm.parameters() for q in model.parameters())
    with torch.no_grad():
        assert result.gm(x).shape == model(x).shape
