"""The 12 torchvision detection models, whole (random weights, no download). No capture takes a detector whole
(Python loops over its images, non-maximum suppression), so it is captured in regions: its backbone with the
FPN, its heads' convolutions, the box head. Each shrinks to half the FLOPs of its whole forward, comes back as
its own class with eval outputs of the same structure, and its regions obey the mask oracle.

The detectors run at 128 pixels on few proposals, so the suite stays quick; the default run covers the lightest,
``-m slow`` the other eleven.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
import torchvision.models.detection as detection
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fxmorph
from fxmorph.meta import FLOPS_KEY, REGIONS_KEY
from fxmorph.testing import masked_reference, random_plan, run_double
from tests.conftest import assert_close_trees

_RCNN = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 8}
_DENSE = {"detections_per_img": 8, "topk_candidates": 40}
_SMALL = {"min_size": 128, "max_size": 128}

# name -> builder options: small images, few proposals and detections, and every score kept so that each head
# runs on some boxes (random weights score low)
DETECTORS: dict[str, dict[str, Any]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {**_RCNN, "box_score_thresh": 0.0},
    "fasterrcnn_mobilenet_v3_large_fpn": {**_RCNN, **_SMALL, "box_score_thresh": 0.0},
    "fasterrcnn_resnet50_fpn": {**_RCNN, **_SMALL, "box_score_thresh": 0.0},
    "fasterrcnn_resnet50_fpn_v2": {**_RCNN, **_SMALL, "box_score_thresh": 0.0},
    "maskrcnn_resnet50_fpn": {**_RCNN, **_SMALL, "box_score_thresh": 0.0},
    "maskrcnn_resnet50_fpn_v2": {**_RCNN, **_SMALL, "box_score_thresh": 0.0},
    "keypointrcnn_resnet50_fpn": {**_RCNN, **_SMALL, "box_score_thresh": 0.0},
    "retinanet_resnet50_fpn": {**_DENSE, **_SMALL, "score_thresh": 0.0},
    "retinanet_resnet50_fpn_v2": {**_DENSE, **_SMALL, "score_thresh": 0.0},
    "fcos_resnet50_fpn": {**_DENSE, **_SMALL, "score_thresh": 0.0},
    "ssd300_vgg16": {**_DENSE, "score_thresh": 0.0},
    "ssdlite320_mobilenet_v3_large": {**_DENSE, "score_thresh": 0.0},
}
FAST = ("fasterrcnn_mobilenet_v3_large_320_fpn",)
CASES = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in DETECTORS]


def build(name: str) -> nn.Module:
    """The detector in eval mode, its normalisation statistics not the identity (as trained ones are not)."""
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=5, **DETECTORS[name])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images() -> list[torch.Tensor]:
    return [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]


def _structure(out: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Each output's place and its shape but the first dim (how many boxes, which depends on the scores)."""
    leaves = pytree.tree_flatten_with_path(out)[0]
    return [(pytree.keystr(path), tuple(v.shape[1:])) for path, v in leaves]


@pytest.mark.parametrize("name", CASES)
def test_detector_shrinks_in_regions_to_half_as_its_class(name: str) -> None:
    model, images = build(name), _images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = fxmorph.shrink(model, 0.5, (images,), return_report=True)
    assert report.capture == "regions" and type(small) is type(model), report.delivery
    # the budget counts the whole forward; the regions meet what the code outside them leaves
    record = fxmorph.metadata(small)[REGIONS_KEY]
    assert report.flops_before == record.total_flops
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert fxmorph.metadata(small)[FLOPS_KEY] <= report.budget_flops - record.opaque_flops
    assert "backbone" in [r.path for r in record.regions]
    with torch.no_grad():
        assert _structure(small(images)) == _structure(model(images))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", CASES)
def test_detector_regions_obey_the_mask_oracle(name: str) -> None:
    model = build(name)
    cg = fxmorph.analyze(model, (_images(),), capture="regions")
    inputs = cg.gm.meta[REGIONS_KEY].inputs
    plan = random_plan(cg, seed=0)
    small = fxmorph.resize(cg, plan, keep_class=False)
    fxmorph.check(small, inputs)  # replays shapes, compares the interface, records the counted FLOPs
    assert small.meta[FLOPS_KEY] == fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    # the bundle's outputs are every region's outputs: the oracle holds for each region
    assert_close_trees(run_double(small, *inputs), masked_reference(cg, plan, *inputs), 1e-7, what="mask oracle")


def test_pretrained_style_frozen_batch_norm_is_written_back() -> None:
    """Detectors built with pretrained backbones use FrozenBatchNorm2d, whose forward reads its buffers itself:
    they are traced at their paths, so the shrunk class computes from its own, sliced buffers."""
    from torchvision.models import resnet18

    model = resnet18(norm_layer=FrozenBatchNorm2d).eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    small = fxmorph.shrink(model, 0.5, (torch.randn(1, 3, 32, 32),), keep_class=True)
    assert type(small) is type(model) and small.fc.in_features < 512
    for m in small.modules():
        if isinstance(m, FrozenBatchNorm2d):
            assert len({t.shape[0] for t in (m.weight, m.bias, m.running_mean, m.running_var)}) == 1
