"""A sample of timm architectures as fxmorph's tests see them: names, small inputs, constructor options.

Mirrors :mod:`tests.zoo` (torchvision). Every model is built by ``timm.create_model(name,
pretrained=False)`` with random weights, in eval mode, at a small input its architecture takes: 32 x 32
for convolutional nets (their last feature map is 1 x 1), ``img_size=64`` for attention models where
timm lets them change it, so tests stay fast on two cores (float64 depthwise convolutions, which the
mask oracle runs, are slow on CPUs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EXCEPTIONS", "FAST", "KNOWN_FALLBACKS", "MODELS", "TARGET", "UNTRACEABLE", "build", "example_input"]

# name -> (input side, extra create_model options). Diverse on purpose: norm-activation layers
# (BatchNormAct2d, GroupNormAct), LayerNorm2d, SE / ECA / CBAM gates, grouped and depthwise convs,
# dense and dual-path concatenation, re-parameterisable blocks, NF (weight-standardised) convs,
# multi-resolution fusion, ViTs, window attention, MLP-Mixers, hybrid conv-attention nets.
MODELS: dict[str, tuple[int, dict[str, Any]]] = {
    "resnet18": (32, {}),
    "resnet50d": (32, {}),
    "resnext26ts": (32, {}),
    "res2net50_26w_4s": (32, {}),
    "sebotnet33ts_256": (64, {"img_size": 64}),
    "gernet_s": (32, {}),
    "repvgg_a0": (32, {}),
    "cspdarknet53": (32, {}),
    "dla34": (32, {}),
    "dpn68": (32, {}),
    "densenet121": (32, {}),
    "hrnet_w18_small": (32, {}),
    "selecsls42b": (32, {}),
    "xception41": (32, {}),
    "inception_v3": (96, {}),
    "regnety_002": (32, {}),
    "nfnet_l0": (32, {}),
    "efficientnet_b0": (32, {}),
    "tf_efficientnet_cc_b0_4e": (32, {}),  # CondConv: expert kernels mixed per sample, a grouped conv over the batch
    "bat_resnext26ts": (256, {}),  # an attention matrix multiplied into the spatial dims; needs 256 px
    "tinynet_a": (32, {}),
    "mobilenetv3_large_100": (32, {}),
    "mobilenetv4_conv_small": (32, {}),
    "mnasnet_100": (32, {}),
    "semnasnet_100": (32, {}),
    "fbnetc_100": (32, {}),
    "hardcorenas_a": (32, {}),
    "lcnet_050": (32, {}),
    "ghostnet_100": (32, {}),
    "rexnet_100": (32, {}),
    "mobileone_s0": (32, {}),
    "convnext_atto": (32, {}),
    "convnext_nano": (32, {}),
    "edgenext_xx_small": (32, {}),
    "poolformer_s12": (32, {}),
    "fastvit_t8": (32, {}),
    "efficientvit_b0": (32, {}),
    "mobilevit_xxs": (32, {}),
    "vit_tiny_patch16_224": (64, {"img_size": 64}),
    "deit_tiny_patch16_224": (64, {"img_size": 64}),
    "cait_xxs24_224": (64, {"img_size": 64}),
    "pit_ti_224": (64, {"img_size": 64}),
    "levit_128s": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 2}),
    "mixer_b16_224": (64, {"img_size": 64}),
    "resmlp_12_224": (64, {"img_size": 64}),
    "gmlp_ti16_224": (64, {"img_size": 64}),
    "coatnet_0_rw_224": (64, {"img_size": 64}),
    "maxvit_tiny_rw_224": (64, {"img_size": 64}),
    "efficientformer_l1": (224, {}),  # its last stage's attention bias is sized for 7 x 7 tokens
    "dm_nfnet_f0": (32, {}),
    "tf_efficientnetv2_b0": (32, {}),
}

# Models torch.fx cannot trace, refused with fxmorph's TraceError naming the line: TF-style "same" padding
# computed from the input size in Python (timm.layers.padding.pad_same), and forwards that branch on
# a tensor's device or size (EfficientViT's attention, MobileViT's patch resize).
UNTRACEABLE = (
    "dm_nfnet_f0", "tf_efficientnetv2_b0", "efficientvit_b0", "mobilevit_xxs", "tf_efficientnet_cc_b0_4e",
    "bat_resnext26ts",
)  # fmt: skip

# The least share of FLOPs in free groups, for every traced model but the exceptions below.
TARGET = 0.95
# model -> (lower bound on its prunable share, why the architecture allows no more)
EXCEPTIONS: dict[str, tuple[float, str]] = {
    "nfnet_l0": (0.10, "weight standardisation (ScaledStdConv2d) normalises each filter over its input channels "
                 "and kernel with statistics computed in the graph, from a reshape that merges channels with "
                 "kernel dims; no rule relates those statistics to the channels yet (removing an input channel "
                 "changes every weight), so the channels the convolutions read are pinned"),
    "edgenext_xx_small": (0.75, "cross-covariance attention (XCA) takes its softmax over channels, and its "
                          "split blocks chunk widths unevenly: those channels are pinned"),
}  # fmt: skip

# Models that shrink to half their FLOPs but come back as a torch.fx.GraphModule (with a WriteBackWarning), not
# as their own class, for a reason that is a gap in fxmorph: name -> the reason. Remove an entry once fixed.
KNOWN_FALLBACKS: dict[str, str] = {}
"""Models of the sample that shrink but come back as a GraphModule, with why (none now)."""

# The part of the sample the default (not ``-m slow``) test run covers: quick, and between them the
# layers the rules for functional forms were written for (BatchNormAct2d after depthwise, grouped and
# squeeze-excite convolutions, LayerNorm2d through F.layer_norm, hard-swish, attention).
FAST = ("resnext26ts", "regnety_002", "convnext_atto", "lcnet_050", "vit_tiny_patch16_224")


def build(name: str, seed: int = 0) -> nn.Module:
    """The timm model ``name`` with random weights, in eval mode.

    Linear layers that timm initialises to all zeros (some classifier heads) get small random weights:
    a zero head makes every output 0 whatever the trunk computes, and every comparison vacuous.
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **MODELS[name][1]).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02)
    return model


def example_input(name: str, batch: int = 1) -> torch.Tensor:
    """A small input that the architecture of ``name`` accepts."""
    side = MODELS[name][0]
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, side, side, generator=generator)
