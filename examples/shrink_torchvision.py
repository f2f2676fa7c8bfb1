"""Shrink a torchvision model to a FLOPs budget and show what changed.

    python examples/shrink_torchvision.py                 # resnet50 to 50% of its FLOPs
    python examples/shrink_torchvision.py mobilenet_v2 30%

Prints the shrink report (FLOPs, MACs, parameters, widths per group, pins), then checks the result
against PyTorch's own FLOP counter and compares the outputs of the original and the shrunk model.
Runs in seconds on a laptop CPU (random weights: no download).
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torchvision

import fxmorph

logger = logging.getLogger("shrink_torchvision")


def main(name: str = "resnet50", budget: str = "50%") -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)  # the report below says it all
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    small, report = fxmorph.shrink(model, budget, (x,), return_report=True)
    elapsed = time.perf_counter() - start
    logger.info("%s shrunk to %s of its FLOPs in %.2f s\n", name, budget, elapsed)
    logger.info("%s\n", report.table())
    counted = fxmorph.count_flops(small, (x,))
    with torch.no_grad():
        before, after = model(x), small(x)
    logger.info("FLOPs counted by torch.utils.flop_counter: %.3f G (report says %.3f G)", counted / 1e9,
                report.flops_after / 1e9)  # fmt: skip
    logger.info("output shape %s -> %s; top-1 class agreement on this input: %s", tuple(before.shape),
                tuple(after.shape), bool(before.argmax(1).eq(after.argmax(1)).all()))  # fmt: skip
    logger.info("(random weights: fine-tune the shrunk model before judging its accuracy)")


if __name__ == "__main__":
    main(*sys.argv[1:])
