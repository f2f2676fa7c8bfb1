"""Runtimes a latency budget is measured on: the interface, and the registry that names them.

``fxmorph.shrink(..., budget_latency=..., runtime="onnxruntime")`` finds the runtime by name here. The runtimes
themselves live in :mod:`fxmorph.io` (onnxruntime's CPU provider, :mod:`fxmorph.io.latency_profile`), which
registers them when ``fxmorph`` is imported; a user may register another, or pass a runtime object directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from fxmorph.analysis.kernels import Kernel
from fxmorph.analysis.latency import RuntimeProfile
from fxmorph.errors import InputError

__all__ = ["LatencyRuntime", "Timing", "register_runtime", "runtime_for", "runtime_names"]


@dataclass(frozen=True)
class Timing:
    """One model's measured latency: its median in milliseconds and its time over the first model's, round by
    round (``paired_ratio``: the median of per-round ratios of models run interleaved)."""

    median_ms: float
    paired_ratio: float


@runtime_checkable
class LatencyRuntime(Protocol):
    """What a latency budget needs of a runtime: a profile of its kernels and timings of whole models."""

    def describe(self) -> str:
        """The runtime and its settings, for reports (``"onnxruntime 1.22 CPU, 2 threads"``)."""

    def profile(self, kernels: Mapping[Kernel, tuple[int, ...]]) -> RuntimeProfile:
        """Tables for ``kernels`` (each up to the widths given), the memory costs and the FLOP rate."""

    def measure(self, models: Mapping[str, nn.Module], example_inputs: tuple[Any, ...]) -> dict[str, Timing]:
        """The models' latencies on ``example_inputs``, run interleaved; ratios are to the first model."""


RuntimeFactory = Callable[[int], LatencyRuntime]
"""Builds a runtime for a thread count; raises ImportError where the runtime is not installed."""

_RUNTIMES: dict[str, RuntimeFactory] = {}


def register_runtime(name: str, factory: RuntimeFactory) -> None:
    """Make ``runtime=name`` build its runtime with ``factory(threads)``."""
    _RUNTIMES[name] = factory


def runtime_names() -> list[str]:
    """The names ``runtime=`` accepts."""
    return sorted(_RUNTIMES)


def runtime_for(runtime: str | LatencyRuntime, threads: int) -> LatencyRuntime:
    """The runtime ``runtime`` names (built for ``threads`` threads), or ``runtime`` itself when it is one."""
    if not isinstance(runtime, str):
        if not isinstance(runtime, LatencyRuntime):
            raise InputError(
                f"runtime must be a runtime's name ({', '.join(runtime_names())}) or an object with describe(), "
                f"profile() and measure(), got {type(runtime).__name__}."
            )
        return runtime
    factory = _RUNTIMES.get(runtime)
    if factory is None:
        raise InputError(f"unknown runtime {runtime!r}: choose one of {', '.join(runtime_names()) or 'none'}.")
    try:
        return factory(threads)
    except ImportError as exc:
        raise InputError(
            f"runtime {runtime!r} is not installed ({exc}): install its package (pip install {runtime}), or choose "
            f"another of {', '.join(runtime_names())}."
        ) from exc
