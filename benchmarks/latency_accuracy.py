"""Accuracy at equal latency: a latency budget's cut against a FLOPs budget's and Torch-Pruning's, on trained models.

The latency benchmark (:mod:`benchmarks.latency_budget`) compares what each method keeps at equal latency in FLOPs and
parameters, on models with random weights. This one asks what users keep them for: accuracy. A small torchvision
DenseNet (densenet121's structure: growth 12, three blocks of 6 layers, 24 initial features) is trained on MNIST
(by default 2 epochs of 20,000 digits upsampled from 28x28 to 112x112, the grey channel read as RGB), then cut by:

- ``fxmorph.shrink(..., budget_latency=b)`` on onnxruntime's CPU provider, 2 threads, batch 1;
- ``fxmorph.shrink(model, f)`` at FLOPs budgets f every 5% of the FLOPs, and Torch-Pruning at ratios every 5%: of each
  curve, the cut measured nearest the latency result's time, at or under it (1% of slack), is the one compared.

Every cut is measured in one interleaved run (:func:`fxmorph.measure_latency`, 10th percentiles), and every compared
cut is fine-tuned alike (one epoch by default, SGD with momentum, the rate falling linearly to a hundredth) before
its test accuracy is taken. Results go to ``LATENCY_ACCURACY.md`` and ``latency_accuracy.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm.auto import tqdm

import fxmorph
from benchmarks import tp_adapter
from benchmarks.common import count, measure_interleaved
from fxmorph.io.data import load_mnist

logger = logging.getLogger("benchmarks.latency_accuracy")

HERE = Path(__file__).parent
SIDE = 112
"""The side MNIST's digits are upsampled to by default: the DenseNet's blocks then run at 28x28, 14x14 and 7x7. At
56x56 its time at batch 1 is mostly the ops' fixed times, and a FLOPs budget meets half of it only at 5% of the
FLOPs."""
THREADS = 2
BUDGETS = (0.5, 0.3)
LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""FLOPs budgets and Torch-Pruning ratios of the curves the latency results are compared along."""
SLACK = 0.01
"""A compared cut may measure this share of the original's time slower than the latency result."""


def densenet() -> nn.Module:
    """The DenseNet this benchmark trains: densenet121's structure at MNIST's size (random initial weights)."""
    return torchvision.models.DenseNet(growth_rate=12, block_config=(6, 6, 6), num_init_features=24, num_classes=10)


def images(split: str, limit: int | None, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's ``split`` upsampled to ``side`` (one grey channel; :func:`rgb` makes three)."""
    x, y = load_mnist(split, limit)
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False), y


def rgb(x: torch.Tensor) -> torch.Tensor:
    """The grey channel read as red, green and blue (a view, no copy)."""
    return x.expand(-1, 3, -1, -1)


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: float, lr: float, seed: int) -> None:
    """``epochs`` of SGD (momentum 0.9, batch 64) in place, the rate falling linearly from ``lr`` to ``lr / 100``."""
    generator = torch.Generator().manual_seed(seed)
    n = len(data[0])
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(int(epochs + 0.999))])[: int(epochs * n)]
    batches = order.split(64)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for k, index in enumerate(tqdm(batches, desc="train", leave=False, disable=None)):
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - 0.99 * k / len(batches))
        opt.zero_grad()
        F.cross_entropy(model(rgb(data[0][index])), data[1][index]).backward()
        opt.step()
    model.eval()


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Test accuracy in eval mode."""
    model.eval()
    with torch.no_grad():
        right = sum(
            int((model(rgb(x)).argmax(1) == y).sum())
            for x, y in zip(data[0].split(1000), data[1].split(1000), strict=True)
        )
    return right / len(data[0])


def measure(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Every model's latency over the original's (10th percentiles, interleaved, 40 rounds)."""
    return {m.name: m.steady_ratio for m in measure_interleaved(models, x, THREADS).models}


def nearest_under(curve: list[tuple[str, float]], ratio: float) -> str | None:
    """The name of the cut on ``curve`` (names and latency ratios) measured nearest ``ratio`` at or under it (within
    :data:`SLACK`); None where every cut is slower."""
    under = [(r, n) for n, r in curve if r <= ratio + SLACK]
    return max(under)[1] if under else None


def run_seed(seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One seed: train the dense net, cut it every way, fine-tune the compared cuts, and their rows."""
    train_set, test_set = images("train", args.train_limit, args.side), images("test", None, args.side)
    torch.manual_seed(seed)
    dense = densenet()
    start = time.perf_counter()
    train(dense, train_set, args.epochs, args.lr, seed)
    logger.info(
        "seed %d: dense trained in %.0f s, accuracy %.4f", seed, time.perf_counter() - start, accuracy(dense, test_set)
    )
    x = rgb(test_set[0][:1]).contiguous()
    cuts: dict[str, nn.Module] = {"original": dense}
    for b in args.budgets:
        cuts[f"latency {b:g}"] = fxmorph.shrink(dense, example_inputs=x, budget_latency=b, latency_threads=THREADS)
    for f in LEVELS:
        cuts[f"flops {f:g}"] = fxmorph.shrink(dense, f, x)
    if tp_adapter.available():
        for r in LEVELS[:14]:  # ratios 5 to 70% of the channels
            cuts[f"tp {r:g}"] = tp_adapter.prune(dense, x, r, None)
    ratios = measure(cuts, x)
    rows = []
    for b in args.budgets:
        latency = f"latency {b:g}"
        compared = {"latency": latency}
        for method in ("flops", "tp"):
            curve = [(n, ratios[n]) for n in cuts if n.startswith(method + " ")]
            compared[method] = nearest_under(curve, ratios[latency])
        for method, name in compared.items():
            if name is not None:
                row = {"seed": seed, "budget": b, "method": method, "cut": name, "ratio": ratios[name]}
                rows.append({**row, **_tuned(cuts[name], x, train_set, test_set, args, seed)})
                logger.info("seed %d budget %g %s (%s): %s", seed, b, method, name, rows[-1])
    dense_row = {"seed": seed, "budget": 1.0, "method": "dense", "cut": "original", "ratio": 1.0, **count(dense, x)}
    return [{**dense_row, "accuracy": accuracy(dense, test_set), "finetuned": None}, *rows]


def _tuned(
    model: nn.Module,
    x: torch.Tensor,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """A cut's FLOPs, parameters and accuracy, before and after a fine-tuned copy's ``args.finetune`` epochs."""
    tuned = copy.deepcopy(model)  # the cut itself stays as measured
    train(tuned, train_set, args.finetune, args.finetune_lr, seed + 1)
    return {**count(model, x), "accuracy": accuracy(model, test_set), "finetuned": accuracy(tuned, test_set)}


def summarize(rows: list[dict[str, Any]], command: str, side: int, out: Path) -> None:
    """The table (``LATENCY_ACCURACY.md``): per budget and method, the medians over seeds (and each seed's values)."""
    dense = [r for r in rows if r["method"] == "dense"]
    base = {r["seed"]: r for r in dense}
    lines = [
        "# Accuracy at equal latency: latency budget, FLOPs budget and Torch-Pruning on a trained DenseNet",
        "",
        f"Command: `{command}` (raw rows in `latency_accuracy.json`; the method is in the docstring of "
        f"`benchmarks/latency_accuracy.py`). Digits upsampled to {side}x{side}. Test accuracy on MNIST's 10,000 "
        "test digits before and after fine-tuning; latency is onnxruntime's, 2 threads, batch 1, over the dense "
        "net's, measured in one interleaved run. Medians over seeds, each seed's value in brackets.",
        "",
        f"Dense: accuracy {_cell([r['accuracy'] for r in dense], 100)}, "
        f"{statistics.median(r['flops'] for r in dense) / 1e6:.1f} MFLOPs, "
        f"{statistics.median(r['params'] for r in dense) / 1e3:.1f} K parameters.",
        "",
        "| budget | method | latency | FLOPs kept | params kept | accuracy, cut | accuracy, fine-tuned |",
        "|---:|---|---|---|---|---|---|",
    ]
    for b in sorted({r["budget"] for r in rows if r["method"] != "dense"}, reverse=True):
        for method, label in (("latency", "latency budget"), ("flops", "FLOPs budget"), ("tp", "Torch-Pruning")):
            got = [r for r in rows if r["budget"] == b and r["method"] == method]
            if not got:
                continue
            flops = [r["flops"] / base[r["seed"]]["flops"] for r in got]
            params = [r["params"] / base[r["seed"]]["params"] for r in got]
            lines.append(
                f"| {100 * b:.0f}% | {label} | {_cell([r['ratio'] for r in got], 100)} | {_cell(flops, 100)} | "
                f"{_cell(params, 100)} | {_cell([r['accuracy'] for r in got], 100)} | "
                f"{_cell([r['finetuned'] for r in got], 100)} |"
            )
    out.write_text("\n".join(lines) + "\n")


def _cell(values: list[float], scale: float) -> str:
    """The median of ``values`` (times ``scale``) and, where there are several, each in brackets."""
    median = f"{scale * statistics.median(values):.1f}"
    return median if len(values) == 1 else f"{median} ({', '.join(f'{scale * v:.1f}' for v in values)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs of the dense net")
    parser.add_argument("--finetune", type=float, default=1.0, help="epochs of every compared cut's fine-tuning")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", type=float, default=0.02)
    parser.add_argument("--train-limit", type=int, default=20000, help="training digits used (of 50,000)")
    parser.add_argument("--side", type=int, default=SIDE, help="the side the digits are upsampled to")
    parser.add_argument("--json", type=Path, default=HERE / "latency_accuracy.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(THREADS)
    command = "python -m benchmarks.latency_accuracy" + ("" if argv is None else " " + " ".join(argv))
    rows: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run_seed(seed, args)
        # written after every seed: a run stopped early keeps the seeds it finished
        args.json.write_text(json.dumps({"side": args.side, "rows": rows}, indent=1))
        # a trial's own --json gets its table beside it, so the recorded table stays the default run's
        default = args.json == HERE / "latency_accuracy.json"
        summarize(rows, command, args.side, HERE / "LATENCY_ACCURACY.md" if default else args.json.with_suffix(".md"))


if __name__ == "__main__":
    main()
