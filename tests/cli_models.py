"""Model factories the command-line tests name as ``cli_models:FACTORY`` (tests/ is put on PYTHONPATH)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class SmallNet(nn.Module):
    """A small CNN with a residual add, a concatenation, a depthwise convolution and flatten -> linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.left = nn.Conv2d(32, 24, 1)
        self.right = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 16, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(40 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(torch.flatten(self.pool(x), 1))


def small_net() -> nn.Module:
    """The factory the CLI tests shrink."""
    return SmallNet()


def vit_b_16_64() -> nn.Module:
    """torchvision's ViT-B/16 for 64x64 images (the default needs 224x224)."""
    return torchvision.models.vit_b_16(weights=None, image_size=64)


class _Untraceable(nn.Module):
    """Runs in eager mode but branches on tensor values, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y.relu()
        return y


def untraceable() -> nn.Module:
    """A model fxmorph fails on after every input check passed (exit code 1)."""
    return _Untraceable()


def not_a_module() -> int:
    """A factory that returns something other than a module."""
    return 42
