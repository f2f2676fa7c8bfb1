"""What the benchmarks share: building zoo models, their inputs, counting them, reading curves of cuts, and timing
with peak memory."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torchvision

import fxmorph

T = TypeVar("T")


def example_input(name: str) -> torch.Tensor:
    """The benchmark input of a torchvision model: 1x3x224x224 (299 for inception_v3, clips for video)."""
    if name in torchvision.models.list_models(module=torchvision.models.video):
        t, s = (16, 224) if name in ("mvit_v1_b", "mvit_v2_s", "s3d") else (8, 112)
        return torch.randn(1, 3, t, s, s)
    side = 299 if name == "inception_v3" else 224
    return torch.randn(1, 3, side, side)


def build(name: str) -> torch.nn.Module:
    """A torchvision model by name with random weights (``weights=None``), in eval mode."""
    kwargs: dict = {"weights": None}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    return torchvision.models.get_model(name, **kwargs).eval()


def median_time(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result  # type: ignore[return-value]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_memory(fn: Callable[[], T]) -> tuple[int, T]:
    """Peak resident memory above the process's resident size before the call (bytes; Linux), and the result."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
    except OSError:
        return -1, fn()
    result = fn()
    return max(_status("VmHWM") - before, 0), result


def count(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The model's FLOPs on ``x`` and its parameters."""
    return {"flops": fxmorph.count_flops(model, (x,)), "params": fxmorph.count_params(model)}


def at_latency(points: list[dict[str, Any]], ratio: float, key: str) -> float | None:
    """``key`` (FLOPs or parameters) of a curve of cuts (each with its latency ``ratio``) interpolated at latency
    ``ratio``; None outside it."""
    pts = sorted((p["ratio"], p[key]) for p in points)
    if not pts or not pts[0][0] <= ratio <= pts[-1][0]:
        return None
    return float(np.interp(ratio, [p[0] for p in pts], [p[1] for p in pts]))


def measure_interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, threads: int) -> fxmorph.LatencyReport:
    """Every model exported and measured in one interleaved run (40 rounds after 10 of warm-up), as the latency
    benchmarks compare cuts: :func:`fxmorph.measure_latency`'s report (10th-percentile ratios to the first)."""
    with tempfile.TemporaryDirectory(prefix="fxmorph-latency-bench-") as tmp:
        exported = {
            n: fxmorph.export_onnx(m, (x,), Path(tmp) / f"{n.replace(' ', '_')}.onnx") for n, m in models.items()
        }
        return fxmorph.measure_latency(exported, (x,), threads=threads, rounds=40, warmup=10)
