"""What ``fxmorph-export`` does: check every input, shrink, export and check ONNX, time it, report.

Every input is checked before any long step starts (shape, budget syntax, output directory,
checkpoint, model, a first forward pass on the example input), so a bad input costs seconds and gives
one line on stderr with exit code 2. Failures inside fxmorph give one line and exit code 1 (the
traceback with ``--verbose``). Only files inside ``--out`` are written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

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
from fxmorph.errors import BudgetError, FxmorphError
from fxmorph.meta import FLOPS_KEY

__all__ = ["RESULT_FILES", "UsageError", "load_checkpoint", "load_model", "parse_shape", "run"]

logger = logging.getLogger("fxmorph.cli")

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

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Route fxmorph's, torch's and Python's warnings through one stderr handler for the run."""
    root = logging.getLogger()
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter(verbose))
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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("fxmorph", "torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "numpy", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    return out


def _command(argv: list[str]) -> dict[str, Any]:
    launcher = "python -m fxmorph" if sys.argv and sys.argv[0].endswith("__main__.py") else PROG
    return {"argv": [launcher, *argv], "line": " ".join([launcher, *(shlex.quote(a) for a in argv)])}


def _export_info(result: Any) -> dict[str, Any]:
    return {
        "file": result.path.name,
        "bytes": result.path.stat().st_size,
        "exporter": result.exporter,
        "opset": result.opset,
        "dynamic_batch": result.dynamic_batch,
        "checked_in_onnxruntime": result.checked,
        "max_abs_diff": result.max_abs_diff,
        "max_rel_diff": result.max_rel_diff,
        "export_seconds": round(result.export_seconds, 3),
        "fallbacks": list(result.fallbacks),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def _latency_info(lat: Any) -> dict[str, Any]:
    data = lat.to_dict()
    models = {m["name"]: m for m in data.pop("models")}
    before, after = models["original"], models["shrunk"]
    return {
        "measured": True,
        "before_ms": before["median_ms"],
        "after_ms": after["median_ms"],
        "speedup": before["median_ms"] / after["median_ms"] if after["median_ms"] else None,
        "ratio": after["ratio"],
        "paired_ratio": after["paired_ratio"],
        "statistic": "median over interleaved rounds",
        "settings": data,
        "models": models,
    }


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
        self.bar.set_description_str(text)
        logger.info("%s ...", text)
        start = time.perf_counter()
        yield
        logger.info("%s: done in %.2f s", text, time.perf_counter() - start)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _group_info(report: Any) -> dict[str, Any]:
    rows = [
        {"id": r.id, "made_by": r.made_by, "before": r.before, "after": r.after, "pinned": r.pinned}
        for r in report.groups
    ]
    return {
        "total": len(rows),
        "free": sum(1 for r in rows if not r["pinned"]),
        "changed": sum(1 for r in rows if r["before"] != r["after"]),
        "pinned": sum(1 for r in rows if r["pinned"]),
        "rows": rows,
    }


def _shrink_all(args: argparse.Namespace, argv: list[str], out: Path) -> tuple[dict[str, Any], str]:
    """The whole run; returns the report dictionary (also written to ``report.json``) and, with
    ``--explain``, the channel groups of the model as text."""
    import fxmorph
    from fxmorph.cli import report_files

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    shape = parse_shape(args.input_shape)
    check_budget(args.budget_flops)
    check_out(out, args.force)
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    loaded = load_checkpoint(model, args.checkpoint, args.trust_checkpoint, args.model) if args.checkpoint else 0
    x = torch.randn(shape)
    flops = first_forward(model, x, args)
    from fxmorph.api.budget import parse_budget

    try:
        budget = parse_budget(args.budget_flops, flops)
    except BudgetError as exc:
        raise UsageError(f"--budget-flops: {first_line(exc)}") from exc
    if budget > flops:
        raise UsageError(
            f"--budget-flops {args.budget_flops} ({budget:,} FLOPs) is above the {flops:,} FLOPs of {args.model} at "
            f"--input-shape {args.input_shape}: there is nothing to shrink; pass at most 100%"
        )
    seconds["load"] = time.perf_counter() - started

    steps = ["shrink", "export original.onnx", "export shrunk.onnx"]
    steps += [] if args.no_latency else ["measure latency"]
    steps += ["write report"]
    progress = _Progress(steps, args.verbose)
    try:
        with progress.step(f"shrinking to {args.budget_flops}"):
            t = time.perf_counter()
            try:
                small, report = fxmorph.shrink(
                    model,
                    args.budget_flops,
                    (x,),
                    criterion=args.criterion,
                    strategy=args.strategy,
                    round_to=args.round_to,
                    return_report=True,
                )
            except BudgetError as exc:  # below what the model can reach
                raise UsageError(f"--budget-flops: {first_line(exc)}") from exc
            seconds["shrink"] = time.perf_counter() - t
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out} cannot be created: {exc.strerror or exc}") from exc
        for name in RESULT_FILES:  # --force: no stale file from an earlier run may survive
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        exports = {}
        for name, net in (("original", model), ("shrunk", small)):
            with progress.step(f"exporting {name}.onnx"):
                t = time.perf_counter()
                exports[name] = fxmorph.export_onnx(net, (x,), out / f"{name}.onnx")
                seconds[f"export_{name}"] = time.perf_counter() - t
        latency: dict[str, Any] = {"measured": False, "reason": "--no-latency"}
        if not args.no_latency:
            with progress.step(f"timing {args.rounds} rounds"):
                t = time.perf_counter()
                lat = fxmorph.measure_latency(
                    {"original": exports["original"], "shrunk": exports["shrunk"]},
                    (x,),
                    threads=args.threads,
                    rounds=args.rounds,
                    warmup=min(10, args.rounds),
                )
                latency = _latency_info(lat)
                seconds["latency"] = time.perf_counter() - t
        with progress.step("writing the report"):
            pins = [
                {"group": r.id, "made_by": r.made_by, "width": r.before, "reason": r.pinned}
                for r in report.groups
                if r.pinned
            ]
            data: dict[str, Any] = {
                "fxmorph_report": 1,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model": args.model,
                "input_shape": list(shape),
                "input": "torch.randn(input_shape) drawn after torch.manual_seed(0) and building the model",
                "checkpoint": (
                    {"path": str(Path(args.checkpoint).resolve()), "tensors": loaded, "trusted": args.trust_checkpoint}
                    if args.checkpoint
                    else None
                ),
                "budget": {"requested": args.budget_flops, "flops": report.budget_flops},
                "settings": dict(report.settings),
                "flops": {"before": report.flops_before, "after": report.flops_after, "ratio": report.flops_ratio},
                "macs": {
                    "before": report.macs_before,
                    "after": report.macs_after,
                    "ratio": report.macs_after / report.macs_before if report.macs_before else 1.0,
                },
                "params": {
                    "before": report.params_before,
                    "after": report.params_after,
                    "ratio": report.params_after / report.params_before if report.params_before else 1.0,
                },
                "latency": latency,
                "onnx": {name: _export_info(result) for name, result in exports.items()},
                "groups": _group_info(report),
                "pins": pins,
                "dropped_modules": list(report.dropped_modules),
                "passes": report.passes,
                "files": {},
                "seconds": {},
                "versions": _versions(),
                "command": _command(argv),
            }
            data["files"] = report_files.write_all(data, out)
            seconds["total"] = time.perf_counter() - started
            data["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            data = _json_safe(data)
            (out / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    finally:
        progress.close()
    explain = fxmorph.analyze(model, (x,)).explain() if args.explain and not args.json else ""
    return data, explain


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
    cg = fxmorph.analyze(model, (x,))
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
            if args.budget_flops is None:
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
