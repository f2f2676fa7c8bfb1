"""What ``fxmorph-export MODEL`` does today: analyse the model and report its groups and costs."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
import time

import torch
from torch import nn

from fxmorph.errors import FxmorphError

__all__ = ["load_model", "parse_shape", "run"]

logger = logging.getLogger(__name__)


class UsageError(FxmorphError):
    """Bad command-line input (exit code 2)."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape '{text}' is not a list of positive integers such as 1,3,224,224")
    return shape


def load_model(spec: str) -> nn.Module:
    """A torchvision model name (random weights) or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot import '{spec}': {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise UsageError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model '{spec}'.{hint}")
    return torchvision.models.get_model(spec, weights=None)


def run(args: argparse.Namespace) -> int:
    """Analyse ``args.model`` and print a summary; returns the exit code."""
    import fxmorph

    try:
        shape = parse_shape(args.input_shape)
        model = load_model(args.model).eval()
        x = torch.randn(shape)
        start = time.perf_counter()
        cg = fxmorph.analyze(model, (x,))
        elapsed = time.perf_counter() - start
    except UsageError as exc:
        print(f"fxmorph-export: error: {exc}", file=sys.stderr)
        return 2
    except FxmorphError as exc:
        print(f"fxmorph-export: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.explain:
        print(cg.explain())
    flops = cg.gm.meta.get("fxmorph.flops", 0)
    print(
        f"{args.model}: {fxmorph.count_params(model):,} parameters, {flops / 1e9:.3f} GFLOPs, "
        f"{len(cg.groups)} channel groups ({len(cg.free_groups)} free), analysed in {elapsed:.2f} s"
    )
    return 0
