"""Measure and compare the CPU latency of ONNX models in onnxruntime, fairly.

Every model gets its own session with the same fixed thread counts and graph optimisations. After a
warm-up the models run **interleaved**: round ``r`` runs every model once, in the model order rotated
by ``r``, so slow drift of the machine (frequency scaling, other processes, thermal throttling) hits
all models alike instead of whichever happened to be measured last. Each model's samples give its
median, 90th percentile and minimum; ``ratio`` is its median over the first (baseline) model's median
and ``paired_ratio`` the median over rounds of its time over the baseline's time in the same round,
which cancels drift further. ``steady_ratio`` is its 10th-percentile time over the baseline's: on a shared
machine whose neighbours take memory bandwidth and cores for seconds at a time, both models run slower in those
seconds and not alike, and the median of per-round ratios moves with how much of the measurement they cover (a cut
of mobilenet_v2 at a third of its latency: 0.362 to 0.372 over eight quiet measurements, 0.337 to 0.368 over six
in a busy minute), where the ratio of the fast tails holds (0.361 to 0.363, and 0.358 to 0.370). Like ``timeit``'s
advice to read the fastest runs, it measures what the model costs, not what the neighbours cost it.

Idle onnxruntime workers normally spin for a while after a run, waiting for more work. With several
sessions interleaved that is unfair: the workers of the model that just ran still occupy cores while
the next model starts. On a 2-core machine, timing resnet18 interleaved with two other sessions gave a
median of 24 to 30 ms with spinning against 3.7 ms without (about 3 ms alone), and shifted a
mobilenet's ratio to it from about 0.3 to 0.04. Spinning is therefore off by default
(``allow_spinning=False``); absolute times may be slightly higher than an ORT default session's.

Where a session's buffers land in memory changes its speed by a few percent, for as long as it lives: a cut of
mobilenet_v2 measured 0.508 to 0.524 of the original over eight pairs of fresh sessions, and 0.519 to 0.523 over
eight measurements of one pair. ``sessions=k`` loads every model ``k`` times and the rounds take the copies in
turn; a model's ``paired_ratio`` is then the mean over copies of each copy's median ratio, so that it measures the
model rather than one placement.
"""

from __future__ import annotations

import inspect
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from fxmorph.errors import InputError
from fxmorph.io.export import ExportResult, export_onnx
from fxmorph.validate import check_count, check_model, check_options, check_tensor_inputs

__all__ = ["LatencyReport", "ModelLatency", "compare_latency", "measure_latency", "session_options"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | ExportResult


@dataclass(frozen=True)
class ModelLatency:
    """One model's timings in milliseconds (one sample per round) and its ratios to the baseline."""

    name: str
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    ratio: float
    paired_ratio: float
    p10_ms: float
    """The 10th percentile of the samples: the model's time while nothing else holds the machine."""
    steady_ratio: float
    """``p10_ms`` over the baseline's (see the module docstring)."""
    samples_ms: tuple[float, ...]


@dataclass(frozen=True)
class LatencyReport:
    """The result of :func:`measure_latency` together with every parameter it ran under."""

    models: tuple[ModelLatency, ...]
    baseline: str
    threads: int
    inter_op_threads: int
    warmup: int
    rounds: int
    repeats_per_round: int
    graph_optimization: str
    allow_spinning: bool
    ort_version: str
    provider: str
    machine: str
    sessions: int = 1
    """How many copies of every model's session the rounds took in turn."""

    def __getitem__(self, name: str) -> ModelLatency:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r} in this report; models: {[m.name for m in self.models]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of the report (samples as lists)."""
        data = asdict(self)
        data["models"] = [{**m, "samples_ms": list(m["samples_ms"])} for m in data["models"]]
        return data

    def table(self) -> str:
        """A fixed-width text table, one line per model, with the parameters in a header line."""
        width = max(8, *(len(m.name) for m in self.models))
        lines = [
            f"onnxruntime {self.ort_version} {self.provider}, {self.threads} intra-op thread(s), "
            f"{self.inter_op_threads} inter-op, {self.graph_optimization}, "
            f"spinning {'on' if self.allow_spinning else 'off'}, warm-up {self.warmup}, "
            f"{self.rounds} interleaved rounds x {self.repeats_per_round}"
            + (f" over {self.sessions} sessions each" if self.sessions > 1 else ""),
            f"{'model':<{width}}  {'median ms':>10}  {'p90 ms':>10}  {'min ms':>10}  {'ratio':>7}  {'paired':>7}  "
            f"{'steady':>7}",
        ]
        for m in self.models:
            lines.append(
                f"{m.name:<{width}}  {m.median_ms:>10.3f}  {m.p90_ms:>10.3f}  {m.min_ms:>10.3f}  "
                f"{m.ratio:>7.3f}  {m.paired_ratio:>7.3f}  {m.steady_ratio:>7.3f}"
            )
        return "\n".join(lines)


def _level(level: ort.GraphOptimizationLevel | str) -> ort.GraphOptimizationLevel:
    """An onnxruntime optimisation level from itself or a name (``"all"``, ``"basic"``, ``"disable_all"``,
    ``"ORT_ENABLE_ALL"``)."""
    if isinstance(level, ort.GraphOptimizationLevel):
        return level
    key = str(level).upper()
    key = key if key.startswith("ORT_") else f"ORT_ENABLE_{key}" if key != "DISABLE_ALL" else "ORT_DISABLE_ALL"
    try:
        return ort.GraphOptimizationLevel.__members__[key]
    except KeyError:
        raise InputError(
            f"unknown graph optimisation level {level!r}: use one of {sorted(ort.GraphOptimizationLevel.__members__)}."
        ) from None


def _session(name: str, source: ModelSource, options: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session for ``source`` (a path, bytes or an :class:`ExportResult`); :class:`InputError` where it
    cannot load."""
    if isinstance(source, ExportResult):
        source = source.path
    if not isinstance(source, str | os.PathLike | bytes):
        fix = " (export it first with fxmorph.export_onnx)" if isinstance(source, nn.Module) else ""
        raise InputError(
            f"model {name!r} is a {type(source).__name__}: pass the path of an .onnx file, its bytes, or the "
            f"ExportResult of fxmorph.export_onnx{fix}."
        )
    model = source if isinstance(source, bytes) else str(Path(source))
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        what = "the ONNX bytes" if isinstance(source, bytes) else f"the file {source}"
        raise InputError(
            f"onnxruntime cannot load model {name!r} from {what} ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}): pass a path to a valid .onnx file or its bytes."
        ) from exc


def _array(value: Any) -> np.ndarray:
    """One input value as a numpy array (a tensor moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        check_tensor_inputs((value,), what="input")
        return value.detach().cpu().numpy()
    if value is None:
        raise InputError("an input is None: pass one tensor or array per model input.")
    return np.asarray(value)


def _feed(name: str, session: ort.InferenceSession, inputs: Any) -> dict[str, np.ndarray]:
    """The input feed of ``session``: ``inputs`` by name, or in order, as numpy arrays."""
    wanted = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [n for n in wanted if n not in inputs]
        if missing:
            raise InputError(f"model {name!r} needs inputs {wanted}; the inputs mapping lacks {missing}.")
        return {n: _array(inputs[n]) for n in wanted}
    if not isinstance(inputs, torch.Tensor | np.ndarray | Sequence):
        raise InputError(
            f"inputs must be a tensor, an array, a sequence of them or a mapping from input name to "
            f"array, got {type(inputs).__name__}."
        )
    values = [inputs] if isinstance(inputs, torch.Tensor | np.ndarray) else list(inputs)
    if len(values) != len(wanted):
        raise InputError(
            f"model {name!r} takes {len(wanted)} input(s) {wanted} but {len(values)} were given: pass one "
            "array per input, in order, or a mapping from input name to array."
        )
    return {n: _array(v) for n, v in zip(wanted, values, strict=True)}


def measure_latency(
    models: Mapping[str, ModelSource],
    inputs: Any,
    *,
    threads: int | None = None,
    warmup: int = 10,
    rounds: int = 30,
    repeats_per_round: int = 1,
    graph_optimization: ort.GraphOptimizationLevel | str = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    allow_spinning: bool = False,
    sessions: int = 1,
) -> LatencyReport:
    """Time every ONNX model of ``models`` (name to path, bytes or :class:`ExportResult`) on ``inputs``.

    ``inputs`` is one tensor or array, a sequence of them (one per model input, in order) or a
    mapping from input name to value; every model is fed the same values. The first model is the
    baseline of the ratios. ``threads`` is the intra-op thread count (default: every core); the
    inter-op count is 1. Each model first runs ``warmup`` times (at least once, which also checks the
    inputs), then ``rounds`` interleaved rounds time ``repeats_per_round`` consecutive runs each and
    keep their mean as one sample. ``allow_spinning=True`` lets idle workers spin, and ``sessions`` loads
    every model that many times, the rounds taking the copies in turn (see the module docstring for both).
    Raises :class:`fxmorph.errors.InputError` for a file onnxruntime cannot load or inputs a model cannot run
    on.
    """
    _check_models(models)
    check_count("warmup", warmup, 0)
    check_count("rounds", rounds, 1)
    check_count("repeats_per_round", repeats_per_round, 1)
    check_count("sessions", sessions, 1)
    threads = check_count("threads", threads, 1) if threads is not None else os.cpu_count() or 1
    level = _level(graph_optimization)
    options = session_options(threads, level, allow_spinning)
    names = list(models)
    copies = [{n: _session(n, models[n], options) for n in names} for _ in range(sessions)]
    feeds = {n: _feed(n, copies[0][n], inputs) for n in names}
    for copy in copies:
        _warm_up(copy, feeds, warmup)
    samples = _interleaved(copies, feeds, rounds, repeats_per_round)
    results = _summaries(samples, len(copies))
    return LatencyReport(
        models=tuple(results),
        baseline=names[0],
        threads=threads,
        inter_op_threads=1,
        warmup=warmup,
        rounds=rounds,
        repeats_per_round=repeats_per_round,
        graph_optimization=level.name,
        allow_spinning=allow_spinning,
        ort_version=ort.__version__,
        provider="CPUExecutionProvider",
        machine=f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cores",
        sessions=sessions,
    )


def _check_models(models: Any) -> None:
    """``models`` is a non-empty mapping."""
    if not isinstance(models, Mapping):
        raise InputError(
            f"models must be a mapping from a name to a model, got {type(models).__name__}: pass for example "
            "{'original': 'original.onnx', 'shrunk': 'shrunk.onnx'}."
        )
    if not models:
        raise InputError("measure_latency needs at least one model: pass {'name': 'model.onnx', ...}.")


def session_options(threads: int, level: ort.GraphOptimizationLevel, allow_spinning: bool) -> ort.SessionOptions:
    """The options every session shares, so that the models differ only in their graphs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one op at a time: the intra-op count is the only parallelism measured
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = level
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


def _warm_up(sessions: dict[str, ort.InferenceSession], feeds: dict[str, Any], warmup: int) -> None:
    """Run every model ``warmup`` times (at least once: the first run also checks the inputs)."""
    for n, session in sessions.items():
        try:
            session.run(None, feeds[n])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(
                f"model {n!r} does not run on the given inputs ({type(exc).__name__}: {str(exc).strip()[:300]}): "
                "check their shapes and dtypes."
            ) from exc
    for _ in range(max(warmup - 1, 0)):
        for n, session in sessions.items():
            session.run(None, feeds[n])


def _interleaved(
    copies: list[dict[str, ort.InferenceSession]], feeds: dict[str, Any], rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Milliseconds per run of each model, one sample per round; the models take turns, starting one
    later each round, so drift in the machine's speed (heat, other load) falls on all of them alike. Round ``r``
    runs the sessions of copy ``r % len(copies)``, and the order turns once all copies have run in it, so that every
    copy runs in every order (a model run just after a large one finds the caches cold)."""
    names = list(feeds)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = (r // len(copies)) % len(names)
        sessions = copies[r % len(copies)]
        for n in names[shift:] + names[:shift]:
            session, feed = sessions[n], feeds[n]
            # One clock read around all repeats: the timer's own cost is not in each run.
            start = time.perf_counter_ns()
            for _ in range(repeats):
                session.run(None, feed)
            samples[n].append((time.perf_counter_ns() - start) / 1e6 / repeats)
    return samples


def _summaries(samples: dict[str, list[float]], copies: int = 1) -> list[ModelLatency]:
    """Median, spread and ratios of each model; the first model is the baseline. With several ``copies`` of
    the sessions (taken in turn by the rounds), the paired ratio is the mean over copies of each one's."""
    names = list(samples)
    base = np.asarray(samples[names[0]])
    base_median = float(np.median(base))
    base_p10 = float(np.percentile(base, 10))
    results = []
    for n in names:
        s = np.asarray(samples[n])
        median = float(np.median(s))
        per_round = s / base  # per round: the models ran side by side
        paired = np.mean([np.median(per_round[c::copies]) for c in range(min(copies, len(s)))])
        results.append(
            ModelLatency(
                name=n,
                median_ms=median,
                p90_ms=float(np.percentile(s, 90)),
                min_ms=float(s.min()),
                mean_ms=float(s.mean()),
                ratio=median / base_median,
                paired_ratio=float(paired),
                samples_ms=tuple(float(v) for v in s),
                p10_ms=float(np.percentile(s, 10)),
                steady_ratio=float(np.percentile(s, 10)) / base_p10,
            )
        )
        logger.info("%s: median %.3f ms, p90 %.3f ms, ratio %.3f", n, median, results[-1].p90_ms, results[-1].ratio)
    return results


# Read from the signatures, so the check of compare_latency's options never lags behind a new keyword.
_LATENCY_OPTIONS = tuple(inspect.signature(measure_latency).parameters)[2:]  # after models, inputs
_EXPORT_OPTIONS = tuple(inspect.signature(export_onnx).parameters)[3:]  # after model, example_inputs, path


def compare_latency(
    original_model: nn.Module,
    shrunk_model: nn.Module,
    example_inputs: Any,
    workdir: str | Path,
    *,
    export_kwargs: Mapping[str, Any] | None = None,
    **kw: Any,
) -> LatencyReport:
    """Export both models with :func:`fxmorph.io.export.export_onnx` into ``workdir`` (as
    ``original.onnx`` and ``shrunk.onnx``, checked against torch) and measure them with
    :func:`measure_latency` on ``example_inputs``; ``original`` is the baseline of the ratios.
    ``export_kwargs`` go to the exports, every other keyword to :func:`measure_latency`; an unknown option
    raises :class:`InputError` before anything is written."""
    for model in (original_model, shrunk_model):
        check_model(model)
    export_kwargs = dict(export_kwargs or {})
    check_options("export_kwargs", export_kwargs, _EXPORT_OPTIONS.__contains__, _EXPORT_OPTIONS)
    check_options("measure_latency", kw, _LATENCY_OPTIONS.__contains__, _LATENCY_OPTIONS)
    if not isinstance(workdir, str | os.PathLike):
        raise InputError(f"workdir must be a directory path, got {type(workdir).__name__}.")
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"workdir {workdir} is a file, not a directory: pass a directory for the two .onnx files.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"workdir {workdir} cannot be created ({exc.strerror or exc}).") from exc
    exported = {
        name: export_onnx(model, example_inputs, workdir / f"{name}.onnx", **export_kwargs)
        for name, model in (("original", original_model), ("shrunk", shrunk_model))
    }
    inputs: Sequence[Any] = example_inputs if isinstance(example_inputs, list | tuple) else (example_inputs,)
    return measure_latency(exported, tuple(inputs), **kw)
