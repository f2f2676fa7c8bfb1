"""The torchvision model zoo as fxmorph's tests see it: names, small inputs and constructor options."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models

__all__ = ["CLASSIFICATION", "HUGE", "SEGMENTATION", "VIDEO", "build", "example_input"]

CLASSIFICATION = sorted(list_models(module=torchvision.models))
VIDEO = sorted(list_models(module=torchvision.models.video))
SEGMENTATION = sorted(list_models(module=torchvision.models.segmentation))

# Models whose float64 oracle copies need many GiB; they run under the `slow` marker only.
HUGE = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf"}

_IMAGE = {"inception_v3": 96, "maxvit_t": 224, "googlenet": 64}
_VIT_IMAGE = 64
_VIDEO_SHAPE = {
    "mvit_v1_b": (1, 3, 16, 224, 224),
    "mvit_v2_s": (1, 3, 16, 224, 224),
    "s3d": (1, 3, 16, 224, 224),
    "swin3d_t": (1, 3, 4, 64, 64),
    "swin3d_s": (1, 3, 4, 64, 64),
    "swin3d_b": (1, 3, 4, 64, 64),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` with random weights (``weights=None``), in eval mode.

    Linear layers that torchvision initialises to all zeros (ViT's classifier head) get small random
    weights: a zero head makes every output 0 whatever the trunk computes, and every comparison of
    outputs vacuous."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"weights": None}
    if name in SEGMENTATION:
        kwargs["weights_backbone"] = None
    if name.startswith("vit_"):
        kwargs["image_size"] = 56 if name == "vit_h_14" else _VIT_IMAGE
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    model = get_model(name, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02)
    return model


def example_input(name: str, batch: int = 1) -> torch.Tensor:
    """A small input that the architecture of ``name`` accepts."""
    generator = torch.Generator().manual_seed(1)
    if name in VIDEO:
        shape = _VIDEO_SHAPE.get(name, (1, 3, 4, 32, 32))
        return torch.randn((batch, *shape[1:]), generator=generator)
    size = _IMAGE.get(name, 56 if name == "vit_h_14" else 64)
    return torch.randn(batch, 3, size, size, generator=generator)
