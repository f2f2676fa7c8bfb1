"""Latency budgets (issue 17): measured latency against the budget, and what each method keeps at equal latency.

    python -m benchmarks.latency_budget                                   # 6 models x 3 budgets (about 40 min)
    python -m benchmarks.latency_budget --models resnet50 --budgets 0.5   # one case
    python -m benchmarks.latency_budget --summarize                       # LATENCY_BUDGET.md and the plot again
    python -m benchmarks.latency_budget --models densenet121 --budgets 0.5 --latency-keep flops  # a row of its own

For each torchvision model (random weights, 1x3x224x224, onnxruntime's CPU provider with 2 threads):

1. the latency model's tables are built into an empty cache and then read from it, both timed;
2. ``fxmorph.shrink(budget_latency=b, min_width=0)`` for every budget ``b``: each round's predicted and measured
   latency (``min_width=0`` lets groups go whole where that is exact: densenet121's dense layers; none of the other
   five models has such a group, ``--min-width 1`` keeps every group);
3. FLOPs-budget cuts (``fxmorph.shrink(budget_flops=f)``, defaults) at 10..90% of the FLOPs, and Torch-Pruning
   (``MagnitudePruner``, one ratio for every layer, :mod:`benchmarks.tp_adapter`) at ratios 0.1..0.8;
4. everything exported to ONNX and measured together, interleaved (40 rounds after 10 warm-up runs; a model's
   latency is its 10th-percentile time over the original's), ``--curve-runs`` times (default 3; each cut's ratio the
   median of its runs).

The FLOPs-budget and Torch-Pruning curves are interpolated at each latency result's measured latency: the FLOPs
and parameters each method keeps at equal latency. Raw rows go to ``latency_budget.json``; ``LATENCY_BUDGET.md``
and ``latency_budget.png`` (latency against FLOPs per model) are written from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import fxmorph
from benchmarks import tp_adapter
from benchmarks.common import at_latency, count, measure_interleaved
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.latency import kernels_of
from fxmorph.api.latency_budget import AGREEMENT, CONFIRMATIONS, SETTLE
from fxmorph.api.runtimes import SteadyTimer
from fxmorph.io.latency_profile import OnnxRuntimeCPU
from fxmorph.passes.select_latency import KEEPS, LatencyKeep

HERE = Path(__file__).parent
MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "convnext_tiny", "vit_b_16")
BUDGETS = (0.75, 0.5, 0.3)
FLOPS_LEVELS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
"""The FLOPs-budget curve the latency cuts are compared on; 0.1 reaches 30% of the latency where 0.2 does not
(densenet121, mobilenet_v2, efficientnet_b0)."""
TP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
CURVE_RUNS = 3
"""Interleaved runs the cuts of a model are compared in: each cut's ratio is the median of its runs."""
THREADS = 2

logger = logging.getLogger("benchmarks.latency_budget")


def _profile_seconds(model: nn.Module, x: torch.Tensor, cache: Path) -> dict[str, float]:
    """Seconds to build the model's latency tables into an empty cache, and to read them back."""
    cg = build_channel_graph(fxmorph.trace(model, (x,)))
    runtime = OnnxRuntimeCPU(threads=THREADS, cache_dir=cache)
    out = {}
    for key in ("empty_cache_s", "cached_s"):
        start = time.perf_counter()
        runtime.profile(kernels_of(cg))
        out[key] = round(time.perf_counter() - start, 2)
    return out


def _latency_cut(
    model: nn.Module, x: torch.Tensor, budget: float, cache: Path, min_width: int, keep: LatencyKeep
) -> tuple[nn.Module, dict[str, Any]]:
    start = time.perf_counter()
    runtime = OnnxRuntimeCPU(threads=THREADS, cache_dir=cache)
    small, report = fxmorph.shrink(
        model,
        example_inputs=x,
        budget_latency=budget,
        runtime=runtime,
        min_width=min_width,
        latency_keep=keep,
        return_report=True,
    )
    outcome = report.latency
    assert outcome is not None
    row = {
        "budget": budget,
        "min_width": min_width,
        "removed": sum(1 for r in report.groups if r.after == 0),
        "class": type(small).__name__,
        "seconds": round(time.perf_counter() - start, 1),
        "original_ms": outcome.original_ms,
        "predicted_original_ms": outcome.predicted_original_ms,
        "rounds": [
            {
                "predicted_ms": s.predicted_ms,
                "measured_ms": s.measured_ms,
                "runs": s.runs,
                "spread_ms": s.spread_ms,
                "flops": s.flops,
                "params": s.params,
            }
            for s in outcome.steps
        ],
        "returned_round": outcome.chosen + 1,
        "retaken": outcome.retaken,
        "in_loop_ratio": outcome.measured_ms / outcome.original_ms,
        **_verify(model, small, x, budget),
        **count(small, x),
    }
    return small, row


def _verify(model: nn.Module, small: nn.Module, x: torch.Tensor, budget: float) -> dict[str, float]:
    """The result's latency over the original's, measured again after shrink returned, as shrink measures before it
    accepts a round: the median of three measurements of the two alone (five where the three lie more than
    ``AGREEMENT`` of the budget apart), each interleaved over three sessions of each (as many rounds as fit in about
    4 s, 40 to 300), taken again while the machine is busy (``SteadyTimer``). ``ratio`` is the ratio of 10th
    percentiles, which shrink meets the budget in; ``median_ratio`` the median of per-round ratios; ``ratios`` every
    measurement's ratio."""
    timer = SteadyTimer(OnnxRuntimeCPU(threads=THREADS))
    for _ in range(2):
        timer.measure({"original": model}, (x,))
    pair = {"original": model, "result": small}
    timings = [timer.measure(pair, (x,))["result"] for _ in range(CONFIRMATIONS)]
    if max(t.ratio for t in timings) - min(t.ratio for t in timings) > AGREEMENT * budget:
        timings += [timer.measure(pair, (x,))["result"] for _ in range(SETTLE - CONFIRMATIONS)]
    return {
        "ratio": float(np.median([t.ratio for t in timings])),
        "median_ratio": float(np.median([t.median_ratio for t in timings])),
        "ratios": [t.ratio for t in timings],
    }


def row_name(name: str, keep: LatencyKeep) -> str:
    """A row's name: the model's, with ``latency_keep`` beside it where that is not the default."""
    return name if keep == "model" else f"{name} (latency_keep={keep})"


def run_model(
    name: str,
    budgets: tuple[float, ...],
    cache: Path,
    min_width: int = 0,
    keep: LatencyKeep = "model",
    curve_runs: int = CURVE_RUNS,
) -> dict[str, Any]:
    """Every cut of ``name`` and their latencies, measured together ``curve_runs`` times."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    row: dict[str, Any] = {"model": row_name(name, keep), **count(model, x)}
    row["profile"] = _profile_seconds(model, x, cache)
    cuts: dict[str, nn.Module] = {"original": model}
    row["latency_cuts"] = []
    row["unreachable"] = []
    for b in budgets:
        try:
            small, cut = _latency_cut(model, x, b, cache, min_width, keep)
        except fxmorph.BudgetError as exc:  # below what the model can reach, as its latency model predicts
            row["unreachable"].append({"budget": b, "error": str(exc)})
            logger.info("%s latency %.2f: %s", name, b, exc)
            continue
        cuts[f"latency {b:g}"] = small
        row["latency_cuts"].append(cut)
        logger.info("%s latency %.2f: %s", name, b, {k: cut[k] for k in ("in_loop_ratio", "flops", "seconds")})
    row["flops_cuts"] = []
    for f in FLOPS_LEVELS:
        try:
            small = fxmorph.shrink(model, f, x)
        except fxmorph.BudgetError as exc:  # a level below what the model reaches: the curve ends above it
            logger.info("%s FLOPs %.2f: %s", name, f, exc)
            continue
        cuts[f"flops {f:g}"] = small
        row["flops_cuts"].append({"level": f, **count(small, x)})
    row["tp_cuts"] = []
    if tp_adapter.available():
        for r in TP_RATIOS:
            small = tp_adapter.prune(model, x, r, None)
            cuts[f"tp {r:g}"] = small
            row["tp_cuts"].append({"ratio": r, **count(small, x)})
    runs = _measure(cuts, x, curve_runs)
    ratios = {name: float(np.median(values)) for name, values in runs.items()}
    row["curve_runs"] = curve_runs
    for cut in row["latency_cuts"]:  # beside the curves, in the measurements they share
        cut["curve_ratio"] = ratios[f"latency {cut['budget']:g}"]
        cut["curve_ratios"] = runs[f"latency {cut['budget']:g}"]
    for key, field, label in (("flops_cuts", "level", "flops"), ("tp_cuts", "ratio", "tp")):
        for r in row[key]:
            r["ratio"] = ratios[f"{label} {r[field]:g}"]
    row["original_ms"] = ratios["original_ms"]
    return row


def _measure(models: dict[str, nn.Module], x: torch.Tensor, runs: int) -> dict[str, list[float]]:
    """Every model's ratio to the original as shrink measures it (10th percentiles, interleaved, 40 rounds) in each
    of ``runs`` runs, and the original's median (``original_ms``). From one run to the next a vit_b_16 cut moved by
    1.5 to 3 points of the original in session 24 (``benchmarks/RESULTS.md``): as much as the methods differ."""
    out: dict[str, list[float]] = {}
    for run in range(runs):
        report = measure_interleaved(models, x, THREADS)
        for m in report.models:
            out.setdefault(m.name, []).append(m.steady_ratio)
        out.setdefault("original_ms", []).append(report["original"].median_ms)
        logger.info("curves measured %d of %d times", run + 1, runs)
    return out


def summarize(rows: list[dict[str, Any]], out_md: Path, out_png: Path) -> None:
    """``LATENCY_BUDGET.md`` and the plot from the raw rows."""
    lines = [
        "# Latency budgets: measured in onnxruntime, and what each method keeps at equal latency",
        "",
        "Command: `python -m benchmarks.latency_budget` (raw rows in `latency_budget.json`). torchvision models "
        f"with random weights at 1x3x224x224, onnxruntime CPU provider, {THREADS} threads. *Measured* is the "
        "result's time over the original's, measured again after shrink returned as shrink measures before it "
        "accepts a round: the median of three measurements (of five where the three lie more than 2.5% of the "
        "budget apart; since session 25), each interleaved over three sessions of each model "
        "(as many rounds as fit in about 4 s, 40 to 300), taken again while the machine is busy (the original "
        "more than 10% slower than its fastest). It is the ratio of the two models' 10th-percentile times, which "
        "shrink meets the budget in; *median* is the median of per-round ratios of the same measurements. *In "
        "loop* is what shrink's returned round measured (a round landing in the window 1% of the budget inside "
        "its lower edge and 1.5% under the budget is measured twice more, four times where the three lie more "
        "than 2.5% of the budget apart, and accepted if the median lands there). For the "
        "comparison, every cut of a model (the latency results, FLOPs-budget cuts at 10..90% and Torch-Pruning at"
        " ratios 0.1..0.8) is measured in interleaved runs (40 rounds, 10th "
        "percentiles; *runs*: how many, each cut's ratio the median of them), and the FLOPs and parameters of the "
        "FLOPs-budget and Torch-Pruning cuts "
        "are interpolated along their curves at the latency result's latency in those runs (-: outside the curve);"
        " *spread*: how far apart the runs put the latency result, in points of the original's latency. The "
        "latency cuts take `min_width=0`: a group may "
        "go whole where that is exact (*gone*: groups at width 0, with the ops that computed them; densenet121's "
        "dense layers, two groups each; residual branches and squeeze-excitations in mobilenet_v2 and "
        "efficientnet_b0, `fxmorph/analysis/removal.py`). Under the latency budget groups thin unevenly "
        "(`DEFAULT_LATENCY_BALANCE`) and a step's parameters count beside its FLOPs, at several values; of the "
        "cuts those give and the FLOPs budget's own cut at the budget, the one with the most FLOPs (within 1% of "
        "them) that keeps as many parameters as the FLOPs budget at the same latency is kept, the FLOPs budget's "
        "cut where no other keeps clearly more (since session 26; `fxmorph/passes/select_latency.py`). A row named "
        "*(latency_keep=flops)* takes "
        '`latency_keep="flops"` (`--latency-keep flops`): the cut with the most FLOPs, parameters not valued.',
        "",
        "| model | budget | measured | median | in loop | rounds | gone | FLOPs kept: latency / FLOPs budget / TP | "
        "params kept: latency / FLOPs budget / TP | runs | spread | first-round prediction error | shrink s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    errors, first_errors, moves, misses, median_misses = [], [], [], 0, 0
    for row in rows:
        for cut in row["latency_cuts"]:
            ratio, median = cut["ratio"], cut.get("median_ratio", float("nan"))
            ok = cut["budget"] * 0.95 <= ratio <= cut["budget"]
            median_ok = cut["budget"] * 0.95 <= median <= cut["budget"]
            at = cut["curve_ratio"]  # the curves are compared where they were measured: in one run, together
            misses += not ok
            moves.append((ratio - cut["in_loop_ratio"]) / cut["budget"])  # verified against accepted, of the budget
            median_misses += not median_ok
            kept = [cut["flops"] / row["flops"]]
            params = [cut["params"] / row["params"]]
            for curve in ("flops_cuts", "tp_cuts"):
                f = at_latency(row[curve], at, "flops")
                p = at_latency(row[curve], at, "params")
                kept.append(None if f is None else f / row["flops"])
                params.append(None if p is None else p / row["params"])
            r0 = cut["rounds"][0]
            first = abs(r0["predicted_ms"] - r0["measured_ms"]) / r0["measured_ms"]
            first_errors.append(first)
            errors += [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in cut["rounds"]]
            lines.append(
                f"| {row['model']} | {cut['budget']:.0%} | {ratio:.1%}{'' if ok else ' (miss)'} | "
                f"{median:.1%}{'' if median_ok else ' (miss)'} | {cut['in_loop_ratio']:.1%} | {len(cut['rounds'])} | "
                f"{cut.get('removed', 0)} | "
                f"{_pcts(kept)} | {_pcts(params)} | {row.get('curve_runs', 1)} | {_spread(cut)} | "
                f"{first:.1%} | {cut['seconds']:.0f} |"
            )
    unreachable = [(row["model"], u) for row in rows for u in row.get("unreachable", [])]
    retaken = sum(cut.get("retaken", 0) for row in rows for cut in row["latency_cuts"])
    lines += [
        "",
        f"**{len(first_errors) - misses} of {len(first_errors)}** results measured at or under their budget and "
        f"within 5% of it (by the median of per-round ratios: {len(first_errors) - median_misses} of "
        f"{len(first_errors)}). Measured again, the results moved {min(moves):+.1%} to {max(moves):+.1%} of their "
        f"budget from what shrink accepted them at (median {np.median(moves):+.1%}, {sum(m > 0 for m in moves)} up); "
        f"shrink took {retaken} measurement(s) again because the machine was busy."
        + "".join(
            f" {model} at {u['budget']:.0%}: refused, {u['error'].split(': ', 1)[-1].split(' (round_to')[0]}."
            for model, u in unreachable
        ),
        "",
        f"Prediction error of the calibrated latency model (|predicted - measured| / measured): first rounds median "
        f"{np.median(first_errors):.1%}, worst {max(first_errors):.1%}; every round median {np.median(errors):.1%}, "
        f"worst {max(errors):.1%}. Before calibration, on the originals: "
        + ", ".join(f"{r['model']} {_raw_error(r):+.0%}" for r in rows)
        + ".",
        "",
        "| model | original ms | FLOPs | tables, empty cache s | tables, cached s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['original_ms']:.2f} | {row['flops'] / 1e9:.2f} G | "
            f"{row['profile']['empty_cache_s']:.1f} | {row['profile']['cached_s']:.2f} |"
        )
    lines += ["", "![latency against FLOPs](latency_budget.png)", ""]
    out_md.write_text("\n".join(lines))
    _plot(rows, out_png)


def _raw_error(row: dict[str, Any]) -> float:
    """The uncalibrated model's error on the original: predicted over measured, minus one."""
    first = row["latency_cuts"][0]
    return first["predicted_original_ms"] / first["original_ms"] - 1


def _spread(cut: dict[str, Any]) -> str:
    """How far apart the comparison's runs put a latency cut, in points of the original's latency."""
    ratios = cut.get("curve_ratios", [])
    return f"{100 * (max(ratios) - min(ratios)):.1f}" if len(ratios) > 1 else "-"


def _pcts(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.1%}" for v in values)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(4.2 * cols, 3.6 * -(-len(rows) // cols)),
                             squeeze=False, layout="constrained")  # fmt: skip
    for ax, row in zip(axes.flat, rows, strict=False):
        for curve, label, style in (("flops_cuts", "FLOPs budget", "o-"), ("tp_cuts", "Torch-Pruning", "s--")):
            pts = sorted((p["flops"] / row["flops"], p["ratio"]) for p in row[curve])
            if pts:
                ax.plot(*zip(*pts, strict=True), style, ms=4, label=label)
        for cut in row["latency_cuts"]:
            ax.axhline(cut["budget"], color="#d62728", lw=0.6, ls=":")
        lat = sorted((c["flops"] / row["flops"], c["curve_ratio"]) for c in row["latency_cuts"])
        ax.plot(*zip(*lat, strict=True), "*", color="#d62728", ms=11, label="latency budget")
        ax.set_title(f"{row['model']} ({row['original_ms']:.1f} ms)", fontsize=10)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("latency / original")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(f"onnxruntime latency against FLOPs kept ({THREADS} threads; dotted: the budgets)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    parser.add_argument("--json", type=Path, default=HERE / "latency_budget.json")
    parser.add_argument("--summarize", action="store_true", help="only write LATENCY_BUDGET.md and the plot")
    parser.add_argument("--min-width", type=int, default=0, help="min_width of the latency cuts (default 0)")
    parser.add_argument(
        "--curve-runs", type=int, default=CURVE_RUNS, help=f"runs the cuts are compared in (default {CURVE_RUNS})"
    )
    parser.add_argument(
        "--latency-keep", choices=tuple(KEEPS), default="model", help="latency_keep of the latency cuts (default model)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if not args.summarize:
        rows = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
        rows = [r for r in rows if r["model"] not in {row_name(m, args.latency_keep) for m in args.models}]
        with tempfile.TemporaryDirectory(prefix="fxmorph-latency-cache-") as cache:
            for name in args.models:
                rows.append(
                    run_model(
                        name, tuple(args.budgets), Path(cache), args.min_width, args.latency_keep, args.curve_runs
                    )
                )
                args.json.write_text(json.dumps({"threads": THREADS, "rows": rows}, indent=1))
    rows = json.loads(args.json.read_text())["rows"]
    order = {m: k for k, m in enumerate(MODELS)}
    rows.sort(key=lambda r: order.get(r["model"].split(" ")[0], len(order)) + 0.5 * (" " in r["model"]))
    summarize(rows, HERE / "LATENCY_BUDGET.md", HERE / "latency_budget.png")


if __name__ == "__main__":
    main()
