"""Typed contracts at the API and the pass pipeline: options objects validated once, ``Pass.requires``,
the Pipeline's equivalence check after passes that promise the function, and typed pass records."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx

import fxmorph
from fxmorph.api.options import GrowOptions, MorphOptions, ShrinkOptions
from fxmorph.errors import BudgetError, InputError, PassError
from fxmorph.passes import GrowPass, Pass, PassContext, PassRecord, PassResult, Pipeline, PrunePass, WidthPass
from fxmorph.passes.base import equivalence_bound, precision_bound
from tests.conftest import SmallNet

X = torch.randn(2, 3, 8, 8)


def _traced() -> tuple[fx.GraphModule, PassContext]:
    torch.manual_seed(0)
    return fxmorph.trace(SmallNet().eval(), (X,)), PassContext((X,))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(2)]


# -- options objects ----------------------------------------------------------------------------------------
def test_options_are_frozen_and_normalised() -> None:
    options = ShrinkOptions(budget_flops=0.5, protect=["conv"], seed=np.int64(3), factorize=["fc"])
    assert options.protect == ("conv",) and options.factorize == ("fc",)
    assert options.seed == 3 and type(options.seed) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.criterion = "l2"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"criterion": "magic"}, "unknown criterion 'magic'"),
        ({"strategy": "magic"}, "unknown strategy"),
        ({"round_to": True}, "round_to=True"),
        ({"min_width": -1}, "min_width must be a non-negative integer"),
        ({"max_prune": "0.5"}, "max_prune"),
        ({"loss_fn": "ce"}, "loss_fn must be callable"),
        ({"param_cost": -1.0}, "param_cost"),
        ({"criterion": "taylor"}, "criterion='taylor' needs data and loss_fn"),
        ({"calibrate": True}, "calibrate=True needs data"),
        ({"protect": "conv"}, "protect=['conv']"),
        ({"seed": 2**70}, "2**63 - 1"),
    ],
)
def test_shrink_options_refuse_bad_values_as_shrink_does(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InputError) as info:
        ShrinkOptions(budget_flops=0.5, **kwargs)
    assert words in str(info.value)
    with pytest.raises(InputError) as again:  # the entry point says the same, before tracing
        fxmorph.shrink("not even a model", 0.5, (X,), **kwargs)  # type: ignore[arg-type]
    assert str(again.value) == str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"channels": 2, "init": "kaiming"}, "unknown init"),
        ({"channels": 2, "init": "gradmax"}, "needs data"),
        ({"channels": 2, "data": [1]}, "data needs loss_fn"),
        ({"channels": 2, "rank": 0}, "rank must be a positive int"),
        ({"channels": 2, "max_factor": 1.0}, "max_factor"),
        ({}, "exactly one of budget_flops and channels"),
        ({"channels": 2, "budget_flops": "150%"}, "exactly one"),
    ],
)
def test_grow_options_refuse_bad_values(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InputError, match=words):
        GrowOptions(**kwargs)


def test_morph_options_resolve_the_criterion_and_check_the_data() -> None:
    data = _batches()
    assert MorphOptions(budget_flops=0.5, data=data, loss_fn=F.cross_entropy).criterion == "taylor"
    assert MorphOptions(budget_flops=0.5, data=data, step_fn=lambda m, b: m(b[0]).sum()).criterion == "l1"
    with pytest.raises(InputError, match="one-shot iterator"):
        MorphOptions(budget_flops=0.5, data=iter(data), loss_fn=F.cross_entropy)
    with pytest.raises(InputError, match="lr must be a positive finite"):
        MorphOptions(budget_flops=0.5, data=data, loss_fn=F.cross_entropy, lr=float("nan"))
    step = MorphOptions(budget_flops=0.5, data=data, loss_fn=F.cross_entropy, round_to=4).width_step(1000, ())
    assert (step.strategy, step.criterion, step.round_to, step.budget_flops) == ("width", "taylor", 4, 1000)


def test_settings_of_the_report_come_from_the_options() -> None:
    small, report = fxmorph.shrink(SmallNet().eval(), 0.5, (X,), criterion="l2", round_to=4, return_report=True)
    options = ShrinkOptions(budget_flops=0.5, criterion="l2", round_to=4)
    assert report.settings == options.settings(report.settings["rounding"])
    assert report.settings["criterion"] == "l2" and fxmorph.metadata(small)["fxmorph.flops"] <= report.budget_flops


# -- Pass.requires --------------------------------------------------------------------------------------------
def test_requires_runs_before_the_pass_and_names_it() -> None:
    gm, ctx = _traced()
    with pytest.raises(PassError, match=r"pass 'prune' cannot run after \[\]: criterion='taylor' needs data") as info:
        Pipeline([PrunePass(1000, criterion="taylor")])(gm, ctx)
    assert isinstance(info.value.__cause__, InputError)
    with pytest.raises(InputError, match="protect names 'conv3'"):  # called directly, a pass checks too
        PrunePass(1000, protect=("conv3",))(gm, ctx)


def test_grow_requires_a_budget_it_can_reach() -> None:
    gm, ctx = _traced()
    flops = gm.meta["fxmorph.flops"]
    with pytest.raises(PassError, match=r"grow.*above the model's current") as info:
        Pipeline([GrowPass(flops // 2)])(gm, ctx)
    assert isinstance(info.value.__cause__, BudgetError)
    with pytest.raises(BudgetError, match="max_factor"):
        GrowPass(100 * flops)(gm, ctx)
    with pytest.raises(InputError, match="needs data"):
        GrowPass(2 * flops, init="gradmax")(gm, ctx)
    with pytest.raises(BudgetError, match="strategy='width' can reach"):
        WidthPass(100 * flops)(gm, ctx)


# -- the Pipeline's equivalence check -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Nudge(Pass):
    """Claims to keep the function, but scales the last layer's weight (a deliberately wrong pass)."""

    name: ClassVar[str] = "nudge"
    preserves_function: ClassVar[bool] = True
    factor: float = 1.01

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        out = copy.deepcopy(gm)
        with torch.no_grad():
            out.fc.weight.mul_(self.factor)
        return PassResult(out, True)


@dataclass(frozen=True)
class _InPlace(_Nudge):
    """Claims to keep the function and writes to the model it received (breaks the contract)."""

    name: ClassVar[str] = "in-place"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, True)


@dataclass(frozen=True)
class _Counted(_Nudge):
    """An exact copy that promises the function; records every forward of the models it returns."""

    name: ClassVar[str] = "counted"
    calls: list[fx.GraphModule] = dataclasses.field(default_factory=list)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        out = copy.deepcopy(gm)
        out._forward_hooks.clear()  # the copy of the previous copy carries its hook along
        out.register_forward_hook(lambda module, *_: self.calls.append(module))
        return PassResult(out, True)


def test_pipeline_catches_a_pass_that_breaks_its_promise() -> None:
    gm, ctx = _traced()
    with pytest.raises(PassError, match=r"pass 'nudge' failed after \['prune'\]: it promises.*changed by"):
        Pipeline([PrunePass(gm.meta["fxmorph.flops"] * 2), _Nudge()])(gm, ctx)
    with pytest.raises(PassError, match="in place"):
        Pipeline([_InPlace()])(gm, ctx)
    result = Pipeline([_Nudge()], check_function=False)(gm, ctx)  # the check can be switched off, explicitly
    assert result.records[0].difference is None


def test_pipeline_accepts_rounding_and_compares_each_model_once() -> None:
    gm, ctx = _traced()
    tiny = _Nudge(factor=1 + 1e-6)  # float32 rounding-sized: within the bound
    counted = _Counted()
    result = Pipeline([tiny, counted, counted])(gm, ctx)
    assert [r.name for r in result.records] == ["nudge", "counted", "counted"]
    assert 0 < result.records[0].difference <= equivalence_bound(torch.float32)
    assert result.records[1].difference == result.records[2].difference == 0.0
    # each model ran once: the outputs of the first copy, compared after its pass, are the reference of
    # the next comparison (not computed again)
    assert len(counted.calls) == 2 and counted.calls[0] is not counted.calls[1]


def test_promises_narrow_to_the_condition_a_pass_knows() -> None:
    gm, ctx = _traced()
    flops = gm.meta["fxmorph.flops"]
    assert WidthPass(2 * flops).promises_function(gm, ctx)  # growing keeps the function
    assert not WidthPass(flops // 2).promises_function(gm, ctx)
    grown = Pipeline([WidthPass(2 * flops, round_to=1)])(gm, ctx)
    assert grown.records[0].difference is not None and grown.records[0].difference <= 1e-4


def test_bounds_follow_the_dtype() -> None:
    assert equivalence_bound(torch.float64) < equivalence_bound(torch.float32) == 1e-4
    assert equivalence_bound(torch.float32) < equivalence_bound(torch.float16) < equivalence_bound(torch.bfloat16)
    assert equivalence_bound(torch.bfloat16) == 16 * torch.finfo(torch.bfloat16).eps
    model = SmallNet()
    assert precision_bound(model) == ("float32", 1e-4)
    assert precision_bound(model.half()) == ("float16", equivalence_bound(torch.float16))
    assert precision_bound(model.float(), [torch.zeros(1, dtype=torch.bfloat16)])[0] == "bfloat16"  # outputs count


# -- pass records -------------------------------------------------------------------------------------------------
def test_pass_records_are_typed_and_read_as_before() -> None:
    gm, ctx = _traced()
    budget = gm.meta["fxmorph.flops"] // 2
    record = Pipeline([PrunePass(budget, round_to=4)])(gm, ctx).records[0]
    assert isinstance(record, PassRecord) and record.name == record["pass"] == "prune"
    assert record.modified and record["kept"] == record.kept and record.get("nothing") is None
    assert record.flops_before == gm.meta["fxmorph.flops"] and record.flops_after <= budget
    assert record.params_after < record.params_before
    as_dict = record.to_dict()
    assert as_dict["pass"] == "prune" and "name" not in as_dict
    _, report = fxmorph.shrink(SmallNet().eval(), 0.5, (X,), round_to=4, return_report=True)
    assert [p["pass"] for p in report.to_dict()["passes"]] == ["remove-dead", "prune"]
