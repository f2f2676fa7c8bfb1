"""A sample of timm architectures: analysed, bounded prunable share, mask oracle, shrinking (issue 18).

For every model of :mod:`tests.timm_zoo` (random weights, small inputs): the share of its FLOPs in ops
that touch a free group is at least 95%, or at least the bound of its entry in ``EXCEPTIONS``, whose
reason says why the architecture does not allow more; a random keep-set of 30 to 70% of every free
group passes ``check`` and matches the mask oracle in float64. Models torch.fx cannot trace are refused
with fxmorph's :class:`~fxmorph.TraceError`. The quick part of the sample runs by default; the rest
under ``-m slow``. Named regressions: models timm builds on norm-activation layers (which call
``F.batch_norm``) had every group pinned and could not shrink at all.
"""

from __future__ import annotations

import pytest
import torch

import fxmorph
from fxmorph.testing import random_plan
from tests.conftest import check_prune

pytest.importorskip("timm")

from tests.timm_zoo import EXCEPTIONS, FAST, MODELS, TARGET, UNTRACEABLE, build, example_input

TRACEABLE = [n for n in MODELS if n not in UNTRACEABLE]


def _params(names: list[str]) -> list:
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(TRACEABLE))
def test_timm_model(name: str) -> None:
    model, x = build(name), example_input(name)
    cg = fxmorph.analyze(model, (x,))
    share = fxmorph.CostModel(cg).prunable_share()
    bound = EXCEPTIONS.get(name, (TARGET, ""))[0]
    assert share >= bound, f"{name}: prunable share {share:.1%} < {bound:.0%}\n{cg.explain()}"
    check_prune(cg, random_plan(cg, seed=7), x)


@pytest.mark.parametrize(
    "name", [n if k >= 2 else pytest.param(n, marks=pytest.mark.slow) for k, n in enumerate(UNTRACEABLE)]
)
def test_untraceable_timm_model_is_refused_with_the_line_and_exported_instead(name: str) -> None:
    model, x = build(name), example_input(name)
    with pytest.raises(fxmorph.TraceError, match="offending line"):
        fxmorph.analyze(model, (x,), capture="fx")
    cg = fxmorph.analyze(model, (x,))  # capture="auto": torch.export where symbolic tracing fails
    assert cg.gm.meta["fxmorph.capture"] == "export"
    assert cg.free_groups, f"{name}: nothing free once exported\n{cg.explain()}"


def test_exceptions_are_real() -> None:
    """Every explained exception names a model of the sample that torch.fx traces."""
    assert set(EXCEPTIONS) <= set(TRACEABLE)


_SHRINK = [
    "efficientnet_b0",
    "densenet121",
    *(pytest.param(n, marks=pytest.mark.slow) for n in ("resnext26ts", "repvgg_a0")),
]


@pytest.mark.parametrize("name", _SHRINK)
def test_timm_norm_act_model_shrinks_to_half(name: str) -> None:
    """Regression: timm's BatchNormAct2d calls F.batch_norm, which had no rule, so every group it
    touched was pinned (efficientnet_b0: 16 free groups of 262; densenet121, resnext26ts, repvgg_a0:
    none) and shrink(model, 0.5) raised BudgetError."""
    model, x = build(name), example_input(name)
    small = fxmorph.shrink(model, 0.5, (x,))
    report = fxmorph.metadata(small)["fxmorph.report"]
    assert report.flops_after <= 0.5 * report.flops_before
    with torch.no_grad():
        assert small(x).shape == model(x).shape
