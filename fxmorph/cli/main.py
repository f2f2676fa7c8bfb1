"""The ``fxmorph-export`` command line (also ``python -m fxmorph``): argument parsing only.

    fxmorph-export MODEL --budget-flops 50% --out DIR [--budget-latency 60%] [--input-shape 1,3,224,224] [--round-to N]
                   [--criterion l1|l2|bn_scale|random] [--strategy prune|width]
                   [--checkpoint weights.pt] [--trust-checkpoint] [--json] [--no-latency] [--force]
                   [--verbose] [--threads N] [--rounds N]

shrinks MODEL to the FLOPs budget, exports the model before and after to ONNX (each checked against
torch in onnxruntime), measures both in onnxruntime and writes ``original.onnx``, ``shrunk.onnx``,
``report.json``, ``report.md``, ``widths.png``, ``latency.png`` and ``flops.png`` into DIR. With
``--budget-latency`` (instead of or beside ``--budget-flops``) the cut meets a latency measured in onnxruntime on
this machine; the report gives each round's predicted and measured latency, and ``latency_flops.png`` plots latency
against FLOPs for the original, the result, and a FLOPs-budget cut to the result's FLOPs
(``flops_budget.onnx``).
``fxmorph-export MODEL --explain`` only prints the model's channel groups and writes nothing.

Exit codes: 0 success; 2 usage or input error (one line on stderr); 1 an internal failure (one line
on stderr, the traceback with ``--verbose``). The work itself is in :mod:`fxmorph.cli.run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from fxmorph.api.options import AUTO, CAPTURES, DEFAULT_ROUND_TO, KEEPS, RoundTo

__all__ = ["CRITERIA", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

PROG = "fxmorph-export"
CRITERIA = ("l1", "l2", "bn_scale", "random")  # "taylor" needs data and a loss, which a command line has not
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
MODEL is a torchvision model name (built with weights=None), or package.module:factory for any
importable callable that returns a torch.nn.Module (the current directory is importable).

examples:
  fxmorph-export resnet18 --budget-flops 50% --out out/resnet18
  fxmorph-export mobilenet_v2 --budget-flops 0.3 --out out/mnv2 --input-shape 1,3,160,160 --round-to 1
  fxmorph-export mypkg.models:build --budget-flops 1.2G --out out/mine --checkpoint weights.pt
  fxmorph-export resnet50 --budget-latency 60% --threads 2 --out out/rn50   # 40% faster here
  fxmorph-export resnet18 --explain          # only print the channel groups

exit codes: 0 success, 2 usage or input error, 1 internal failure (--verbose shows the traceback)
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _round_to(text: str) -> RoundTo:
    """``--round-to``: ``auto`` or a positive whole number."""
    return AUTO if text.strip().lower() == AUTO else _positive_int(text)


def _positive_int(text: str, least: int = 1) -> int:
    """An argparse type: ``text`` as an int of at least ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
    return value


def _min_width(text: str) -> int:
    """``--min-width``: a whole number of at least 0."""
    return _positive_int(text, least=0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fxmorph-export``."""
    from fxmorph import __version__

    parser = _Parser(
        prog=PROG,
        description=(
            "Shrink a PyTorch model to a FLOPs budget, export it to ONNX before and after (checked against "
            "torch in onnxruntime), measure both in onnxruntime, and write a report a person can read."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="torchvision model name, or package.module:factory")
    parser.add_argument(
        "--budget-flops",
        metavar="BUDGET",
        # Help strings go through %-formatting: "%%" prints "%".
        help='FLOPs to shrink to: a percentage ("50%%"), a fraction (0.5) or absolute FLOPs (1.2G, 3.5e8)',
    )
    parser.add_argument(
        "--budget-latency",
        metavar="BUDGET",
        help='latency to shrink to, measured in onnxruntime with --threads: a percentage ("60%%"), a fraction (0.6) '
        "or a time (12ms, 800us); with --budget-flops both are met",
    )
    parser.add_argument(
        "--latency-keep",
        choices=tuple(KEEPS),
        default="model",
        help="what --budget-latency keeps the most of: model (the most FLOPs while keeping the parameters a FLOPs "
        "budget keeps at that latency) or flops (the most FLOPs, fewer parameters where whole layers go; "
        "default model)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (created; nothing is written outside it)")
    parser.add_argument(
        "--input-shape", default="1,3,224,224", metavar="SHAPE", help="example input shape (default 1,3,224,224)"
    )
    parser.add_argument(
        "--round-to",
        type=_round_to,
        default=DEFAULT_ROUND_TO,
        metavar="N",
        help="widths are multiples of N, or 'auto': multiples of 16 (onnxruntime's CPU channel block) where the "
        "budget allows, finer steps for narrow groups where it needs them (default auto)",
    )
    parser.add_argument(
        "--min-width",
        type=_min_width,
        default=None,
        metavar="N",
        help="no group goes below N channels (default: 0 with --budget-latency, else 1); 0 also lets the groups that "
        "can go whole go, with the ops that compute them (a dense layer's new features, with the layer)",
    )
    parser.add_argument("--criterion", choices=CRITERIA, default="l1", help="channel importance (default l1)")
    parser.add_argument(
        "--strategy",
        choices=("prune", "width"),
        default="prune",
        help="prune: least important channels per FLOP, globally; width: one multiplier (default prune)",
    )
    parser.add_argument(
        "--capture",
        choices=CAPTURES,
        default="auto",
        help="how the model becomes a graph: fx (symbolic tracing), export (torch.export), or auto: fx, and "
        "torch.export where tracing fails (default auto)",
    )
    parser.add_argument(
        "--uniform-blocks",
        action="store_true",
        help="keep the layers that play one role in repeated blocks (layer3.*.conv1) at one width, as configs "
        "holding one size per model need",
    )
    parser.add_argument("--checkpoint", metavar="FILE", help="a state dict to load (read with weights_only=True)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow a checkpoint that holds pickled Python objects (a whole model); unpickling can run "
        "arbitrary code, so use it only for files you trust",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of a table")
    parser.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency measurement")
    parser.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step; full traceback on failure")
    parser.add_argument(
        "--threads", type=_positive_int, metavar="N", help="onnxruntime intra-op threads for latency (default: all)"
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=30,
        metavar="N",
        help="interleaved latency rounds, after min(10, N) warm-up runs (default 30)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print the channel groups of the model; alone (without --budget-flops and --out) it only analyses",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    budget = args.budget_flops if args.budget_flops is not None else args.budget_latency
    if not args.explain and (budget is None or args.out is None):
        given = (("--budget-flops (or --budget-latency)", budget), ("--out", args.out))
        missing = " and ".join(o for o, v in given if v is None)
        verb = "are" if " and " in missing else "is"
        parser.error(f"{missing} {verb} required (or pass --explain to only print the channel groups)")
    # With --explain, both may be absent; one without the other is still a mistake.
    if (budget is None) != (args.out is None):
        parser.error("a budget (--budget-flops, --budget-latency) and --out go together")
    from fxmorph.cli.run import run

    return run(args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
