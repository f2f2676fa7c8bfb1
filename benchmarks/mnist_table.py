"""MNIST: test accuracy against FLOPs for LeNet-300-100 and LeNet-5, every method at equal epochs.

    python -m benchmarks.mnist_table                                # both nets at 3x/10x/20x/40x -> MNIST.md
    python -m benchmarks.mnist_table --nets lenet300 --ratios 10 --methods uniform,fxmorph-shrink
    python -m benchmarks.mnist_table --quick                        # a smoke run on 5k images, one ratio

For each net: the dense model trained for ``--epochs`` (the baseline), and at every FLOPs reduction
each method of :mod:`benchmarks.mnist_methods` (uniform width from scratch, Torch-Pruning's magnitude
pruner + fine-tune, fxmorph shrink with Taylor importance + fine-tune, fxmorph morph, fxmorph
grow-and-prune), all trained for the same number of epochs. FLOPs are 2 x MACs at batch 1 (PyTorch's
counter); accuracy on the 10k MNIST test images. Writes ``mnist.json``, ``MNIST.md`` and one plot per
net (``mnist_<net>.png``) next to ``--out``; the JSON is rewritten after every point, so a long run
can be read while it goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import fxmorph
from benchmarks.mnist_methods import METHODS, NETS, Setup, accuracy, dense
from fxmorph.data import load_mnist

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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every net x ratio x method; returns the rows (also written to ``args.out`` as it goes)."""
    limit = 5000 if args.quick else None
    setup = Setup(load_mnist("train", limit), load_mnist("test", 2000 if args.quick else None), epochs=args.epochs,
                  pretrain=args.pretrain, lr=args.lr, seed=args.seed, quiet=args.quiet)  # fmt: skip
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
                args.out.write_text(json.dumps(rows, indent=1))
    args.out.write_text(json.dumps(rows, indent=1))
    return rows


def _cell(rows: list[dict[str, Any]], net: str, method: str, ratio: float) -> str:
    hit = [r for r in rows if r["net"] == net and r["method"] == method and r["target"] == ratio]
    if not hit:
        return "-"
    r = hit[0]
    return f"{100 * r['accuracy']:.2f} ({r['reduction']:.1f}x)"


def write_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, minutes: float) -> None:
    """``MNIST.md``: per net, a table of accuracy (and achieved reduction) by method and target."""
    lines = ["# MNIST: accuracy against FLOPs at equal training epochs", "",
             f"Command: `{command}` ({minutes:.0f} min, {torch.get_num_threads()} thread(s)). Every method trains "
             f"{args.epochs:g} epochs in all (SGD, momentum 0.9, batch 64, learning rate falling linearly to 1/100); "
             f"Torch-Pruning, fxmorph shrink and morph start from one dense checkpoint trained {args.pretrain:g} "
             "epochs and spend the rest fine-tuning; uniform and grow-and-prune start from scratch. Cells: test "
             "accuracy in % (FLOPs reduction achieved against the dense net). One seed.", ""]  # fmt: skip
    for net in args.nets:
        base = [r for r in rows if r["net"] == net and r["method"] == "dense"]
        lines += [f"## {net}", "", f"Dense: {100 * base[0]['accuracy']:.2f}% at {base[0]['flops']:,} FLOPs." if base
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
            mine = [r for r in rows if r["net"] == net and r["method"] == method]
            pts = sorted((r["reduction"], 100 * r["accuracy"]) for r in mine)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=method)
        for r in (r for r in rows if r["net"] == net and r["method"] == "dense"):
            ax.axhline(100 * r["accuracy"], color="k", ls="--", lw=1, label="dense")
            ax.axhline(100 * r["accuracy"] - 0.3, color="k", ls=":", lw=1, label="dense - 0.3")
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
    p.add_argument("--ratios", type=lambda s: [float(r) for r in s.split(",")], default=[3.0, 10.0, 20.0, 40.0])
    p.add_argument("--methods", type=lambda s: [m.replace("-", " ", 1) if m.startswith("fxmorph-") else m
                                                for m in s.split(",")], default=list(METHODS))  # fmt: skip
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--pretrain", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
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
