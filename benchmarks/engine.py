"""Engine speed, coverage and memory over the torchvision zoo.

    python -m benchmarks.engine                    # speed + coverage table -> benchmarks/ENGINE.md, engine.json
    python -m benchmarks.engine --models resnet50  # a subset
    python -m benchmarks.engine --huge             # peak memory of building, analysing and shrinking the largest
    python -m benchmarks.engine --huge --models llama_1b --phases build analyze   # a subset of them

For every model: trace, analysis and surgery time (median of repeats, 1x3x224x224 for images), groups
(free/total), the share of FLOPs in ops that touch at least one free group (the prunable share), and
the time of a whole ``fxmorph.shrink`` to 50% of the FLOPs (default settings).

``--huge`` measures the largest models (vit_h_14 and regnet_y_128gf in float32, and ``llama_1b``, a 1.1 B
parameter ``LlamaForCausalLM`` in bfloat16, see :data:`LLAMA_1B`), each model and call in a process of its own;
its rows replace those of the same model and call in ``engine_huge.json``.
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
from typing import Any

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


HUGE_MODELS = ("vit_h_14", "regnet_y_128gf", "llama_1b")
HUGE_PHASES = ("build", "analyze", "shrink")
LLAMA_1B = {
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 2048,
}  # fmt: skip
"""``llama_1b``: TinyLlama-1.1B's shape with 8 key/value heads (1.12 B parameters), built from its config with
random weights in bfloat16 (no download) and run on 1x32 token ids (``--tokens``); it needs ``torch.export``."""

_HUGE_CODE = """
import json, sys, time, torch, fxmorph
def rss(key):
    return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key)][0]
name, phase = sys.argv[1], sys.argv[2]
if name == 'llama_1b':
    import transformers
    config = transformers.LlamaConfig(**json.loads(sys.argv[3]))
    make = lambda: transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    x = torch.randint(0, config.vocab_size, (1, int(sys.argv[4])))
else:
    import torchvision
    make = lambda: torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
base = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
t = time.perf_counter()
m = make()
t_build = time.perf_counter() - t
w = sum(p.numel() * p.element_size() for p in m.parameters())
dtype = str(next(m.parameters()).dtype).removeprefix('torch.')
built, build_peak = rss('VmRSS'), rss('VmHWM')
shape = 'x'.join(map(str, x.shape))
if phase == 'build':
    print(w, build_peak, t_build, base, built, dtype, shape)
    sys.exit()
open('/proc/self/clear_refs', 'w').write('5')
t = time.perf_counter()
if phase == 'analyze':
    cg = fxmorph.analyze(m, (x,))
    extra = [len(cg.groups), len(cg.free_groups), cg.gm.meta['fxmorph.capture']]
else:
    small = fxmorph.shrink(m, 0.5, (x,))
    report = fxmorph.metadata(small)['fxmorph.report']
    extra = [report.flops_ratio, sum(p.numel() * p.element_size() for p in small.parameters()), type(small).__name__]
t = time.perf_counter() - t
print(w, rss('VmHWM'), t, base, built, dtype, shape, *extra)
"""


def _huge(name: str, phase: str, tokens: int = 32) -> dict[str, Any]:
    """Peak resident memory of building ``name``, or of ``fxmorph.analyze`` or ``fxmorph.shrink`` (50%) of it,
    in a process of its own (``tokens``: the length of ``llama_1b``'s input).

    For ``analyze`` and ``shrink`` the high-water mark is reset once the model is built, so the peak counts the
    model, the torch runtime and what the call adds; for ``build`` it is reset after the imports, so the peak is
    that of building. ``peak_over_weights`` divides it by the weight bytes (in the model's own dtype).
    """
    cmd = [sys.executable, "-c", _HUGE_CODE, name, phase, json.dumps(LLAMA_1B), str(tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    weights, peak, seconds, base, built = int(out[0]), int(out[1]), float(out[2]), int(out[3]), int(out[4])
    row: dict[str, Any] = {"model": name, "phase": phase, "input": out[6], "dtype": out[5], "weight_bytes": weights,
           "peak_rss_bytes": peak, "peak_over_weights": peak / weights, "process_baseline_bytes": base,
           "peak_above_baseline_over_weights": (peak - base) / weights,
           "peak_above_built_model_over_weights": (peak - built) / weights, "seconds": seconds}  # fmt: skip
    if phase == "build":
        row.update(built_rss_bytes=built)
    elif phase == "analyze":
        row.update(groups=int(out[7]), free_groups=int(out[8]), capture=out[9])
    else:
        row.update(flops_ratio=float(out[7]), shrunk_weight_bytes=int(out[8]), returned_class=out[9])
    return row


def _merge_huge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``path`` with those of ``rows`` put in place (same model, call and input) or added, in
    :data:`HUGE_MODELS` and :data:`HUGE_PHASES` order: measuring one model keeps the others' rows."""
    old = json.loads(path.read_text()) if path.exists() else []
    merged = {(r["model"], r["phase"], r["input"]): r for r in [*old, *rows]}

    def order(key: tuple[str, str, str]) -> tuple[int, int, int]:
        model, phase, shape = key
        rank = HUGE_MODELS.index(model) if model in HUGE_MODELS else len(HUGE_MODELS)
        return (rank, HUGE_PHASES.index(phase), int(shape.split("x")[-1]))

    return [merged[k] for k in sorted(merged, key=order)]


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
    parser.add_argument(
        "--models", nargs="*", help="model names (default: the whole zoo but the huge ones; with --huge: all of them)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--huge", action="store_true", help=f"build, analysis and shrink memory of {HUGE_MODELS}")
    parser.add_argument("--phases", nargs="*", choices=HUGE_PHASES, default=HUGE_PHASES, help="calls --huge measures")
    parser.add_argument("--tokens", type=int, default=32, help="length of llama_1b's input token ids (--huge)")
    parser.add_argument("--coverage", action="store_true", help="prunable FLOPs share of the zoo (small inputs)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.huge:
        names = args.models or list(HUGE_MODELS)
        rows = [_huge(n, phase, args.tokens) for n in names for phase in args.phases]
        path = args.out / "engine_huge.json"
        path.write_text(json.dumps(_merge_huge(path, rows), indent=2))
        for r in rows:
            logger.info("%s %s (%s): peak RSS %.2f GB = %.2fx the %s weights (%.2f GB); above the runtime after "
                        "importing torch (%.2f GB): %.2fx; above the built model: %.2fx; %.1f s", r["model"],
                        r["phase"], r["input"], r["peak_rss_bytes"] / 1e9, r["peak_over_weights"], r["dtype"],
                        r["weight_bytes"] / 1e9, r["process_baseline_bytes"] / 1e9,
                        r["peak_above_baseline_over_weights"], r["peak_above_built_model_over_weights"],
                        r["seconds"])  # fmt: skip
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
