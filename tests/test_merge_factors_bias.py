"""Regression: merge-factors dropped the bias remove-dead folds into a first factor (found in review for
issue 14). ``split_layers`` builds the first factor without a bias; remove-dead removes constant channels
read by it and folds their value into a bias it adds; merging the pair back must keep that bias."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_trees
from torch import nn

from fxmorph.capture.trace import trace
from fxmorph.passes import FactorizePass, MergeFactorsPass, PassContext, Pipeline, RemoveDeadPass


def _model(conv: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if conv:
        # no padding on the factorized layer: a padded one keeps constant channels (a fold there is not exact)
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3)]
        x = torch.randn(2, 3, 6, 6)
    else:
        layers = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)]
        x = torch.randn(5, 6)
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():  # three constant channels (gamma 0, beta 0.7): remove-dead folds them into "3.0"
        model[1].weight[:3] = 0
        model[1].bias[:3] = 0.7
        model[1].running_var.uniform_(0.5, 2)
    return model, x


@pytest.mark.parametrize("conv", [False, True])
def test_merge_keeps_the_bias_folded_into_the_first_factor(conv: bool) -> None:
    model, x = _model(conv)
    ctx = PassContext((x,))
    gm = Pipeline([FactorizePass(("3",)), RemoveDeadPass()])(trace(model, (x,)), ctx).gm
    assert "3.0.bias" in dict(gm.named_parameters()), "remove-dead folds the constant channels into the factor"
    merged = MergeFactorsPass().call(gm, ctx).gm
    assert "3.bias" in dict(merged.named_parameters()) and "3.0.weight" not in dict(merged.named_parameters())
    with torch.no_grad():
        assert_close_trees(merged(x), model(x), rtol=1e-5, what="merged factors")
