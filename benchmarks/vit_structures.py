"""vit_b_16: does the shape of a cut change its latency per FLOP? (issue 17)

    python -m benchmarks.vit_structures                  # cuts to 72.5% of the FLOPs, 3 interleaved runs (~9 min)
    python -m benchmarks.vit_structures --flops 0.5 --runs 5

torchvision's vit_b_16 has two kinds of width a cut can change: the residual stream, which is also the attention's
width (12 heads of 64 channels, one group: ``fxmorph`` cuts it a channel per head at a time), and each block's MLP
(3072). Every cut here keeps the same share of the FLOPs in a different shape: the stream at 64, 60, 56 and 48
channels a head with every MLP as wide as that share allows (one width for all twelve), fxmorph's own FLOPs budget,
and Torch-Pruning (``benchmarks.tp_adapter``, which thins the MLPs only) matched to the same FLOPs. All are
measured together in ``--runs`` interleaved runs (onnxruntime's CPU provider, 2 threads, 1x3x224x224, 40 rounds of
10th percentiles each) and reported as FLOPs kept over latency kept: 1.0 is a cut whose time falls with its FLOPs.
Where every shape gives the same, no latency model can keep more FLOPs at a latency than any other method, beyond
what one measurement moves. Results go to ``VIT_STRUCTURES.md`` and ``vit_structures.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fxmorph
from benchmarks import tp_adapter
from benchmarks.common import build, count, measure_interleaved
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.latency import LatencyFunction, kernels_of
from fxmorph.analysis.plan import GroupPlan
from fxmorph.io.latency_profile import OnnxRuntimeCPU

HERE = Path(__file__).parent
THREADS = 2
HEAD_WIDTHS = (64, 60, 56, 48)
STEP = 16
"""The MLP widths tried: multiples of onnxruntime's CPU channel block."""

logger = logging.getLogger("benchmarks.vit_structures")


def _groups(cost: CostModel) -> tuple[int, list[int]]:
    """The stream's group (64 channels a head) and the MLPs' groups (3072 each), found by their widths."""
    widths = cost.widths()
    heads = [g for g, w in enumerate(widths) if w == 64]
    mlps = [g for g, w in enumerate(widths) if w == 3072]
    if len(heads) != 1 or len(mlps) != 12:
        raise RuntimeError(f"vit_b_16's groups are not as expected: {len(heads)} of 64, {len(mlps)} of 3072")
    return heads[0], mlps


def _shape(cost: CostModel, head: int, mlps: list[int], per_head: int, target: float) -> np.ndarray:
    """Widths with the stream at ``per_head`` a head and one MLP width (a multiple of :data:`STEP`) whose FLOPs come
    closest to ``target`` of the model's."""
    total = cost.flops()
    widths = cost.widths().copy()
    widths[head] = per_head
    best: tuple[float, int] | None = None
    for mlp in range(STEP, 3072 + 1, STEP):
        widths[mlps] = mlp
        gap = abs(cost.flops(widths) / total - target)
        if best is None or gap < best[0]:
            best = (gap, mlp)
    assert best is not None
    widths[mlps] = best[1]
    return widths


def cuts(model: nn.Module, x: torch.Tensor, target: float) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """The cuts to compare, by name, and each one's latency as the latency tables predict it, uncalibrated (a share
    of the original's; NaN for the FLOPs budget's and Torch-Pruning's cuts, whose widths are not read back)."""
    cg = fxmorph.analyze(model, (x,))
    cost = CostModel(cg)
    predict = LatencyFunction(cost, OnnxRuntimeCPU(threads=THREADS).profile(kernels_of(cg)))
    original = predict(cost.widths())
    head, mlps = _groups(cost)
    models: dict[str, nn.Module] = {"original": model}
    predicted: dict[str, float] = {}
    for per_head in HEAD_WIDTHS:
        widths = _shape(cost, head, mlps, per_head, target)
        plan = {g: GroupPlan(keep=tuple(range(int(widths[g])))) for g in (head, *mlps)}
        name = f"stream {per_head} a head, MLPs {int(widths[mlps[0]])}"
        models[name] = fxmorph.resize(cg, plan, keep_class=False)
        predicted[name] = predict(widths) / original
    models["fxmorph FLOPs budget"] = fxmorph.shrink(model, target, x)
    predicted["fxmorph FLOPs budget"] = float("nan")
    if tp_adapter.available():
        flops = int(target * fxmorph.count_flops(model, (x,)))
        models["Torch-Pruning"] = tp_adapter.match_flops(model, x, flops, None)[1]
        predicted["Torch-Pruning"] = float("nan")
    return models, predicted


def run(target: float, runs: int) -> dict[str, Any]:
    """Every cut measured ``runs`` times with the original: FLOPs, parameters, and latency ratios per run."""
    torch.manual_seed(0)
    model, x = build("vit_b_16"), torch.randn(1, 3, 224, 224)
    models, predicted = cuts(model, x, target)
    base = count(model, x)
    ratios: dict[str, list[float]] = {name: [] for name in models if name != "original"}
    for k in range(runs):
        report = measure_interleaved(models, x, THREADS)
        for m in report.models:
            if m.name in ratios:
                ratios[m.name].append(m.steady_ratio)
        logger.info("run %d of %d: %s", k + 1, runs, {n: round(r[-1], 4) for n, r in ratios.items()})
    rows = []
    for name, measured in ratios.items():
        kept = count(models[name], x)
        rows.append(
            {
                "cut": name,
                "flops": kept["flops"] / base["flops"],
                "params": kept["params"] / base["params"],
                "predicted": predicted[name],
                "ratios": measured,
            }
        )
    return {"target": target, "runs": runs, "threads": THREADS, "rows": rows}


def summarize(data: dict[str, Any], path: Path) -> None:
    """``VIT_STRUCTURES.md`` from the raw results."""
    lines = [
        "# vit_b_16: the shape of a cut against its latency per FLOP",
        "",
        f"Command: `python -m benchmarks.vit_structures --flops {data['target']:g} --runs {data['runs']}` (raw: "
        "`vit_structures.json`). Cuts to the same share of the FLOPs in different shapes, measured together with "
        f"the original in {data['runs']} interleaved runs (onnxruntime CPU, {data['threads']} threads, 40 rounds of "
        "10th percentiles each). *FLOPs / latency*: the share of the FLOPs kept over the median share of the "
        "latency (1.0: time falls with the FLOPs). *Predicted*: the latency tables' uncalibrated share.",
        "",
        "| cut | FLOPs kept | params kept | latency (median) | runs' range | FLOPs / latency | predicted |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in data["rows"]:
        median = float(np.median(row["ratios"]))
        spread = f"{min(row['ratios']):.1%} to {max(row['ratios']):.1%}"
        predicted = "-" if np.isnan(row["predicted"]) else f"{row['predicted']:.1%}"
        lines.append(
            f"| {row['cut']} | {row['flops']:.1%} | {row['params']:.1%} | {median:.1%} | {spread} | "
            f"{row['flops'] / median:.3f} | {predicted} |"
        )
    path.write_text("\n".join([*lines, ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=0.725, help="the share of the FLOPs every cut keeps")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    parser.add_argument("--json", type=Path, default=HERE / "vit_structures.json")
    parser.add_argument("--summarize", action="store_true", help="only write VIT_STRUCTURES.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if not args.summarize:
        args.json.write_text(json.dumps(run(args.flops, args.runs), indent=1))
    summarize(json.loads(args.json.read_text()), HERE / "VIT_STRUCTURES.md")


if __name__ == "__main__":
    main()
