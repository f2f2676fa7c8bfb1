"""Engine speed, coverage and memory over the torchvision zoo.

    python -m benchmarks.engine                    # speed + coverage table -> benchmarks/ENGINE.md, engine.json
    python -m benchmarks.engine --models resnet50  # a subset
    python -m benchmarks.engine --huge             # peak memory of analysing and shrinking vit_h_14, regnet_y_128gf

For every model: trace, analysis and surgery time (median of repeats, 1x3x224x224 for images), groups
(free/total), the share of FLOPs in ops that touch at least one free group (the prunable share), and
the time of a whole ``fxmorph.shrink`` to 50% of the FLOPs (default settings).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torchvision

import fxmorph
from benchmarks.common import build, example_input, median_time
from fxmorph.analysis import build_channel_graph
from fxmorph.testing import random_plan

logger = logging.getLogger("benchmarks.engine")
HERE = Path(__file__).parent
SKIP_DEFAULT = {"vit_h_14", "regnet_y_128gf"}  # measured by --huge


def measure(name: str, repeats: int) -> dict:
    model, x = build(name), example_input(name)
    t_trace, gm = median_time(lambda: fxmorph.trace(model, (x,)), repeats)
    t_analysis, cg = median_time(lambda: build_channel_graph(gm), repeats)
    plan = random_plan(cg, seed=0, low=0.5, high=0.5)
    t_surgery, _ = median_time(lambda: fxmorph.resize(cg, plan), repeats)
    cost = fxmorph.CostModel(cg)
    widths = {g: p.width for g, p in plan.items()}
    t_cost, _ = median_time(lambda: cost.flops(widths), 200)
    t_shrink, small = median_time(lambda: fxmorph.shrink(model, 0.5, (x,)), repeats)
    return {
        "model": name,
        "input": list(x.shape),
        "gflops": cost.flops() / 1e9,
        "groups": len(cg.groups),
        "free_groups": len(cg.free_groups),
        "prunable_share": cost.prunable_share(),
        "trace_s": t_trace,
        "analysis_s": t_analysis,
        "surgery_s": t_surgery,
        "total_s": t_trace + t_analysis + t_surgery,
        "cost_model_us": t_cost * 1e6,
        "shrink_50_s": t_shrink,
        "shrink_50_flops_ratio": fxmorph.metadata(small)["fxmorph.report"].flops_ratio,
    }


_HUGE_CODE = """
import resource, sys, time, torch, torchvision, fxmorph
def rss(key):
    return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key)][0]
name, phase = sys.argv[1], sys.argv[2]
base = rss('VmRSS')
m = torchvision.models.get_model(name, weights=None).eval()
w = sum(p.numel() * 4 for p in m.parameters())
x = torch.randn(1, 3, 224, 224)
built = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
t = time.perf_counter()
if phase == 'analyze':
    cg = fxmorph.analyze(m, (x,))
    extra = [len(cg.groups), len(cg.free_groups)]
else:
    small = fxmorph.shrink(m, 0.5, (x,))
    report = fxmorph.metadata(small)['fxmorph.report']
    extra = [report.flops_ratio, sum(p.numel() * 4 for p in small.parameters())]
t = time.perf_counter() - t
print(w, rss('VmHWM'), t, base, built, *extra)
"""


def _huge(name: str, phase: str) -> dict:
    """Peak resident memory of ``fxmorph.analyze`` or ``fxmorph.shrink`` (50%) of ``name`` (own process).

    The high-water mark is reset once the model is built, so the peak counts the model, the torch
    runtime and what the call adds; ``peak_over_weights`` divides it by the fp32 weight bytes.
    """
    cmd = [sys.executable, "-c", _HUGE_CODE, name, phase]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    weights, peak, seconds, base, built = int(out[0]), int(out[1]), float(out[2]), int(out[3]), int(out[4])
    row = {"model": name, "phase": phase, "weight_bytes": weights, "peak_rss_bytes": peak,
           "peak_over_weights": peak / weights, "process_baseline_bytes": base,
           "peak_above_baseline_over_weights": (peak - base) / weights,
           "peak_above_built_model_over_weights": (peak - built) / weights, "seconds": seconds}  # fmt: skip
    if phase == "analyze":
        row.update(groups=int(out[5]), free_groups=int(out[6]))
    else:
        row.update(flops_ratio=float(out[5]), shrunk_weight_bytes=int(out[6]))
    return row


def coverage(name: str) -> dict:
    """Groups and prunable FLOPs share of ``name`` at the test-suite's small input (analysis only)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.zoo import build, example_input

    model, x = build(name), example_input(name)
    cg = fxmorph.analyze(model, (x,))
    cost = fxmorph.CostModel(cg)
    pins = sorted({p.reason.split(" (at")[0] for g in cg.groups for p in g.pins if g.params} - {"model output"})
    return {"model": name, "input": list(x.shape), "groups": len(cg.groups), "free_groups": len(cg.free_groups),
            "prunable_share": cost.prunable_share(), "pins": pins[:4]}  # fmt: skip


def _coverage_table(rows: list[dict]) -> str:
    lines = [
        "| model | input | groups (free) | prunable FLOPs | pin reasons besides the output |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['groups']} ({r['free_groups']}) "
                     f"| {100 * r['prunable_share']:.1f}% | {'; '.join(r['pins'])[:150]} |")  # fmt: skip
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    head = (
        "| model | input | GFLOPs | groups (free) | prunable FLOPs | trace s | analysis s | surgery s | total s "
        "| shrink 50% s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['gflops']:.2f} "
            f"| {r['groups']} ({r['free_groups']}) "
            f"| {100 * r['prunable_share']:.1f}% | {r['trace_s']:.3f} | {r['analysis_s']:.3f} | {r['surgery_s']:.3f} "
            f"| {r['total_s']:.3f} | {r['shrink_50_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: the whole zoo but the two huge ones)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--huge", action="store_true", help="analysis and shrink memory of vit_h_14 and regnet_y_128gf")
    parser.add_argument("--coverage", action="store_true", help="prunable FLOPs share of the zoo (small inputs)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.huge:
        rows = [_huge(n, phase) for n in ("vit_h_14", "regnet_y_128gf") for phase in ("analyze", "shrink")]
        (args.out / "engine_huge.json").write_text(json.dumps(rows, indent=2))
        for r in rows:
            logger.info("%s %s: peak RSS %.2f GB = %.2fx the fp32 weights (%.2f GB); above the runtime after "
                        "importing torch (%.2f GB): %.2fx; above the built model: %.2fx; %.1f s", r["model"],
                        r["phase"], r["peak_rss_bytes"] / 1e9, r["peak_over_weights"], r["weight_bytes"] / 1e9,
                        r["process_baseline_bytes"] / 1e9, r["peak_above_baseline_over_weights"],
                        r["peak_above_built_model_over_weights"], r["seconds"])  # fmt: skip
        return
    zoo = [
        *torchvision.models.list_models(module=torchvision.models),
        *torchvision.models.list_models(module=torchvision.models.video),
        *torchvision.models.list_models(module=torchvision.models.segmentation),
    ]
    names = args.models or [n for n in zoo if n not in SKIP_DEFAULT]
    if args.coverage:
        rows = [coverage(n) for n in names]
        (args.out / "coverage.json").write_text(json.dumps(rows, indent=2))
        print(_coverage_table(rows))
        return
    rows = []
    for name in names:
        rows.append(measure(name, args.repeats))
        r = rows[-1]
        logger.info("%-28s total %.3f s  prunable %.1f%%", name, r["total_s"], 100 * r["prunable_share"])
        gc.collect()
    if not args.models:
        (args.out / "engine.json").write_text(json.dumps(rows, indent=2))
    print(_table(rows))


if __name__ == "__main__":
    main()
