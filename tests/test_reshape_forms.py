"""Regression (found in review for issue 14): a constant channel size given to ``torch.reshape`` (the
function form) or by keyword was never rewritten, so resizing gave a graph that failed on its first run.
Every form of a reshape is now rewritten; the mask oracle checks the result."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import check_prune
from torch import nn

import fxmorph
from fxmorph import GroupPlan, WidthPlan

FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torch.reshape": lambda y: torch.reshape(y, (y.shape[0], 8, 1)),
    "torch.reshape(shape=)": lambda y: torch.reshape(y, shape=(y.shape[0], 8, 1)),
    "x.reshape(*sizes)": lambda y: y.reshape(y.shape[0], 8, 1),
    "x.view([sizes])": lambda y: y.view([y.shape[0], 8, 1]),
    "x.view(size=)": lambda y: y.view(size=(y.shape[0], 8, 1)),
}


class _Reshaped(nn.Module):
    def __init__(self, form: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b, self.form = nn.Linear(4, 8), nn.Linear(8, 3), form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.form(torch.relu(self.a(x))).squeeze(-1))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_constant_channel_size_of_every_reshape_form_is_rewritten(form: str) -> None:
    torch.manual_seed(0)
    model, x = _Reshaped(FORMS[form]).eval(), torch.randn(2, 4)
    cg = fxmorph.analyze(model, (x,))
    (group,) = [g for g in cg.groups if g.size == 8]
    assert not group.pins, f"{form}: {group.pins}"
    check_prune(cg, WidthPlan({group.id: GroupPlan((0, 2, 5, 7))}), x)
