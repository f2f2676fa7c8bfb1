"""Dead channels that remove-dead finds: BatchNorm gamma = beta = 0 on every fourth channel (issue 18).

    python -m benchmarks.dead_channels                       # resnet18 vgg11_bn densenet121 mobilenet_v2, 224 px
    python -m benchmarks.dead_channels --size 64 resnet18

For each model: how many BatchNorm channels were zeroed (per BN), how many group channels that makes dead
(a channel is dead only if it is dead in every member of its group), how many ``shrink(model, 1.0)``
removed, the FLOPs before and after, and the largest output difference on a fresh input (it must stay
at float32 rounding: remove-dead promises the same function).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torchvision
from torch import nn

import fxmorph

logger = logging.getLogger("benchmarks.dead_channels")


def _kill(model: nn.Module) -> int:
    """Zero gamma and beta on every fourth channel of every BatchNorm; the number of channels zeroed."""
    count = 0
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight[::4] = 0.0
                bn.bias[::4] = 0.0
                count += len(range(0, bn.num_features, 4))
    return count


def measure(name: str, size: int) -> dict[str, float]:
    """The figures of one model (see the module docstring)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    zeroed = _kill(model)
    x = torch.randn(1, 3, size, size)
    small, report = fxmorph.shrink(model, 1.0, (x,), return_report=True)
    removed = sum(r.before - r.after for r in report.groups)
    fresh = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = float((small(fresh) - model(fresh)).abs().max())
    return {"zeroed": zeroed, "removed": removed, "flops_before": report.flops_before,
            "flops_after": report.flops_after, "max_diff": diff}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["resnet18", "vgg11_bn", "densenet121", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    logger.info("| model | BN channels zeroed | group channels removed | FLOPs before | after | max |diff| |")
    logger.info("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.size)
        logger.info("| %s | %d | %d | %.3f G | %.3f G (%.1f%%) | %.1e |", name, r["zeroed"], r["removed"],
                    r["flops_before"] / 1e9, r["flops_after"] / 1e9, 100 * r["flops_after"] / r["flops_before"],
                    r["max_diff"])  # fmt: skip


if __name__ == "__main__":
    main()
