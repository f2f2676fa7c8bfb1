"""Bad data and losses at shrink, grow and morph: non-finite importance, multi-input batches, failing losses.

One test (or parameter) per row marked ``data::`` in ``docs/bad_input.md``. Each error case asserts the specific
fxmorph exception, key words of its message (the cause and the fix), that fxmorph raised it, and that the user's
model is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph import BudgetError, FxmorphError, InputError
from fxmorph.passes import prune
from tests.conftest import MLP
from tests.test_bad_input import assert_error, assert_unchanged, snapshot

X = torch.randn(2, 8)


class TwoInputs(nn.Module):
    """``forward(x, y)``: batches are ``((x, y), targets)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x) + self.c(y)))


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(n)]


def nan_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target) * float("nan")


def raising_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    raise ZeroDivisionError("division by zero")


def _taylor(m: nn.Module, data: Any, loss: Any = F.cross_entropy) -> Any:
    return fxmorph.shrink(m, 0.5, (X,), criterion="taylor", data=data, loss_fn=loss, round_to=1)


def _grow(m: nn.Module, data: Any, loss: Any = F.cross_entropy) -> Any:
    return fxmorph.grow(m, (X,), budget_flops="150%", data=data, loss_fn=loss, round_to=1)


def _nan_in_batch_2() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = batches(3)
    data[1][0][0, 0] = float("nan")
    return data


def _inf_row() -> nn.Module:
    m = MLP()
    with torch.no_grad():
        m.fc1.weight[3] = float("inf")
    return m


def _frozen() -> nn.Module:
    return MLP().requires_grad_(False)


def run(call: Callable[[nn.Module], Any], make: Callable[[], nn.Module], error: type[FxmorphError],
        *words: str) -> None:  # fmt: skip
    torch.manual_seed(0)
    model = make()
    before = snapshot(model)
    assert_error(lambda: call(model), error, *words)
    assert_unchanged(model, before)


FLOAT_TARGETS = [(torch.randn(4, 8), torch.rand(4)) for _ in range(2)]
LOSSES: dict[str, tuple[Any, Callable[[], nn.Module], Any, tuple[str, ...]]] = {
    "float targets": (FLOAT_TARGETS, MLP, F.cross_entropy, ("loss_fn failed on the first batch", "long", "dtype")),
    "loss_fn of wrong arity": (None, MLP, lambda out: out.sum(), ("positional argument", "takes those two arguments")),
    "loss_fn that raises": (None, MLP, raising_loss, ("ZeroDivisionError", "loss_fn(model(*inputs), targets)")),
    "loss with no grad": (None, MLP, lambda o, t: F.cross_entropy(o, t).detach(), ("no grad", "not under")),
    "every parameter frozen": (None, _frozen, F.cross_entropy, ("requires grad", "requires_grad_(True)")),
    "NaN loss": (None, MLP, nan_loss, ("loss_fn returned nan", "finite")),
}


# -- shrink ---------------------------------------------------------------------------------------------------
def test_shrink_refuses_a_nan_loss_on_a_later_batch() -> None:
    """(fixed: NaN importance kept every channel: the unchanged model, 5,632 FLOPs against a 2,816 budget)."""
    run(lambda m: _taylor(m, _nan_in_batch_2()), MLP, InputError, "returned nan on batch 2", "check that batch")


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "random"])
def test_shrink_refuses_non_finite_weights(criterion: str) -> None:
    """(fixed: an inf weight row made l1 return the unchanged model above the budget)."""
    data = {"data": batches(), "loss_fn": F.cross_entropy} if criterion == "taylor" else {}
    call = lambda m: fxmorph.shrink(m, 0.5, (X,), criterion=criterion, **data)  # noqa: E731
    words = ("fc1.weight", "nan or infinite", "load finite weights") if criterion != "taylor" else ("finite",)
    run(call, _inf_row, InputError, *words)


NON_FINITE = [(float("nan"), torch.float32), (-float("inf"), torch.float32), (float("nan"), torch.bfloat16),
              (float("inf"), torch.float16)]  # fmt: skip


@pytest.mark.parametrize(("value", "dtype"), NON_FINITE)
def test_shrink_counts_each_kind_of_non_finite_weight(value: float, dtype: torch.dtype) -> None:
    """The check reads each weight's minimum and maximum (NaN in either where any value is NaN): NaN, -inf and
    low-precision weights are caught, and the message counts the bad values."""
    m = MLP().to(dtype)
    with torch.no_grad():
        m.fc2.weight[0, :3] = value
    # (not ``run``: NaN weights never compare equal, so "unchanged" cannot be checked by value)
    assert_error(lambda: fxmorph.shrink(m, 0.5, (X.to(dtype),)), InputError, "fc2.weight", "holds 3 nan or infinite")


def test_shrink_never_returns_a_model_above_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Postcondition: scores that choose nothing (NaN, as before the fix) raise instead of returning the model."""

    def nan_scores(cg: Any, *args: Any, **kwargs: Any) -> dict[int, np.ndarray]:
        return {g.id: np.full(g.size, np.nan) for g in cg.free_groups}

    monkeypatch.setattr(prune, "importance", nan_scores)
    run(lambda m: fxmorph.shrink(m, 0.5, (X,)), MLP, BudgetError, "did not meet the budget", "2,816")


@pytest.mark.parametrize("case", list(LOSSES))
def test_shrink_checks_the_loss_up_front(case: str) -> None:
    """(fixed: a PassError "pass 'prune' failed after ['remove-dead']: ..." without a fix)."""
    data, make, loss, words = LOSSES[case]
    run(lambda m: _taylor(m, data or batches(), loss), make, InputError, "shrink", *words)


def test_taylor_reads_multi_input_batches() -> None:
    """Supported: batches ((x, y), targets) for a two-input model (fixed: a PassError, missing argument 'y')."""
    torch.manual_seed(0)
    model, x = TwoInputs(), torch.randn(2, 8)
    data = [((torch.randn(4, 8), torch.randn(4, 8)), torch.randint(0, 4, (4,))) for _ in range(2)]
    before = snapshot(model)
    small, report = fxmorph.shrink(model, 0.5, (x, x), criterion="taylor", data=data, loss_fn=F.cross_entropy,
                                   round_to=1, return_report=True)  # fmt: skip
    assert report.flops_after <= report.budget_flops < report.flops_before
    assert small(x, x).shape == (2, 4)
    assert_unchanged(model, before)


def test_morph_reads_multi_input_batches() -> None:
    """Supported: morph's width step with Taylor importance (fixed: a PassError in the 'width' pass)."""
    torch.manual_seed(0)
    model, x = TwoInputs(), torch.randn(2, 8)
    data = [((torch.randn(4, 8), torch.randn(4, 8)), torch.randint(0, 4, (4,))) for _ in range(2)]
    before = snapshot(model)
    result, report = fxmorph.morph(model, 0.5, (x, x), data, F.cross_entropy, epochs=1, finetune_epochs=0,
                                   round_to=1, progress=False)  # fmt: skip
    assert report.flops_after <= report.budget_flops
    assert result(x, x).shape == (2, 4)
    assert_unchanged(model, before)


# -- grow -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(LOSSES))
def test_grow_checks_the_loss_up_front(case: str) -> None:
    """(fixed: a PassError from the grow pass without a fix)."""
    data, make, loss, words = LOSSES[case]
    run(lambda m: _grow(m, data or batches(), loss), make, InputError, "grow", *words)


def test_grow_refuses_non_finite_weights() -> None:
    run(lambda m: fxmorph.grow(m, (X,), budget_flops="150%"), _inf_row, InputError, "fc1.weight", "nan or infinite")
