"""The contents of ``report.json``: what ``fxmorph-export`` measured, in plain JSON types."""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fxmorph.api.report import ShrinkReport
from fxmorph.cli.inputs import PROG, parse_shape
from fxmorph.io.export import ExportResult

__all__ = ["json_safe", "latency_budget_info", "latency_info", "report_data"]


def _versions() -> dict[str, str]:
    """The versions of the packages that decide the results, and the Python and platform they ran on."""
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
    """The command as the user typed it: its argv and one shell-quoted line."""
    # ``python -m`` sets argv[0] to the package's __main__.py.
    launcher = "python -m fxmorph" if sys.argv and sys.argv[0].endswith("__main__.py") else PROG
    return {"argv": [launcher, *argv], "line": " ".join([launcher, *(shlex.quote(a) for a in argv)])}


def _export_info(result: Any) -> dict[str, Any]:
    """The ``onnx`` entry of one exported file (an :class:`ExportResult`)."""
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


def json_safe(value: Any) -> Any:
    """``value`` with every key a string and every leaf a JSON scalar (anything else as its ``str``)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def latency_info(lat: Any) -> dict[str, Any]:
    """The ``latency`` entry of the report from a :class:`~fxmorph.io.latency.LatencyReport`."""
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


def latency_budget_info(report: ShrinkReport) -> dict[str, Any] | None:
    """The ``latency_budget`` entry: the runtime, the budget and each round's predicted and measured latency."""
    outcome = report.latency
    if outcome is None:
        return None
    return {
        "runtime": outcome.runtime,
        "budget_ms": outcome.budget_ms,
        "original_ms": outcome.original_ms,
        "measured_ms": outcome.measured_ms,
        "predicted_original_ms": outcome.predicted_original_ms,
        "profile_seconds": outcome.profile_seconds,
        "rounds": [asdict(s) for s in outcome.steps],
        "chosen_round": outcome.chosen + 1,
    }


def _group_info(report: Any) -> dict[str, Any]:
    """The ``groups`` entry: counts of total, free, changed and pinned groups, and one row per group."""
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


def report_data(
    args: argparse.Namespace,
    argv: list[str],
    checkpoint_tensors: int,
    report: ShrinkReport,
    latency: dict[str, Any],
    exports: dict[str, ExportResult],
) -> dict[str, Any]:
    """Everything ``report.json`` holds but the written files and the step times (added by the caller)."""
    pins = [
        {"group": r.id, "made_by": r.made_by, "width": r.before, "reason": r.pinned} for r in report.groups if r.pinned
    ]
    checkpoint = None
    if args.checkpoint:
        checkpoint = {"path": str(Path(args.checkpoint).resolve()), "tensors": checkpoint_tensors}
        checkpoint["trusted"] = args.trust_checkpoint
    return {
        "fxmorph_report": 1,  # the version of this report's layout
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "input_shape": list(parse_shape(args.input_shape)),
        "input": "torch.randn(input_shape) drawn after torch.manual_seed(0) and building the model",
        "checkpoint": checkpoint,
        "budget": {"requested": args.budget_flops, "flops": report.budget_flops, "latency": args.budget_latency},
        "latency_budget": latency_budget_info(report),
        "settings": dict(report.settings),
        "flops": {"before": report.flops_before, "after": report.flops_after, "ratio": report.flops_ratio},
        "macs": _ratio(report.macs_before, report.macs_after),
        "params": _ratio(report.params_before, report.params_after),
        "latency": latency,
        "onnx": {name: _export_info(result) for name, result in exports.items()},
        "groups": _group_info(report),
        "pins": pins,
        "dropped_modules": list(report.dropped_modules),
        "passes": [p.to_dict() for p in report.passes],
        "files": {},
        "seconds": {},
        "versions": _versions(),
        "command": _command(argv),
    }


def _ratio(before: int, after: int) -> dict[str, Any]:
    """``before``, ``after`` and their ratio (1.0 when ``before`` is 0)."""
    return {"before": before, "after": after, "ratio": after / before if before else 1.0}
