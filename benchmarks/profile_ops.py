"""Where the latency goes: onnxruntime's per-op profile of a model before and after shrinking.

    python -m benchmarks.profile_ops densenet121                 # original, fxmorph default, uniform width
    python -m benchmarks.profile_ops resnet50 --budget 0.5 --runs 50 --kw param_cost=0
    python -m benchmarks.profile_ops vit_b_16 --tp            # with Torch-Pruning (round_to=8)

For each variant the model is exported with ``fxmorph.export_onnx``, run ``--runs`` times in an
onnxruntime session with profiling on (same threads and optimisation level as the zoo benchmark),
and the kernel time of every node is summed per role: the module it came from (without its path
and repeat index, so every dense layer's ``norm1`` is one row) and the op type of the optimised
graph (onnxruntime fuses activations into ``Conv`` and turns a standalone BatchNorm into a
per-channel ``Conv``, so a row's op type can differ from the module's). The table shows
milliseconds per run, so a shrink whose latency falls less than its FLOPs shows which ops kept
their cost. Written to ``benchmarks/profile_<model>.md`` beside the numbers' command.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import fxmorph
from benchmarks import tp_adapter
from benchmarks.common import build

logger = logging.getLogger("benchmarks.profile_ops")
HERE = Path(__file__).parent


def profile(path: Path, x: torch.Tensor, runs: int, threads: int) -> dict[str, float]:
    """Milliseconds per run spent in each op type (kernel time, after ``runs // 5`` warm-up runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "p")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(max(runs // 5, 1)):
            session.run(None, feed)
        session.end_profiling()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            role = "-" if op in _FUNCTIONAL else _role(e["name"])
            per_op[f"{role} ({op})"] += e["dur"] / 1000.0 / runs
    return dict(per_op)


_FUNCTIONAL = frozenset({"Concat", "Add", "Sum", "Mul", "Flatten", "Reshape", "Transpose", "Split", "Slice"})
"""Op types that come from tensor functions, whose scope the torchscript exporter names after the
calling module in the original and not at all in a traced GraphModule: one row each."""


def _role(node: str) -> str:
    """The module a node came from, without its path and repeat index: ``/features/denseblock1/
    denselayer3/norm1/BatchNormalization_output_0`` and ``/norm1_2/...`` are both ``norm1``."""
    parts = [p for p in node.strip("/").split("/")[:-1] if p]
    return re.sub(r"_\d+$", "", parts[-1]) if parts else "-"


def _parse_kw(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "-0123456789[{tfn" else value
    return out


def variants(
    name: str, budget: float, kw: dict[str, object], with_tp: bool
) -> tuple[torch.Tensor, dict[str, nn.Module]]:
    """The original model and its shrunk variants (Torch-Pruning matched to fxmorph's FLOPs, round_to=8)."""
    torch.manual_seed(0)
    model, x = build(name), torch.randn(1, 3, 224, 224)
    out = {"original": model, "fxmorph": fxmorph.shrink(model, budget, x, **kw)}
    out["uniform"] = fxmorph.shrink(model, budget, x, strategy="width")
    if with_tp:
        _, out["tp_r8"] = tp_adapter.match_flops(model, x, fxmorph.count_flops(out["fxmorph"], (x,)), 8)
    return x, out


def table(name: str, profiles: dict[str, dict[str, float]], flops: dict[str, int]) -> str:
    """A markdown table: ms per run per op type and variant, with each variant's ratio to the original."""
    keys = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -profiles["original"].get(op, 0.0))
    lines = [f"| module (op) | {' | '.join(keys)} | {' | '.join(k + ' / original' for k in keys[1:])} |",
             "|---" * (2 * len(keys)) + "|"]  # fmt: skip
    total = sum(profiles["original"].values())
    small = [op for op in ops if profiles["original"].get(op, 0.0) < 0.01 * total]
    for p in profiles.values():
        p["other (< 1% each)"] = sum(p.pop(op, 0.0) for op in small)
    ops = [op for op in ops if op not in small] + ["other (< 1% each)"]
    for op in [*ops, "total"]:
        ms = [sum(p.values()) if op == "total" else p.get(op, 0.0) for p in profiles.values()]
        ratios = [f"{m / ms[0]:.3f}" if ms[0] else "-" for m in ms[1:]]
        lines.append(f"| {op} | {' | '.join(f'{m:.3f}' for m in ms)} | {' | '.join(ratios)} |")
    fl = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items())
    return f"### {name}\n\nGFLOPs: {fl}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Profile the named models and write ``benchmarks/profile_<model>.md``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", help="comma-separated torchvision model names")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tp", action="store_true", help="add Torch-Pruning (round_to=8) at fxmorph's FLOPs")
    parser.add_argument("--kw", nargs="*", default=[], help="shrink options, key=value (JSON values)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/profile_<model>.md)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    kw = _parse_kw(args.kw)
    for name in args.models.split(","):
        x, models = variants(name, args.budget, kw, args.tp and tp_adapter.available())
        profiles, flops = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for key, model in models.items():
                path = Path(tmp) / f"{key}.onnx"
                fxmorph.export_onnx(model, (x,), path)
                flops[key] = fxmorph.count_flops(model, (x,))
                profiles[key] = profile(path, x, args.runs, args.threads)
        text = table(name, profiles, flops)
        out = args.out or HERE / f"profile_{name}.md"
        command = "python -m benchmarks.profile_ops " + " ".join(argv)
        out.write_text(f"Command: `{command}` (onnxruntime {ort.__version__}, {args.threads} threads, "
                       f"{args.runs} runs, ms per run)\n\n{text}")  # fmt: skip
        logger.info("\n%s", text)
        logger.info("total ms: %s", {k: round(float(np.sum(list(p.values()))), 3) for k, p in profiles.items()})


if __name__ == "__main__":
    main()
