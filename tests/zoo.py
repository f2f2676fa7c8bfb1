"""The torchvision model zoo as fxmorph's tests see it: names, small inputs and constructor options."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models

__all__ = ["CLASSIFICATION", "HUGE", "REPRESENTATIVE", "SEGMENTATION", "VIDEO", "build", "example_input", "zoo_params"]

CLASSIFICATION = sorted(list_models(module=torchvision.models))
VIDEO = sorted(list_models(module=torchvision.models.video))
SEGMENTATION = sorted(list_models(module=torchvision.models.segmentation))

# Models whose float64 oracle copies need many GiB; they run under the `slow` marker only.
HUGE = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf"}

# One model per architecture family, the smallest: the part of the zoo that the default run sweeps. The
# other members of a family stack the same blocks at other depths, widths or group counts (ResNet-34/101/152,
# EfficientNet-B1 to B7, VGG-13/16/19, the larger RegNets, Swins and ConvNeXts): they repeat the same
# channel rules on more layers, so they run under ``-m slow`` only. MViT at its 16 x 224 x 224 input is
# covered by small MViTs built from torchvision's own classes in ``test_attention_rules.py``.
REPRESENTATIVE = frozenset({
    # classification
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0",
    "swin_t", "swin_v2_t", "vgg11", "vgg11_bn", "vit_b_16",
    # video: 3D, (2+1)D and mixed convolutions, separable inception, windowed attention
    "mc3_18", "r2plus1d_18", "r3d_18", "s3d", "swin3d_t",
    # segmentation: dilated ResNet and MobileNetV3 backbones, ASPP, FCN and LR-ASPP heads
    "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large",
})  # fmt: skip

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


def zoo_params(names: list[str]) -> list:
    """``names`` as pytest parameters: those outside :data:`REPRESENTATIVE` (and the huge ones) marked slow."""
    return [n if n in REPRESENTATIVE and n not in HUGE else pytest.param(n, marks=pytest.mark.slow) for n in names]


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
