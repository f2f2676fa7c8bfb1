"""Shrink a torchvision model to a FLOPs budget and show what changed.

    python examples/shrink_torchvision.py                 # resnet50 to 50% of its FLOPs
    python examples/shrink_torchvision.py mobilenet_v2 30%
    python examples/shrink_torchvision.py resnet18 25% --size 64

Prints the shrink report (FLOPs, MACs, parameters, widths per group, pins), then checks the result
against PyTorch's own FLOP counter and compares the outputs of the original and the shrunk model.
Runs in seconds on a laptop CPU (random weights: no download). Exits with status 1 if PyTorch's
count disagrees with the report or the output shape changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torchvision

import fxmorph

logger = logging.getLogger("shrink_torchvision")


def main(name: str = "resnet50", budget: str = "50%", size: int = 224) -> bool:
    """Shrink torchvision's ``name`` (random weights) to ``budget`` at a ``size`` x ``size`` input and log
    the report; True if PyTorch's FLOP count matches the report and the output shape is unchanged."""
    logging.getLogger("fxmorph").setLevel(logging.WARNING)  # the report below says it all
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
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
    ok = counted == report.flops_after and before.shape == after.shape
    if not ok:
        logger.error("MISMATCH: counted %d FLOPs against the report's %d, or the output shape changed", counted,
                     report.flops_after)  # fmt: skip
    return ok


def parse(argv: list[str]) -> argparse.Namespace:
    """Command-line options; an unknown model name is refused with the list of known ones."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="resnet50", help="a torchvision classification model name")
    p.add_argument("budget", nargs="?", default="50%", help="FLOPs budget: a share ('50%%', 0.5) or a count")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    args = p.parse_args(argv)
    known = torchvision.models.list_models(module=torchvision.models)
    if args.model not in known:
        p.error(f"unknown model '{args.model}'; torchvision's classification models: {', '.join(known)}")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = parse(sys.argv[1:])
    try:
        sys.exit(0 if main(options.model, options.budget, options.size) else 1)
    except fxmorph.FxmorphError as e:  # bad budget or input: one line, no traceback
        sys.exit(f"error: {e}")
