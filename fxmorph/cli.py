"""The ``fxmorph-export`` command line (also ``python -m fxmorph``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fxmorph-export``."""
    parser = argparse.ArgumentParser(
        prog="fxmorph-export",
        description=(
            "Analyse a torchvision model (or any `package.module:factory`), show its channel groups, "
            "and (in later releases) shrink it to a FLOPs budget and export ONNX before and after."
        ),
    )
    parser.add_argument("model", nargs="?", help="torchvision model name, or package.module:factory")
    parser.add_argument("--input-shape", default="1,3,224,224", help="example input shape (default 1,3,224,224)")
    parser.add_argument("--explain", action="store_true", help="print the channel groups of the model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.print_help()
        return 0
    from fxmorph._cli_run import run

    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
