"""Where the latency model errs (issue 17): its tables against the ops' time inside the model, original and cut.

    python -m benchmarks.latency_model                               # mobilenet_v2 and efficientnet_b0
    python -m benchmarks.latency_model --models resnet50 --levels 0.5

For each torchvision model (random weights, 1x3x224x224, onnxruntime's CPU provider, 2 threads), the original and
its FLOPs-budget cuts (``fxmorph.shrink(budget_flops=f)``, defaults) are

1. predicted by the latency model (:class:`~fxmorph.analysis.latency.LatencyFunction`, tables measured op by op),
   as a share of the original's prediction;
2. measured together, interleaved (:meth:`~fxmorph.io.latency_profile.OnnxRuntimeCPU.measure`, twice, the mean of
   the two ratios);
3. run with onnxruntime's profiler, whose kernel times are summed per kind of op (depthwise and other convolutions
   by kernel size, products with a weight, concatenations, everything else) beside what the tables predict for the
   same ops.

A model whose prediction for a cut is too slow shows where in the per-kind rows: the ops whose time inside the
model falls further than their tables do. *Per kind* predicts the cuts again with every kind's tables scaled to its
time inside the original (what calibrating the tables op by op on the original would give).

``--param-costs`` adds what pricing the weights beside the tables does to the cut a latency budget selects: for each
cost (FLOPs per parameter, as ``fxmorph.shrink``'s ``param_cost``; a latency budget uses 0), the widths
:func:`~fxmorph.passes.select.greedy_widths` chooses at ``--shares`` of the original's predicted latency (no
correction rounds), measured with FLOPs-budget cuts at 30..80% and compared with them at equal measured latency.
``--param-values`` does the same for what the weights a step takes count for beside its FLOPs (``param_value``, as a
share of the model's FLOPs per parameter; a latency budget selects at each of
:data:`~fxmorph.passes.select_latency.DEFAULT_PARAM_VALUES`), and ``--balances`` for how evenly it thins
(``balance``, :data:`~fxmorph.passes.select.DEFAULT_LATENCY_BALANCE`); the settings not varied are a latency
budget's, at a parameter value of :data:`PARAM_VALUE` (the ``--param-costs`` rows value no parameters). Written to
``LATENCY_MODEL.md`` and ``latency_model.json``; a run keeps the sections it does not measure (``--levels`` alone,
with no level, profiles no cuts) and the cuts of the models it does not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import fx, nn

import fxmorph
from benchmarks.common import at_latency, build, count
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.kernels import Kernel, KernelKind
from fxmorph.analysis.latency import (
    LatencyBudget,
    LatencyFunction,
    RuntimeProfile,
    fused_nodes,
    kernels_of,
    layout_width,
    memory_class,
)
from fxmorph.analysis.ops import node_facts
from fxmorph.io.latency import session_options
from fxmorph.io.latency_profile import OnnxRuntimeCPU
from fxmorph.meta import tensor_shape
from fxmorph.passes.importance import importance
from fxmorph.passes.keep import keep_best
from fxmorph.passes.protect import free_group_ids
from fxmorph.passes.select import DEFAULT_LATENCY_BALANCE, DEFAULT_ROUND_TO, greedy_widths
from fxmorph.passes.uniform import width_classes
from fxmorph.surgery.apply import apply_plan

HERE = Path(__file__).parent
THREADS = 2
PROFILED_RUNS = 40
FLOPS_LEVELS = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
PARAM_VALUE = 0.08
"""The parameter value the rows of the other knobs hold (a latency budget selects at each of
:data:`~fxmorph.passes.select_latency.DEFAULT_PARAM_VALUES` and keeps one: these rows show one selection)."""
logger = logging.getLogger("benchmarks.latency_model")

Knob = Literal["param_cost", "param_value", "balance"]
"""The setting ``--param-costs``, ``--param-values`` and ``--balances`` vary
(:func:`~fxmorph.passes.select.greedy_widths`)."""


def _kind(kernel: Kernel | None) -> str:
    """The row a table's op is summed in."""
    if kernel is None:
        return "other"
    if kernel.kind is KernelKind.GEMM:
        return "product"
    size = "x".join(map(str, kernel.kernel))
    return f"depthwise {size}" if kernel.kind is KernelKind.DEPTHWISE else f"conv {size}"


def _event_kind(args: dict[str, Any]) -> str:
    """The row an onnxruntime kernel event is summed in (its op and the shapes of its inputs; a weight the kernel
    packed ahead is not listed)."""
    shapes = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
    op = args.get("op_name")
    if op == "Conv" and len(shapes) >= 2 and len(shapes[1]) == 4:
        x, w = shapes[0], shapes[1]
        size = f"{w[2]}x{w[3]}"
        if w[1] == 1 and x[1] > 1:
            # a batch norm the runtime could not fold runs as a 1x1 convolution per channel: a memory-bound op
            return "other" if size == "1x1" else f"depthwise {size}"
        return f"conv {size}"
    if op == "Gemm" or (op in ("MatMul", "FusedMatMul") and (len(shapes) == 1 or len(shapes[1]) == 2)):
        return "product"
    return "concat" if op == "Concat" else "other"


def predicted_by_kind(gm: fx.GraphModule, profile: RuntimeProfile) -> dict[str, float]:
    """The tables' microseconds per kind of op, and the rest of the model's prediction as ``other``."""
    cost = CostModel(build_channel_graph(gm))
    total = LatencyFunction(cost, profile)(cost.widths())
    out: dict[str, float] = defaultdict(float)
    for term in cost.cg.costs:
        if term.kernel is None or term.kernel not in profile.tables:
            continue
        sizes = [a if isinstance(a, int) else layout_width(cost.cg, a) for a in term.axes]
        out[_kind(term.kernel)] += float(profile.tables[term.kernel].at(np.asarray(sizes, dtype=float)[:, None])[0])
    out["concat"] = _concatenations_us(cost, profile)
    out["other"] = total - sum(out.values())
    return dict(out)


def _concatenations_us(cost: CostModel, profile: RuntimeProfile) -> float:
    """What the memory costs price the graph's concatenations at (ops that join tensors, priced as copies)."""
    gm = cost.cg.gm
    skip = {t.node for t in cost.cg.costs} | fused_nodes(cost.cg)
    total = 0.0
    for node in gm.graph.nodes:
        kind = memory_class(node, gm, skip)
        shape = tensor_shape(node)
        if kind is None or kind not in profile.memory or shape is None or not node_facts(node, gm).joins:
            continue
        total += profile.memory[kind].fixed_us + profile.memory[kind].element_us * math.prod(shape)
    return total


def profiled_by_kind(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """onnxruntime's kernel microseconds per run and kind of op (the median run of each node)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = fxmorph.export_onnx(model, (x,), Path(tmp) / "m.onnx").path
        options = session_options(THREADS, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(PROFILED_RUNS):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node[e["name"]].append(float(e["dur"]))
            kinds[e["name"]] = _event_kind(e["args"])
    out: dict[str, float] = defaultdict(float)
    for name, times in per_node.items():
        out[kinds[name]] += float(np.median(times[PROFILED_RUNS // 5 :]))  # past the first runs' allocations
    return dict(out)


def run_model(name: str, levels: tuple[float, ...]) -> dict[str, Any]:
    """The predicted and measured shares of every cut, and the per-kind times of the original and each cut."""
    torch.manual_seed(0)
    model, x = build(name), torch.randn(1, 3, 224, 224)
    runtime = OnnxRuntimeCPU(threads=THREADS)
    models: dict[str, nn.Module] = {"original": fxmorph.trace(model, (x,))}
    for level in levels:
        models[f"flops {level:g}"] = fxmorph.trace(fxmorph.shrink(model, example_inputs=x, budget_flops=level), (x,))
    profile = runtime.profile(kernels_of(build_channel_graph(models["original"])))  # covers every cut's widths
    ratios = _measured(models, x, runtime)
    rows = []
    for key, gm in models.items():
        logger.info("%s %s: profiling", name, key)
        rows.append(
            {
                "variant": key,
                "measured": ratios[key],
                "predicted_us": predicted_by_kind(gm, profile),
                "profiled_us": profiled_by_kind(gm, x),
            }
        )
    return {"model": name, "rows": rows}


def _measured(models: dict[str, nn.Module], x: torch.Tensor, runtime: OnnxRuntimeCPU) -> dict[str, float]:
    """Every model's ratio to the first, the mean of two interleaved measurements."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for _ in range(2):
        for key, timing in runtime.measure(models, (x,)).items():
            ratios[key].append(timing.ratio)
    return {key: float(np.mean(values)) for key, values in ratios.items()}


def selections(name: str, knob: Knob, values: tuple[float, ...], shares: tuple[float, ...]) -> list[dict[str, Any]]:
    """The latency selection at every value of ``knob`` and share, and the FLOPs-budget cuts, measured together."""
    if not values:
        return []
    torch.manual_seed(0)
    model, x = build(name), torch.randn(1, 3, 224, 224)
    runtime = OnnxRuntimeCPU(threads=THREADS)
    gm = fxmorph.trace(model, (x,))
    cg = build_channel_graph(gm)
    cost = CostModel(cg)
    profile = runtime.profile(kernels_of(cg))
    total, flops, params = LatencyFunction(cost, profile)(cost.widths()), cost.flops(), cost.params()
    scores = importance(cg, "l1", seed=0)
    classes, free = width_classes(cg, free_group_ids(cg, ()), False)
    models: dict[str, nn.Module] = {"original": gm}
    points: dict[str, dict[str, float]] = {}
    for value in values:
        # the knob set, the others at what a latency budget uses (a parameter cost's rows value no parameters)
        knobs = {
            "param_cost": 0.0,
            "param_value": 0.0 if knob == "param_cost" else PARAM_VALUE,
            "balance": DEFAULT_LATENCY_BALANCE,
            knob: value,
        }
        for share in shares:
            priced, budget = LatencyBudget(share * total, profile).priced(cost, flops)
            scored = {g: scores[g] for g in free}
            widths = greedy_widths(priced, scored, budget, DEFAULT_ROUND_TO, 0, classes=classes, **knobs)
            key = f"latency {value:g} {share:g}"
            models[key] = apply_plan(gm, cg, keep_best(cg, widths, scores), seed=0)
            points[key] = {"flops": cost.flops(widths) / flops, "params": cost.params(widths) / params}
            points[key]["gone"] = int((widths == 0).sum())
    for level in FLOPS_LEVELS:
        small = fxmorph.shrink(model, example_inputs=x, budget_flops=level)
        models[f"flops {level:g}"] = small
        counted = count(small, x)
        points[f"flops {level:g}"] = {"flops": counted["flops"] / flops, "params": counted["params"] / params}
    ratios = _measured(models, x, runtime)
    curve = [{"ratio": ratios[k], **points[k]} for k in points if k.startswith("flops")]
    out = []
    for key in (k for k in points if k.startswith("latency")):
        _, value, share = key.split()
        ratio = ratios[key]
        out.append(
            {
                "model": name,
                knob: float(value),
                "share": float(share),
                "measured": ratio,
                **points[key],
                "flops_budget_flops": at_latency(curve, ratio, "flops"),
                "flops_budget_params": at_latency(curve, ratio, "params"),
            }
        )
    return out


def _kind_factors(original: dict[str, Any]) -> dict[str, float]:
    """Per kind of op, its time inside the original over its tables' time."""
    predicted, profiled = original["predicted_us"], original["profiled_us"]
    return {k: profiled[k] / v for k, v in predicted.items() if v > 0 and profiled.get(k, 0.0) > 0}


_TITLES: dict[Knob, str] = {
    "param_cost": "## Pricing the weights beside the tables",
    "param_value": "## Valuing the weights a step takes",
    "balance": "## How evenly a latency budget thins",
}


def _selection_lines(rows: list[dict[str, Any]], knob: Knob) -> list[str]:
    """The ``--param-costs``, ``--param-values`` or ``--balances`` table: each latency selection beside the
    FLOPs-budget curve at its measured latency."""
    lines = [
        _TITLES[knob],
        "",
        f"| model | {knob} | share aimed | measured | FLOPs kept: latency / FLOPs budget | params kept: latency / "
        "FLOPs budget | gone |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        fb = "-" if r["flops_budget_flops"] is None else f"{r['flops_budget_flops']:.1%}"
        pb = "-" if r["flops_budget_params"] is None else f"{r['flops_budget_params']:.1%}"
        gone = r.get("gone", "-")  # not recorded before param values were
        lines.append(
            f"| {r['model']} | {r[knob]:g} | {r['share']:.0%} | {r['measured']:.1%} | {r['flops']:.1%} / {fb} "
            f"| {r['params']:.1%} / {pb} | {gone} |"
        )
    return [*lines, ""]


def summarize(results: list[dict[str, Any]], out: Path, selected: dict[Knob, list[dict[str, Any]]]) -> None:
    """``LATENCY_MODEL.md``: per model, each cut's predicted and measured share, then per kind of op the tables'
    time and the profiled time, and what share of the original's each keeps in the deepest cut."""
    lines = [
        "# The latency model's tables against the ops' time inside the model",
        "",
        "Command: `python -m benchmarks.latency_model` (raw numbers in `latency_model.json`; how they are taken in "
        "the script's docstring). *Predicted* is the latency model's time for the cut over its time for the "
        "original; *measured*, the two models' ratio in an interleaved measurement. Per kind of op: the tables' "
        "microseconds and onnxruntime's profiled kernel microseconds (a profiled run is slower than a plain one), "
        "for the original and the deepest cut, and the share of the original's time each keeps. A run rewrites only "
        "what it measures, so sections may come from different runs and tables (`RESULTS.md` dates each).",
        "",
    ]
    for result in results:
        rows = result["rows"]
        original, deepest = rows[0], rows[-1]
        total = sum(original["predicted_us"].values())
        factors = _kind_factors(original)
        calibrated_total = sum(v * factors.get(k, 1.0) for k, v in original["predicted_us"].items())
        lines += [
            f"## {result['model']}",
            "",
            "| cut | measured | predicted | error | per kind | error |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in rows[1:]:
            measured = row["measured"]
            predicted = sum(row["predicted_us"].values()) / total
            calibrated = sum(v * factors.get(k, 1.0) for k, v in row["predicted_us"].items()) / calibrated_total
            lines.append(
                f"| {row['variant']} | {measured:.3f} | {predicted:.3f} | {(predicted - measured) / measured:+.1%} "
                f"| {calibrated:.3f} | {(calibrated - measured) / measured:+.1%} |"
            )
        lines += [
            "",
            f"| ops | tables, original us | in the model, original us | tables keep in {deepest['variant']} "
            "| in the model keeps |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind in sorted(set(original["predicted_us"]) | set(original["profiled_us"])):
            p0, m0 = original["predicted_us"].get(kind, 0.0), original["profiled_us"].get(kind, 0.0)
            p1, m1 = deepest["predicted_us"].get(kind, 0.0), deepest["profiled_us"].get(kind, 0.0)
            keep_p = f"{p1 / p0:.2f}" if p0 > 0 else "-"
            keep_m = f"{m1 / m0:.2f}" if m0 > 0 else "-"
            lines.append(f"| {kind} | {p0:.0f} | {m0:.0f} | {keep_p} | {keep_m} |")
        lines.append("")
    for knob, rows in selected.items():
        if rows:
            lines += _selection_lines(rows, knob)
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=("mobilenet_v2", "efficientnet_b0"))
    parser.add_argument("--levels", nargs="*", type=float, default=(0.7, 0.5, 0.3))
    parser.add_argument("--param-costs", nargs="*", type=float, default=())
    parser.add_argument("--param-values", nargs="*", type=float, default=())
    parser.add_argument("--balances", nargs="*", type=float, default=())
    parser.add_argument("--shares", nargs="*", type=float, default=(0.5, 0.6, 0.73))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    path = HERE / "latency_model.json"
    # a run keeps the sections it does not measure (``--levels`` with no level: no cuts profiled), and the cuts of the
    # models it does not run
    kept = json.loads(path.read_text()) if path.exists() else {}
    results = kept.get("cuts", [])
    if args.levels:
        results = [r for r in results if r["model"] not in args.models]
        results += [run_model(name, tuple(args.levels)) for name in args.models]
    selected: dict[Knob, list[dict[str, Any]]] = {}
    knobs: tuple[tuple[Knob, list[float]], ...] = (
        ("param_cost", args.param_costs),
        ("param_value", args.param_values),
        ("balance", args.balances),
    )
    for knob, values in knobs:
        rows = [r for name in args.models for r in selections(name, knob, tuple(values), tuple(args.shares))]
        selected[knob] = rows or kept.get(f"{knob}s", [])
    path.write_text(json.dumps({"cuts": results, **{f"{k}s": v for k, v in selected.items()}}, indent=1))
    summarize(results, HERE / "LATENCY_MODEL.md", selected)


if __name__ == "__main__":
    main()
