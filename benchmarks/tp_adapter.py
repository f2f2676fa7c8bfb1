"""Torch-Pruning as the baseline: magnitude pruning with one uniform ratio, matched to a FLOPs target.

Torch-Pruning (``pip install --no-deps torch-pruning``, so the torch version stays as it is) is an
optional benchmark dependency. Settings follow its own examples and tests: ``MagnitudePruner`` with
``MagnitudeImportance(p=2)`` (its default), the classifier left alone, one ratio for every layer;
for torchvision's ViT ``round_to`` is a multiple of the 12 heads and ``hidden_dim`` is patched by hand
afterwards, exactly as Torch-Pruning's tests do (it does not rewrite static attributes itself).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

import fxmorph

logger = logging.getLogger("benchmarks.tp")


def available() -> bool:
    """True when torch_pruning can be imported."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def _classifiers(model: nn.Module, out_features: int) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == out_features] + [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == out_features
    ]


def prune(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None) -> nn.Module:
    """A pruned deep copy of ``model`` (Torch-Pruning, uniform ``ratio`` of channels removed)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        out_features = model(x).shape[-1]
    kwargs: dict = {}
    vit = hasattr(model, "encoder") and hasattr(model, "conv_proj")
    if vit:
        heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        kwargs["num_heads"] = heads
        round_to = math.lcm(round_to or 1, 12)
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=_classifiers(model, out_features), round_to=round_to, **kwargs,
    )  # fmt: skip
    pruner.step()
    if vit:
        model.hidden_dim = model.conv_proj.out_channels
    return model


def match_flops(
    model: nn.Module, x: torch.Tensor, target: int, round_to: int | None, *, under: bool = False, high: float = 0.95
) -> tuple[float, nn.Module]:
    """The ratio (by bisection in ``[0, high]``, 14 steps) whose pruned model's FLOPs come closest to
    ``target`` (with ``under``, closest among those at or below it)."""
    count: Callable[[nn.Module], int] = lambda m: fxmorph.count_flops(m, (x,))  # noqa: E731
    lo, hi = 0.0, high
    best: tuple[float, float, nn.Module] | None = None
    for _ in range(14):
        mid = (lo + hi) / 2
        pruned = prune(model, x, mid, round_to)
        flops = count(pruned)
        if under and flops > target:
            lo = mid
            continue
        if best is None or abs(flops - target) < best[0]:
            best = (abs(flops - target), mid, pruned)
        if flops > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    logger.info("Torch-Pruning round_to=%s: ratio %.4f", round_to, best[1])
    return best[1], best[2]
