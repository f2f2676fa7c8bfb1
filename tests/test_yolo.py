"""Ultralytics YOLOv8 (built from its yaml: random weights, no download; ultralytics is a test-only dependency,
AGPL-3.0, which the package never imports). symbolic tracing cannot enter its detection head, so it is captured
by torch.export: it shrinks to half its FLOPs, comes back as its own ``DetectionModel`` with outputs of the same
structure and shapes, and the user's model is untouched (export runs the real forward, which caches anchors on
the head: they are put back)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

import fxmorph
from fxmorph.testing import random_plan
from tests.conftest import check_prune

ultralytics = pytest.importorskip("ultralytics")


@pytest.fixture(scope="module")
def yolo() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ultralytics.YOLO("yolov8n.yaml").model.eval(), torch.randn(1, 3, 64, 64)


def _shapes(out: object) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_flatten(out)[0]]


def test_yolov8_shrinks_to_half_and_comes_back_as_its_class(yolo: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = fxmorph.shrink(model, "50%", (x,), return_report=True)
    assert report.capture == "export"
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    with torch.no_grad():
        assert _shapes(small(x)) == _shapes(model(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the head's cached anchors are the user's own again, not the fake tensors export ran on
    head = model.model[-1]
    assert all(type(v) is torch.Tensor for v in vars(head).values() if isinstance(v, torch.Tensor))


def test_yolov8_obeys_the_mask_oracle(yolo: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    cg = fxmorph.analyze(model, (x,))
    assert fxmorph.CostModel(cg).prunable_share() > 0.99
    check_prune(cg, random_plan(cg, seed=0), x)
