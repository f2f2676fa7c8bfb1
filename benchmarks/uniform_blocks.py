"""What keeping repeated blocks uniform costs: ``shrink(..., uniform_blocks=True)`` against the default.

    python -m benchmarks.uniform_blocks                       # resnet50, vit_b_16, convnext_tiny, efficientnet_b0
    python -m benchmarks.uniform_blocks --models resnet50 --rounds 20

For each model at 1x3x224x224, shrunk to 50% of its FLOPs with ``round_to=1`` and with the default rounding,
with and without ``uniform_blocks``: the FLOPs against the budget, the parameters kept, the shrink's wall time,
how many widths the most uneven role of the repeated blocks has (1: one width per role, what a config holding
one size per model needs), and onnxruntime latency (2 threads, medians of ``--rounds`` interleaved runs, the
original first). Results go to ``benchmarks/uniform_blocks.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

import fxmorph
from benchmarks.common import build, example_input
from fxmorph.capture.blocks import block_pattern, repeated_blocks
from fxmorph.io.export import export_onnx
from fxmorph.io.latency import measure_latency

logger = logging.getLogger("benchmarks.uniform_blocks")
HERE = Path(__file__).parent
MODELS = ["resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0"]


def most_widths_per_role(original: nn.Module, result: nn.Module) -> int:
    """The most distinct shapes one role's parameters take in ``result``, over the roles whose parameters had
    one shape in every repeated block of ``original`` (1 when every such role kept one width)."""
    blocks = repeated_blocks(original)
    shapes: dict[str, dict[str, set]] = {"before": collections.defaultdict(set), "after": collections.defaultdict(set)}
    for key, model in (("before", original), ("after", result)):
        for name, p in model.named_parameters():
            pattern = block_pattern(name, blocks)
            if "*" in pattern:
                shapes[key][pattern].add(tuple(p.shape))
    uniform_before = [role for role, found in shapes["before"].items() if len(found) == 1]
    return max((len(shapes["after"][role]) for role in uniform_before), default=1)


def measure(name: str, rounds: int) -> list[dict[str, object]]:
    """Rows for ``name``: each rounding with and without uniform blocks, and the latency of all four."""
    model, x = build(name), example_input(name)
    rows, results = [], {}
    for round_to in (1, "auto"):
        for uniform in (False, True):
            start = time.perf_counter()
            small, report = fxmorph.shrink(
                model, 0.5, (x,), round_to=round_to, uniform_blocks=uniform, return_report=True
            )
            label = f"round_to={round_to}, uniform_blocks={uniform}"
            results[label] = small
            rows.append(
                {
                    "model": name,
                    "setting": label,
                    "flops_over_budget": report.flops_after / report.budget_flops,
                    "params_kept": report.params_after / report.params_before,
                    "shrink_s": time.perf_counter() - start,
                    "most_widths_per_role": most_widths_per_role(model, small),
                }
            )
    with tempfile.TemporaryDirectory() as tmp:
        files = {"original": export_onnx(model, (x,), Path(tmp) / "original.onnx")}
        for k, (label, small) in enumerate(results.items()):
            files[label] = export_onnx(small, (x,), Path(tmp) / f"r{k}.onnx")
        latency = measure_latency(files, (x,), threads=2, rounds=rounds)
    by_name = {m.name: m for m in latency.models}
    for row in rows:
        row["latency_ratio"] = by_name[str(row["setting"])].median_ms / by_name["original"].median_ms
    return rows


def main() -> None:
    """Run the models given and write ``benchmarks/uniform_blocks.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for name in args.models:
        rows += measure(name, args.rounds)
        for row in rows[-4:]:
            logger.info("%s", row)
    out = HERE / "uniform_blocks.json"
    command = " ".join(["python -m benchmarks.uniform_blocks", *sys.argv[1:]])
    out.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
