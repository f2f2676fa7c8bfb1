"""Runtimes a latency budget is measured on: the interface, and the registry that names them.

``fxmorph.shrink(..., budget_latency=..., runtime="onnxruntime")`` finds the runtime by name here. The runtimes
themselves live in :mod:`fxmorph.io` (onnxruntime's CPU provider, :mod:`fxmorph.io.latency_profile`), which
registers them when ``fxmorph`` is imported; a user may register another, or pass a runtime object directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from fxmorph.analysis.kernels import Kernel
from fxmorph.analysis.latency import RuntimeProfile
from fxmorph.errors import InputError

__all__ = ["LatencyRuntime", "SteadyTimer", "Timing", "register_runtime", "runtime_for", "runtime_names"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """One model's measured latency: its median in milliseconds, and its time over the first model's as the runtime
    measures it with the models run interleaved (onnxruntime: the ratio of their 10th percentiles,
    :attr:`fxmorph.io.latency.ModelLatency.steady_ratio`)."""

    median_ms: float
    ratio: float
    median_ratio: float = math.nan
    """The median over rounds of its time over the first model's in the same round, where the runtime has rounds
    (for reports: ``ratio`` is what a budget is met in)."""


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


BUSY = 1.1
"""A measurement whose first model ran this much slower than its fastest measurement so far was taken while the
machine was busy (:class:`SteadyTimer`)."""
RETAKES = 4
"""At most this many busy measurements are taken again, one after another."""


@dataclass
class SteadyTimer:
    """A runtime's measurements, taken again while the machine is busy.

    A shared machine changes speed for seconds at a time: on a 2-core cloud VM, densenet121 ran in 33 ms or in 53 ms
    from one measurement to the next, and not alike for every model (a cut that measured 68% of it at 33 ms measured
    74% at 53 ms), so interleaving cannot cancel it. The first model of every measurement (the original) is the
    gauge: a measurement where it ran more than :data:`BUSY` times slower than its fastest so far is taken again, up
    to :data:`RETAKES` times, and the budget is met as the machine runs when nothing else holds it."""

    runtime: LatencyRuntime
    fastest_ms: float = math.inf
    """The first model's fastest median so far."""
    retaken: int = 0
    """How many measurements were taken again."""

    def measure(self, models: Mapping[str, nn.Module], example_inputs: tuple[Any, ...]) -> dict[str, Timing]:
        """The runtime's measurement of ``models``, taken again while the first one runs busy."""
        for attempt in range(RETAKES + 1):
            timing = self.runtime.measure(models, example_inputs)
            first_ms = next(iter(timing.values())).median_ms
            self.fastest_ms = min(self.fastest_ms, first_ms)
            if first_ms <= self.fastest_ms * BUSY:
                return timing
            if attempt < RETAKES:
                self.retaken += 1
                logger.info(
                    "the machine was busy (%s ran slower than its fastest): measuring again", next(iter(models))
                )
        logger.warning("the machine stayed busy for %d measurements: using the last", RETAKES + 1)
        return timing
