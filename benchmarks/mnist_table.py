"""MNIST: test accuracy against FLOPs for LeNet-300-100 and LeNet-5, every method at equal epochs.

    python -m benchmarks.mnist_table                                # both nets at 3x/10x/20x/25x/40x -> MNIST.md
    python -m benchmarks.mnist_table --nets lenet300 --ratios 10 --methods uniform,fxmorph-shrink
    python -m benchmarks.mnist_table --quick                        # a smoke run on 5k images, one ratio

For each net: the dense model trained for ``--epochs`` (the baseline), and at every FLOPs reduction
each method of :mod:`benchmarks.mnist_methods` (uniform width from scratch, Torch-Pruning's magnitude
pruner + fine-tune, fxmorph shrink with Taylor importance + fine-tune, fxmorph morph, fxmorph
grow-and-prune), all trained for the same number of epochs. FLOPs are 2 x MACs at batch 1 (PyTorch's
counter); accuracy on the 10k MNIST test images. Writes ``mnist.json``, ``MNIST.md`` and one plot per
net (``mnist_<net>.png``) next to ``--out``. Each seed (``--seeds``, three by default, ``--jobs`` of
them at once in separate processes) trains everything anew; cells and plots show the median and the
range over seeds, and the JSON is rewritten as each seed ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

import fxmorph
from benchmarks.mnist_methods import METHODS, NETS, Setup, accuracy, dense
from fxmorph.io.data import load_mnist

logger = logging.getLogger("benchmarks.mnist")
HERE = Path(__file__).parent
PUBLISHED = {
    "lenet5": "Torch-Pruning + fine-tune on this machine (issue 7): 99.04% at 10.5x, 98.87% at 22.5x (dense 99.10%); "
    "NeST reports 35.8x fewer FLOPs, counting sparse weights, not a dense model",
    "lenet300": "Torch-Pruning + fine-tune on this machine (issue 7): 98.05% at 3x, 97.12% at 10x (dense 98.09%); "
    "NeST reports 43.7x and Han et al. 12x fewer parameters, counting sparse weights, not a dense model",
}


def _row(net: str, method: str, ratio: float | None, model: torch.nn.Module, setup: Setup, x: torch.Tensor,
         dense_flops: int, seconds: float) -> dict[str, Any]:  # fmt: skip
    flops = fxmorph.count_flops(model, (x,))
    row = {"net": net, "method": method, "target": ratio, "flops": flops, "reduction": dense_flops / flops,
           "params": fxmorph.count_params(model), "accuracy": accuracy(model, setup), "epochs": setup.epochs,
           "seconds": seconds}  # fmt: skip
    logger.info("%-9s %-24s target %5s  FLOPs %9s (%.1fx)  accuracy %.2f%%  %.0f s", net, method,
                f"{ratio}x" if ratio else "-", f"{flops:,}", row["reduction"], 100 * row["accuracy"],
                seconds)  # fmt: skip
    return row


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every net x ratio x method for one seed (data order, initialisation, probes)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if not logging.getLogger().handlers:  # a spawned worker: log as the parent does
        logging.basicConfig(level=logging.INFO, format=f"seed {seed}: %(message)s")
        logging.getLogger("fxmorph").setLevel(logging.WARNING)
    limit = 5000 if args.quick else None
    setup = Setup(load_mnist("train", limit), load_mnist("test", 2000 if args.quick else None), epochs=args.epochs,
                  pretrain=args.pretrain, lr=args.lr, finetune_lr=args.lr, seed=seed, quiet=args.quiet)  # fmt: skip
    x = setup.test[0][:1]
    rows: list[dict[str, Any]] = []
    for net in args.nets:
        dense_flops = fxmorph.count_flops(NETS[net](1.0), (x,))
        t = time.perf_counter()
        rows.append(_row(net, "dense", None, dense(setup, net, setup.epochs), setup, x, dense_flops,
                         time.perf_counter() - t))  # fmt: skip
        t = time.perf_counter()
        ckpt = dense(setup, net, setup.pretrain)
        logger.info("%s dense checkpoint (%.1f epochs): %.2f%% (%.0f s)", net, setup.pretrain,
                    100 * accuracy(ckpt, setup), time.perf_counter() - t)  # fmt: skip
        for ratio in args.ratios:
            for method in args.methods:
                t = time.perf_counter()
                model = METHODS[method](setup, net, int(dense_flops / ratio), x, ckpt)
                rows.append(_row(net, method, ratio, model, setup, x, dense_flops, time.perf_counter() - t))
    return [{**r, "seed": seed} for r in rows]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every seed (``args.jobs`` processes at a time); the rows are written to ``args.out`` as seeds end."""
    rows: list[dict[str, Any]] = []
    if args.jobs <= 1 or len(args.seeds) == 1:
        for seed in args.seeds:
            rows += run_seed(args, seed)
            args.out.write_text(json.dumps(rows, indent=1))
        return rows
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        for seed_rows in pool.map(run_seed, [args] * len(args.seeds), args.seeds):
            rows += seed_rows
            args.out.write_text(json.dumps(rows, indent=1))
    return rows


def _points(rows: list[dict[str, Any]], net: str, method: str, ratio: float | None) -> list[dict[str, Any]]:
    return [r for r in rows if r["net"] == net and r["method"] == method and r["target"] == ratio]


def _cell(rows: list[dict[str, Any]], net: str, method: str, ratio: float) -> str:
    """Median accuracy over seeds (with the range where there are several) and the FLOPs reduction."""
    hit = _points(rows, net, method, ratio)
    if not hit:
        return "-"
    acc = [100 * r["accuracy"] for r in hit]
    spread = f" [{min(acc):.2f}-{max(acc):.2f}]" if len(acc) > 1 else ""
    return f"{statistics.median(acc):.2f}{spread} ({statistics.median(r['reduction'] for r in hit):.1f}x)"


def _seeds(args: argparse.Namespace) -> str:
    return f"({', '.join(map(str, args.seeds))}) " if len(args.seeds) > 1 else ""


def write_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, minutes: float) -> None:
    """``MNIST.md``: per net, a table of accuracy (and achieved reduction) by method and target."""
    lines = ["# MNIST: accuracy against FLOPs at equal training epochs", "",
             f"Command: `{command}` ({minutes:.0f} min, {args.jobs} process(es) of {args.threads} thread(s)). "
             "Every method trains "
             f"{args.epochs:g} epochs in all (SGD, momentum 0.9, batch 64, learning rate falling linearly to 1/100); "
             f"Torch-Pruning, fxmorph shrink and morph start from one dense checkpoint trained {args.pretrain:g} "
             "epochs and spend the rest fine-tuning; uniform and grow-and-prune start from scratch. Cells: test "
             f"accuracy in %, the median over {len(args.seeds)} seed(s) {_seeds(args)}with the range in brackets "
             "(FLOPs reduction achieved against the dense net). Fine-tuning after pruning starts at the full "
             "learning rate for Torch-Pruning and fxmorph alike.", ""]  # fmt: skip
    for net in args.nets:
        base = _points(rows, net, "dense", None)
        dense_acc = statistics.median(100 * r["accuracy"] for r in base) if base else 0.0
        lines += [f"## {net}", "", f"Dense: {dense_acc:.2f}% (median) at {base[0]['flops']:,} FLOPs." if base
                  else "", "", "| method | " + " | ".join(f"{r:g}x" for r in args.ratios) + " |",
                  "|---|" + "---|" * len(args.ratios)]  # fmt: skip
        for method in args.methods:
            lines.append(f"| {method} | " + " | ".join(_cell(rows, net, method, r) for r in args.ratios) + " |")
        lines += ["", f"Reference: {PUBLISHED[net]}.", "", f"![accuracy against FLOPs](mnist_{net}.png)", ""]
    args.out.with_name("MNIST.md").write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One plot per net: accuracy against FLOPs reduction, a line per method, the dense model as a line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for net in args.nets:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for method in args.methods:
            pts = []
            for ratio in args.ratios:
                hit = _points(rows, net, method, ratio)
                if hit:
                    acc = [100 * r["accuracy"] for r in hit]
                    mid = statistics.median(acc)
                    pts.append((statistics.median(r["reduction"] for r in hit), mid, mid - min(acc), max(acc) - mid))
            if pts:
                xs, ys, lo, hi = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=method)
        base = _points(rows, net, "dense", None)
        if base:
            dense_acc = statistics.median(100 * r["accuracy"] for r in base)
            ax.axhline(dense_acc, color="k", ls="--", lw=1, label="dense")
            ax.axhline(dense_acc - 0.3, color="k", ls=":", lw=1, label="dense - 0.3")
        ax.set_xscale("log")
        ax.set_xticks(args.ratios, [f"{r:g}x" for r in args.ratios])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("fewer FLOPs than the dense net")
        ax.set_ylabel("MNIST test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{net}: accuracy against FLOPs, {args.epochs:g} epochs each")
        fig.tight_layout()
        fig.savefig(args.out.with_name(f"mnist_{net}.png"), dpi=120)
        plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", type=lambda s: s.split(","), default=list(NETS))
    p.add_argument("--ratios", type=lambda s: [float(r) for r in s.split(",")], default=[3.0, 10.0, 20.0, 25.0, 40.0])
    p.add_argument("--methods", type=lambda s: [m.replace("-", " ", 1) if m.startswith("fxmorph-") else m
                                                for m in s.split(",")], default=list(METHODS))  # fmt: skip
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--pretrain", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=lambda s: [int(k) for k in s.split(",")], default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="seeds trained at once, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--quick", action="store_true", help="5k training images, 2k test images")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--replot", action="store_true", help="redraw the plots from --out's JSON; train nothing")
    p.add_argument("--out", type=Path, default=HERE / "mnist.json")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or any(n not in NETS for n in args.nets):
        p.error(f"unknown method or net: {unknown or args.nets}; methods: {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the table and write the JSON, the markdown and the plots."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.replot:
        plot(json.loads(args.out.read_text()), args)
        return
    start = time.perf_counter()
    rows = run(args)
    write_markdown(rows, args, "python -m benchmarks.mnist_table " + " ".join(argv), (time.perf_counter() - start) / 60)
    plot(rows, args)


if __name__ == "__main__":
    main()
