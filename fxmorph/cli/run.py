"""What ``fxmorph-export`` does: check every input, shrink, export and check ONNX, time it, report.

Every input is checked before any long step starts (shape, budget syntax, output directory,
checkpoint, model, a first forward pass on the example input), so a bad input costs seconds and gives
one line on stderr with exit code 2. Failures inside fxmorph give one line and exit code 1 (the
traceback with ``--verbose``). Only files inside ``--out`` are written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxmorph.api.report import ShrinkReport
from fxmorph.cli.inputs import (
    PROG,
    RESULT_FILES,
    UsageError,
    check_budget,
    check_out,
    first_forward,
    first_line,
    load_checkpoint,
    load_model,
    parse_shape,
)
from fxmorph.cli.report_data import json_safe, latency_info, report_data
from fxmorph.errors import BudgetError, FxmorphError
from fxmorph.meta import FLOPS_KEY

__all__ = ["RESULT_FILES", "UsageError", "load_checkpoint", "load_model", "parse_shape", "run"]

logger = logging.getLogger("fxmorph.cli")

# 130: the shell's code for a process ended by SIGINT (128 + 2)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Formatter(logging.Formatter):
    """``fxmorph-export: error: message`` for the user; names and times with ``--verbose``."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else None)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {text}"
        return f"{PROG}: {text}"


class _TqdmHandler(logging.StreamHandler):
    """Writes log records above any running progress bar (and to the current ``sys.stderr``)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            # tqdm.write clears the bar, prints the line and redraws the bar below it. sys.stderr is looked up per
            # record: tests swap it after the handler is made.
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Route fxmorph's, torch's and Python's warnings through one stderr handler for the run."""
    root = logging.getLogger()
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter(verbose))
    # Saved and restored: main() may be called in a process (a test, a notebook) whose logging must survive the run.
    old_level, old_capture = root.level, logging.getLogger("py.warnings").level
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
    # Library warnings (deprecations, tracer notes) are noise for a command-line user: --verbose shows them.
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        logging.getLogger("py.warnings").setLevel(old_capture)
        root.removeHandler(handler)
        root.setLevel(old_level)


# ----------------------------------------------------------------------------------------------- steps


class _Progress:
    """A tqdm bar over the long steps (stderr; hidden when stderr is not a terminal)."""

    def __init__(self, steps: list[str], verbose: bool) -> None:
        from tqdm import tqdm

        self.verbose = verbose
        self.bar = tqdm(
            total=len(steps),
            file=sys.stderr,
            disable=not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()),  # a bar only on a terminal
            leave=False,
            unit="step",
            bar_format="{desc:<28} {n_fmt}/{total_fmt} |{bar:24}| {elapsed}",
        )

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """One step: shown on the bar and logged with its time; the bar advances only when the step finishes."""
        self.bar.set_description_str(text)
        logger.info("%s ...", text)
        start = time.perf_counter()
        yield
        logger.info("%s: done in %.2f s", text, time.perf_counter() - start)
        self.bar.update(1)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        self.bar.close()


@dataclass(frozen=True)
class _Loaded:
    """The model, its example input and what was checked about them before any long step."""

    model: nn.Module
    x: torch.Tensor
    flops: int
    checkpoint_tensors: int


def _load(args: argparse.Namespace, out: Path) -> _Loaded:
    """Check every input (shape, budget, output directory, checkpoint, a first forward) in seconds."""
    from fxmorph.api.budget import parse_budget

    shape = parse_shape(args.input_shape)
    check_budget(args.budget_flops, args.budget_latency)
    # before the model is built, as check_budget: shrink would refuse it too, but only after the first forward
    if args.latency_keep != "model" and (args.budget_latency is None or args.strategy != "prune"):
        raise UsageError(f"--latency-keep {args.latency_keep} needs --budget-latency with --strategy prune.")
    check_out(out, args.force)
    torch.manual_seed(0)  # the report promises this seed before the model and the input are drawn
    model = load_model(args.model).eval()
    loaded = load_checkpoint(model, args.checkpoint, args.trust_checkpoint, args.model) if args.checkpoint else 0
    x = torch.randn(shape)
    flops = first_forward(model, x, args)
    if args.budget_flops is None:
        return _Loaded(model, x, flops, loaded)
    try:
        budget = parse_budget(args.budget_flops, flops)
    except BudgetError as exc:
        raise UsageError(f"--budget-flops: {first_line(exc)}") from exc
    if budget > flops:
        raise UsageError(
            f"--budget-flops {args.budget_flops} ({budget:,} FLOPs) is above the {flops:,} FLOPs of {args.model} at "
            f"--input-shape {args.input_shape}: there is nothing to shrink; pass at most 100%"
        )
    return _Loaded(model, x, flops, loaded)


def _shrink(args: argparse.Namespace, run: _Loaded) -> tuple[nn.Module, ShrinkReport]:
    """:func:`fxmorph.shrink` with the command's options; a budget the model cannot reach is a usage error."""
    import fxmorph

    try:
        return fxmorph.shrink(
            run.model,
            args.budget_flops,
            (run.x,),
            budget_latency=args.budget_latency,
            latency_threads=args.threads,
            latency_keep=args.latency_keep,
            return_report=True,
            **_cut_options(args),
        )
    except BudgetError as exc:  # below what the model can reach
        option = "--budget-latency" if "latency" in str(exc) else "--budget-flops"
        raise UsageError(f"{option}: {first_line(exc)}") from exc


def _clear(out: Path) -> None:
    """Create ``out`` and remove the result files of an earlier run (``--force``): none may survive stale."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be created: {exc.strerror or exc}") from exc
    for name in RESULT_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _shrink_all(args: argparse.Namespace, argv: list[str], out: Path) -> tuple[dict[str, Any], str]:
    """The whole run; returns the report dictionary (also written to ``report.json``) and, with
    ``--explain``, the channel groups of the model as text."""
    import fxmorph
    from fxmorph.cli import report_files

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    run = _load(args, out)
    seconds["load"] = time.perf_counter() - started
    steps = ["shrink", "export original.onnx", "export shrunk.onnx"]
    steps += ["shrink to the same FLOPs", "export flops_budget.onnx"] if args.budget_latency else []
    steps += [] if args.no_latency else ["measure latency"]
    progress = _Progress([*steps, "write report"], args.verbose)
    try:
        budget = " and ".join(b for b in (args.budget_flops, args.budget_latency) if b is not None)
        with progress.step(f"shrinking to {budget}"), _timed(seconds, "shrink"):
            small, report = _shrink(args, run)
        # Only once the shrink succeeded: a budget that cannot be met leaves an earlier run's results (written with
        # --force) in place.
        _clear(out)
        exports = {}
        nets = [("original", run.model), ("shrunk", small)]
        if report.latency is not None:  # the comparison the latency budget is for: a FLOPs cut to the same FLOPs
            with progress.step("shrinking to the same FLOPs"), _timed(seconds, "shrink_flops_budget"):
                nets.append(("flops_budget", _same_flops(args, run, report)))
        for name, net in nets:
            with progress.step(f"exporting {name}.onnx"), _timed(seconds, f"export_{name}"):
                exports[name] = fxmorph.export_onnx(net, (run.x,), out / f"{name}.onnx")
        latency: dict[str, Any] = {"measured": False, "reason": "--no-latency"}
        if not args.no_latency:
            with progress.step(f"timing {args.rounds} rounds"), _timed(seconds, "latency"):
                lat = fxmorph.measure_latency(
                    dict(exports), (run.x,), threads=args.threads, rounds=args.rounds, warmup=min(10, args.rounds)
                )
                latency = latency_info(lat)
        with progress.step("writing the report"):
            data = report_data(args, argv, run.checkpoint_tensors, report, latency, exports)
            if len(nets) > 2:  # what the latency budget's plot sets the result beside
                data["latency_budget"]["flops_budget"] = {
                    "flops": fxmorph.count_flops(nets[2][1], (run.x,)),
                    "params": fxmorph.count_params(nets[2][1]),
                }
            data["files"] = report_files.write_all(data, out)
            seconds["total"] = time.perf_counter() - started
            data["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            data = json_safe(data)
            (out / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    finally:
        progress.close()
    explain = ""
    if args.explain and not args.json:
        explain = fxmorph.analyze(run.model, (run.x,), capture=args.capture).explain()
    return data, explain


def _same_flops(args: argparse.Namespace, run: _Loaded, report: ShrinkReport) -> nn.Module:
    """The model cut to a FLOPs budget equal to the latency-budget result's FLOPs, with the same settings."""
    import fxmorph

    return fxmorph.shrink(run.model, report.flops_after, (run.x,), **_cut_options(args))


def _cut_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the command that say how to cut (the same for the result and the comparison)."""
    return {
        "criterion": args.criterion,
        "strategy": args.strategy,
        "round_to": args.round_to,
        "min_width": args.min_width,
        "uniform_blocks": args.uniform_blocks,
        "capture": args.capture,
    }


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block in ``seconds[key]`` (only when it finishes)."""
    start = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - start


def _explain_only(args: argparse.Namespace) -> None:
    """``fxmorph-export MODEL --explain``: print the channel groups; write nothing."""
    import fxmorph

    shape = parse_shape(args.input_shape)
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, args.trust_checkpoint, args.model)
    x = torch.randn(shape)
    first_forward(model, x, args)
    start = time.perf_counter()
    cg = fxmorph.analyze(model, (x,), capture=args.capture)
    elapsed = time.perf_counter() - start
    flops = cg.gm.meta.get(FLOPS_KEY, 0)
    print(cg.explain())
    print(
        f"{args.model}: {fxmorph.count_params(model):,} parameters, {flops / 1e9:.3f} GFLOPs, "
        f"{len(cg.groups)} channel groups ({len(cg.free_groups)} free), analysed in {elapsed:.2f} s"
    )


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run ``fxmorph-export`` with parsed ``args``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _logging(args.verbose):
        try:
            if args.out is None:  # main() lets it be absent only with --explain (and then the budgets are absent too)
                _explain_only(args)
                return EXIT_OK
            out = Path(args.out)
            # Library chatter on stdout (exporters) must not mix with the table or the JSON.
            with contextlib.redirect_stdout(sys.stderr):
                data, explain = _shrink_all(args, argv, out)
            from fxmorph.cli import report_files

            if args.json:
                print(json.dumps(data, indent=2))
            else:
                if explain:
                    print(explain, end="\n\n")
                print(report_files.terminal_table(data, out))
            return EXIT_OK
        except UsageError as exc:
            logger.error("%s", first_line(exc, 400))
            if args.verbose:
                logger.error("%s", traceback.format_exc().rstrip())
            return EXIT_USAGE
        except KeyboardInterrupt:
            logger.error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:  # anything else is fxmorph's failure: one line, traceback with --verbose
            what = "" if isinstance(exc, FxmorphError) else f"internal error: {type(exc).__name__}: "
            logger.error(
                "%s%s%s",
                what,
                first_line(exc),
                "" if args.verbose else " (run with --verbose for the traceback)",
            )
            if args.verbose:
                logger.error("%s", traceback.format_exc().rstrip())
            return EXIT_FAILURE
