"""onnxruntime's CPU provider as a :class:`~fxmorph.api.runtimes.LatencyRuntime`: timed kernel by kernel.

:meth:`OnnxRuntimeCPU.profile` measures every kernel a graph runs on a grid of widths
(:func:`~fxmorph.analysis.latency.grid_points`), each point two small ONNX graphs (:mod:`fxmorph.io.onnx_kernels`)
in sessions with the settings of :func:`fxmorph.io.latency.measure_latency` (the thread count, every graph
optimisation, no spinning): one op, and :data:`_COPIES` of it. The op's time is their difference by wall clock over
the extra copies (:func:`_marginal`). A table's points run interleaved, round after round, in three passes over
every point the profile measures; a graph's time is the fast tail of its runs (:data:`_QUANTILE`), the least over
the passes;
the cache (:mod:`fxmorph.io.latency_cache`) keeps every point, so the second shrink on a machine measures nothing.
Memory-bound ops get a fixed time and a time per element, fitted over five sizes; products without a table the time
of a FLOP of two batched products; blocked convolutions the channel block they pad widths to.
:meth:`OnnxRuntimeCPU.measure` exports whole models and times them interleaved.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from torch import nn
from tqdm.auto import tqdm

from fxmorph.analysis.kernels import Kernel, KernelKind
from fxmorph.analysis.latency import MemoryClass, MemoryCost, RuntimeProfile, Table, grid_points
from fxmorph.api.runtimes import Timing, register_runtime
from fxmorph.io.export import export_onnx
from fxmorph.io.latency import measure_latency, session_options
from fxmorph.io.latency_cache import CacheKey, LatencyCache, cpu_model
from fxmorph.io.onnx_kernels import input_shapes, kernel_graph, memory_graph, product_graph

__all__ = ["OnnxRuntimeCPU"]

logger = logging.getLogger(__name__)

_MEMORY_SIZES = ((16, 7), (16, 14), (64, 28), (128, 56), (256, 56))
"""(channels, side) of the tensors each memory-bound op is timed on: 784 to 800 K elements."""
_PRODUCTS = ((12, 197, 64, 197), (1, 197, 768, 768))
"""(batch, M, K, N) of the batched products that give the FLOP rate (a ViT-B's attention and projection)."""
_MEASURE_S = 4.0
"""Seconds a measurement of whole models aims at (:data:`_MIN_ROUNDS` at least)."""
_MIN_ROUNDS = 40
"""Rounds a measurement takes at least: four below its 10th percentile."""
_SESSIONS = 3
"""Sessions of each model a measurement takes in turn: one session's placement in memory moves its speed by a few
percent for as long as it lives (:mod:`fxmorph.io.latency`), and a measurement averages three placements."""
_BLOCK_PROBE = (16, 24, 32)
"""Output widths of the 1x1 convolution that tells the channel block (:func:`_block`)."""
_CHUNK_BYTES = 256 << 20
"""The most graph bytes a table times interleaved at once. Each point's sessions hold its weights six times over
(five copies and one) and again as the runtime repacks them: vit_b_16's table of 768 by 3072 products held 13 GB
of sessions timed at once; the rest of a table waits for the next run."""
_MEMORY_ROUNDS = 60
"""Interleaved rounds of a memory-bound kind's points. Their smallest sizes run in 5 to 20 us, and a kind timed over
:attr:`OnnxRuntimeCPU.rounds` rounds was measured in a few milliseconds, where one stall of the machine moves its
fixed time: batch norm's measured 5.3 to 11.0 us over five measurements of 9 rounds, and 5.8 to 6.8 us over nine of
three repeats of 60 (elementwise ops' 4.8 to 7.2 us over those nine, and 9.5 in a tenth). What removing a dense layer
saves is mostly such fixed times."""
_PASSES = 3
"""Passes over every point a profile measures (the tables', the memory-bound kinds', the products' and the block
probe's); each point keeps the least of its passes' times. Timed in one pass, one slow spell of the machine (seconds
long, and more than a table's few rounds take) lifted whole tables: densenet121's predicted time moved from 34.4 to
47.1 ms over five builds of its tables, one 1x1 convolution's widest point from 1.0 to 1.9 ms. In three passes it
moved from 34.6 to 36.8 ms, and from 36.4 to 40.0 ms in five builds on a busier hour; a first profile takes three
times as long."""
_QUANTILE = 20.0
"""The percentile of a graph's times over its rounds that a pass keeps; of the passes, the least is kept. A
neighbour on a shared machine only ever slows a run, so the fast tail is what the op costs on the machine alone, as
the whole models' 10th percentiles are (:attr:`~fxmorph.io.latency.ModelLatency.steady_ratio`). Kept as the median
over runs and over passes, three builds of efficientnet_b0's tables predicted its original 12.5 to 17.2 ms, and
densenet121's 47.2 to 51.6 ms; as the 20th percentile, the least over passes, 10.7 to 11.8 ms and 41.3 to 43.2 ms,
on the same busy hour, with its cuts' shares as steady (a cut to 30% of every width: 36.4 to 37.8%, against 34.5
to 40.1%)."""
_WARMUP = 2
"""Runs of each graph before the timed rounds (the first run allocates)."""
_COPIES = 5
"""Copies of the op in the second graph of a point. Its time less the one-op graph's, over the four extra copies,
is what the op costs inside a model: an isolated graph's own cost per run (the session's, the layout reorders of a
blocked convolution at its input and output: 25 us of a 16-channel 1x1 convolution's 33 us at 28x28) is in both.
Until format 6 a point was the op's kernel time in onnxruntime's profiler, which lengthens every op it times: a
ReLU of 32x7x7 took 5.4 us in a profiled chain and 0.5 us by wall clock, a depthwise 3x3 convolution of 96
channels at 56x56 103 us profiled alone and 78 us by wall clock; so the tables priced a model's many small ops high,
and a cut that removes layers cheaper than one that thins them."""


@dataclass(frozen=True)
class _Point:
    """One point to time: its cache key, its two graphs and their input shapes."""

    key: str
    one: bytes
    """The graph of one op."""
    copies: bytes
    """The graph of :data:`_COPIES` of the op."""
    shapes: list[tuple[int, ...]]
    elements: int = 0
    """The elements a memory-bound op's point moves, the FLOPs of a product (0 for a table's)."""


@dataclass(frozen=True)
class OnnxRuntimeCPU:
    """onnxruntime's CPU execution provider with ``threads`` intra-op threads (the default runtime).

    ``rounds`` interleaved rounds per table (each point the fast tail of its runs, :data:`_QUANTILE`);
    ``cache_dir`` overrides ``$FXMORPH_CACHE_DIR``."""

    threads: int = 1
    rounds: int = 9
    cache_dir: Path | None = None

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} CPUExecutionProvider, {self.threads} thread(s)"

    def cache_key(self) -> CacheKey:
        """What this runtime's measurements depend on."""
        return CacheKey("onnxruntime", ort.__version__, self.threads, cpu_model())

    def profile(self, kernels: Mapping[Kernel, tuple[int, ...]]) -> RuntimeProfile:
        """Tables for ``kernels`` up to the widths given, the memory costs and the FLOP rate (cached)."""
        cache = LatencyCache.load(self.cache_key(), self.cache_dir)
        grids = {k: tuple(grid_points(w) for w in widest) for k, widest in kernels.items()}
        self._complete(cache, grids)
        try:
            return self._read(cache, grids)
        except (KeyError, ValueError, TypeError) as exc:  # a cache of this key whose contents are not ours
            logger.warning("latency cache %s holds unusable values (%s): measuring again", cache.path, exc)
            cache.points, cache.extra = {}, {}
            self._complete(cache, grids)
            return self._read(cache, grids)

    def _complete(self, cache: LatencyCache, grids: Mapping[Kernel, tuple[tuple[int, ...], ...]]) -> None:
        """Measure what ``cache`` lacks of ``grids``, the memory costs and the FLOP rate."""
        missing = {_point_key(k, w) for k, g in grids.items() for w in product(*g)} - set(cache.points)
        extra_missing = any(k not in cache.extra for k in ("memory", "flop_us", "block"))
        if missing or extra_missing:
            self._measure_missing(cache, grids, missing, extra_missing)

    def _read(self, cache: LatencyCache, grids: Mapping[Kernel, tuple[tuple[int, ...], ...]]) -> RuntimeProfile:
        """The profile ``cache`` holds for ``grids`` (tables made monotone)."""
        tables = {}
        block = max(1, int(cache.extra["block"]))  # a value not ours must not divide by zero
        for kernel, grid in grids.items():
            values = np.array([float(cache.points[_point_key(kernel, w)]) for w in product(*grid)])
            blocked = kernel.kind is KernelKind.DEPTHWISE or (kernel.kind is KernelKind.CONV and kernel.groups == 1)
            table = Table(kernel, grid, values.reshape([len(a) for a in grid]), block if blocked else 1)
            tables[kernel] = table.monotone()
        memory = {MemoryClass(c): MemoryCost(float(f), float(e)) for c, (f, e) in cache.extra["memory"].items()}
        if set(memory) != set(MemoryClass):  # caught by profile(), which measures again: never a user's error
            raise KeyError(f"memory costs of {sorted(c.value for c in set(MemoryClass) - set(memory))}")
        return RuntimeProfile(self.describe(), tables, memory, float(cache.extra["flop_us"]))

    def _measure_missing(
        self, cache: LatencyCache, grids: Mapping[Kernel, tuple[tuple[int, ...], ...]], missing: set[str], extra: bool
    ) -> None:
        """Measure the points ``missing`` (and the memory costs, FLOP rate and channel block where ``extra``) in
        :data:`_PASSES` passes over all of them, and save every point's least time over the passes."""
        tables = [points for points in (_missing_points(k, g, missing) for k, g in grids.items()) if points]
        memory = _memory_points() if extra else {}
        probes = [_product_points(), _block_points()] if extra else []
        # the memory-bound ops' smallest sizes run in 5 to 20 us: they take more rounds than the other points
        jobs = [(chunk, self.rounds) for points in [*tables, *probes] for chunk in _chunks(points)]
        jobs += [(points, max(self.rounds, _MEMORY_ROUNDS)) for points in memory.values()]
        total = _PASSES * sum(len(points) for points, _ in jobs)
        logger.info("profiling %s: %d measurements (cached for the next run)", self.describe(), total)
        start = time.perf_counter()
        runs: dict[str, list[tuple[float, float]]] = {}
        # no bar where stderr is not a terminal (CI logs): the log lines say as much
        with tqdm(total=total, desc="latency profile", unit="graph", leave=False, disable=None) as bar:
            for _ in range(_PASSES):
                # a pass times every point once: a slow spell of the machine falls on the points of one pass, and
                # the least over the passes sets it aside
                for points, rounds in jobs:
                    for key, tails in self._time(points, rounds).items():
                        runs.setdefault(key, []).append(tails)
                    bar.update(len(points))
        # each graph's least over the passes, then the difference: the least of the passes' differences would keep
        # the pass whose noise happened to favour the graph of copies
        least = {key: _marginal(min(one for one, _ in ts), min(c for _, c in ts)) for key, ts in runs.items()}
        cache.points.update({p.key: least[p.key] for points in tables for p in points})
        if extra:
            cache.extra["memory"] = {kind.value: _fitted(points, least) for kind, points in memory.items()}
            cache.extra["flop_us"] = _flop_us(probes[0], least)
            cache.extra["block"] = _block(probes[1], least)
        cache.save()
        logger.info("profiled in %.1f s", time.perf_counter() - start)

    def _time(self, points: list[_Point], rounds: int | None = None) -> dict[str, tuple[float, float]]:
        """Microseconds of every point's two graphs (one op, :data:`_COPIES` ops), the :data:`_QUANTILE` percentile
        of their runs by wall clock, run interleaved with every other point's ``rounds`` times (:attr:`rounds` by
        default) after a warm-up."""
        options = session_options(self.threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False)
        rng = np.random.default_rng(0)
        runs: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]] = []
        for p in points:
            for model in (p.one, p.copies):
                session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
                names = [i.name for i in session.get_inputs()]
                feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, p.shapes, strict=True)}
                for _ in range(_WARMUP):
                    session.run(None, feed)
                runs.append((session, feed))
        seconds: list[list[float]] = [[] for _ in runs]
        for r in range(rounds or self.rounds):
            for j in _rotated(len(runs), r):
                session, feed = runs[j]
                start = time.perf_counter()
                session.run(None, feed)
                seconds[j].append(time.perf_counter() - start)
        tails = [float(np.percentile(s, _QUANTILE)) * 1e6 for s in seconds]
        return {p.key: (tails[2 * j], tails[2 * j + 1]) for j, p in enumerate(points)}

    def measure(self, models: Mapping[str, nn.Module], example_inputs: tuple[Any, ...]) -> dict[str, Timing]:
        """Export every model to ONNX (checked against torch) and time them interleaved over :data:`_SESSIONS`
        sessions of each: :data:`_MIN_ROUNDS` rounds, or as many as fit in about :data:`_MEASURE_S` seconds (at most
        300), so that fast models get steadier tails. A model's ratio is its 10th-percentile time over the first
        model's (:attr:`~fxmorph.io.latency.ModelLatency.steady_ratio`)."""
        with tempfile.TemporaryDirectory(prefix="fxmorph-latency-") as workdir:
            exported = {n: export_onnx(m, example_inputs, Path(workdir) / f"{n}.onnx") for n, m in models.items()}
            probe = measure_latency(exported, example_inputs, threads=self.threads, rounds=3, warmup=3)
            per_round = sum(m.median_ms for m in probe.models) / 1e3
            rounds = min(300, max(_MIN_ROUNDS, int(_MEASURE_S / max(per_round, 1e-6))))
            report = measure_latency(
                exported, example_inputs, threads=self.threads, rounds=rounds, warmup=5, sessions=_SESSIONS
            )
        return {m.name: Timing(m.median_ms, m.steady_ratio, m.paired_ratio) for m in report.models}


def _memory_points() -> dict[MemoryClass, list[_Point]]:
    """Every memory-bound kind's graphs at the sizes of :data:`_MEMORY_SIZES`."""
    out = {}
    for kind in MemoryClass:
        out[kind] = []
        for channels, side in _MEMORY_SIZES:
            one, shapes, count = memory_graph(kind, channels, side)
            copies = memory_graph(kind, channels, side, _COPIES)[0]
            out[kind].append(_Point(f"{kind.value}|{channels}x{side}", one, copies, shapes, count))
    return out


def _missing_points(kernel: Kernel, grid: tuple[tuple[int, ...], ...], missing: set[str]) -> list[_Point]:
    """The graphs of ``kernel``'s grid points that are ``missing``."""
    keys = ((w, _point_key(kernel, w)) for w in product(*grid))
    return [_kernel_point(key, kernel, w) for w, key in keys if key in missing]


def _kernel_point(key: str, kernel: Kernel, widths: tuple[int, ...]) -> _Point:
    """The point of ``kernel`` at ``widths``: one copy and :data:`_COPIES`."""
    one, copies = kernel_graph(kernel, widths), kernel_graph(kernel, widths, _COPIES)
    return _Point(key, one, copies, input_shapes(kernel, widths))


def _product_points() -> list[_Point]:
    """The batched products of two activations of :data:`_PRODUCTS`; ``elements`` holds their FLOPs."""
    points = []
    for b, m, k, n in _PRODUCTS:
        one, shapes, flops = product_graph(b, m, k, n)
        points.append(_Point(f"matmul|{b}x{m}x{k}x{n}", one, product_graph(b, m, k, n, _COPIES)[0], shapes, flops))
    return points


def _flop_us(points: list[_Point], micros: Mapping[str, float]) -> float:
    """Microseconds per FLOP of batched products of two activations (the median over :func:`_product_points`)."""
    return float(np.median([micros[p.key] / p.elements for p in points]))


def _block_points() -> list[_Point]:
    """1x1 convolutions of 64 input channels at 56x56 to :data:`_BLOCK_PROBE` output channels."""
    kernel = Kernel(KernelKind.CONV, 1, (56, 56), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))
    return [_kernel_point(f"block|{out}", kernel, (64, out)) for out in _BLOCK_PROBE]


def _block(points: list[_Point], micros: Mapping[str, float]) -> int:
    """The channel block of the blocked (NCHWc) convolutions: 16 where a 1x1 convolution of 24 output channels
    takes about as long as one of 32 (AVX-512), else 1 (AVX2's block of 8 divides the grid's multiples of 16, and a
    runtime without blocks is linear: interpolating between grid points prices both)."""
    t16, t24, t32 = (micros[p.key] for p in points)
    return 16 if t32 > t16 and (t24 - t16) > 0.75 * (t32 - t16) else 1


def _fitted(points: list[_Point], micros: Mapping[str, float]) -> tuple[float, float]:
    """A memory-bound kind's fixed time and time per element, fitted to its points' times."""
    x = np.array([p.elements for p in points], dtype=np.float64)
    y = np.array([micros[p.key] for p in points])
    # fitted for relative error: absolute least squares follows the largest sizes and leaves the fixed time (what a
    # narrow cut's many small ops pay) to chance, three times too high on a 2-core EPYC
    slope, fixed = np.polyfit(x, y, 1, w=1.0 / np.maximum(y, 1e-3))
    return max(float(fixed), 0.0), max(float(slope), 0.0)


def _chunks(points: list[_Point]) -> Iterator[list[_Point]]:
    """``points`` in runs of graphs of at most :data:`_CHUNK_BYTES` in all, each run timed interleaved on its own."""
    chunk: list[_Point] = []
    size = 0
    for p in points:
        if chunk and size + len(p.one) + len(p.copies) > _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += len(p.one) + len(p.copies)
    if chunk:
        yield chunk


def _marginal(one: float, copies: float) -> float:
    """What one op costs inside a model: the graph of :data:`_COPIES` copies less the graph of one, per extra copy
    (never below zero: an op too small to tell from the noise costs nothing)."""
    return max(copies - one, 0.0) / (_COPIES - 1)


def _point_key(kernel: Kernel, widths: tuple[int, ...]) -> str:
    return f"{kernel.key()}|{'x'.join(map(str, widths))}"


def _rotated(count: int, shift: int) -> Iterator[int]:
    """``0 .. count-1`` starting at ``shift``: each round starts with another point, so drift falls on all alike."""
    for j in range(count):
        yield (j + shift) % count


register_runtime("onnxruntime", lambda threads: OnnxRuntimeCPU(threads=threads))
