"""NeST-style grow-and-prune on MNIST with fxmorph: narrow seed -> grow by gradient -> train -> prune -> fine-tune.

    python examples/grow_and_prune_mnist.py          # LeNet-300-100: 2 min, plus 6 for the baselines (2 busy cores)
    python examples/grow_and_prune_mnist.py --target 20 --epochs 2
    python examples/grow_and_prune_mnist.py --arch lenet5 --train-size 10000 --no-baselines   # conv: slower

1. **Seed**: the LeNet at ``--seed-width`` of its widths (LeNet-300-100 at 0.25 is 75-25), trained.
2. **Grow** ``--grow-rounds`` times: ``fxmorph.grow`` with data adds channels where the gradient-activation
   bridging matrix has the most singular value per FLOP (GradMax / its dual, function-preserving at the
   moment of growth), up to ``--grow-factor`` times the FLOPs; train after each round.
3. **Prune** to ``dense FLOPs / --target`` in ``--prune-steps`` geometric steps of ``fxmorph.shrink``
   with first-order Taylor importance, fine-tuning after each step; then a final fine-tune.

Baselines at the end (``--no-baselines`` skips them): the full LeNet trained from scratch, and the LeNet
uniformly narrowed to the final FLOPs trained from scratch, each for as many epochs as the grow-and-prune
run trained in all. Prints a table of accuracy against FLOPs at every stage and writes
``grow_and_prune_<arch>.md`` and ``.png`` under ``--out``. FLOPs are 2 x MACs (PyTorch's FLOP counter),
batch 1.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import fxmorph
from fxmorph.io.data import load_mnist

logger = logging.getLogger("grow_and_prune_mnist")

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def lenet5(scale: float = 1.0) -> nn.Module:
    """Caffe's LeNet-5 (20-50-500 channels; 4.586M FLOPs at scale 1), with ReLU after the convolutions."""
    c1, c2, h = (max(1, round(scale * n)) for n in (20, 50, 500))
    return nn.Sequential(nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, h), nn.ReLU(), nn.Linear(h, 10))  # fmt: skip


def lenet300(scale: float = 1.0) -> nn.Module:
    """LeNet-300-100 (532K FLOPs at scale 1) on flattened 28x28 images."""
    h1, h2 = (max(1, round(scale * n)) for n in (300, 100))
    return nn.Sequential(nn.Flatten(), nn.Linear(784, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


ARCHS = {"lenet5": lenet5, "lenet300": lenet300}


@dataclass
class Point:
    """One stage of the run (or a baseline): FLOPs, parameters, test accuracy, epochs trained so far."""

    stage: str
    flops: int
    params: int
    accuracy: float
    epochs: float


class Trainer:
    """SGD with momentum over shuffled MNIST batches; counts the epochs it has trained."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 args: argparse.Namespace) -> None:  # fmt: skip
        self.train, self.test, self.args = train, test, args
        self.generator = torch.Generator().manual_seed(args.seed)
        self.epochs = 0.0

    def batches(self, fraction: float = 1.0) -> Batches:
        """Shuffled training batches covering ``fraction`` of an epoch."""
        n = len(self.train[0])
        order = torch.randperm(n, generator=self.generator)[: max(1, int(fraction * n))]
        size = self.args.batch_size
        return [
            (self.train[0][order[i : i + size]], self.train[1][order[i : i + size]]) for i in range(0, len(order), size)
        ]

    def fit(self, model: nn.Module, epochs: float, lr: float, what: str) -> None:
        """Train ``model`` in place for ``epochs`` (may be fractional)."""
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        whole, rest = int(epochs), epochs - int(epochs)
        for fraction in [1.0] * whole + ([rest] if rest > 1e-9 else []):
            for xb, yb in tqdm(self.batches(fraction), desc=what, leave=False, disable=self.args.quiet):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        self.epochs += epochs

    def accuracy(self, model: nn.Module) -> float:
        """Test accuracy (eval mode)."""
        model.eval()
        with torch.no_grad():
            right = sum(
                int((model(x).argmax(1) == y).sum())
                for x, y in zip(self.test[0].split(1000), self.test[1].split(1000), strict=True)
            )
        return right / len(self.test[0])


def _point(stage: str, model: nn.Module, trainer: Trainer, x: torch.Tensor, epochs: float | None = None) -> Point:
    p = Point(stage, fxmorph.count_flops(model, (x,)), fxmorph.count_params(model), trainer.accuracy(model),
              trainer.epochs if epochs is None else epochs)  # fmt: skip
    logger.info("%-28s FLOPs %10s  params %9s  accuracy %.4f  (%.2f epochs)", stage, f"{p.flops:,}", f"{p.params:,}",
                p.accuracy, p.epochs)  # fmt: skip
    return p


def grow_and_prune(
    args: argparse.Namespace, trainer: Trainer, x: torch.Tensor, dense_flops: int
) -> tuple[nn.Module, list[Point]]:
    """The NeST cycle; returns the final model and one point per stage."""
    torch.manual_seed(args.seed)
    model = ARCHS[args.arch](args.seed_width)
    trainer.fit(model, args.epochs, args.lr, "seed")
    points = [_point("seed (trained)", model, trainer, x)]
    for r in range(1, args.grow_rounds + 1):
        probe = trainer.batches(args.probe_batches * args.batch_size / len(trainer.train[0]))
        model, report = fxmorph.grow(model, (x,), budget_flops=f"{100 * args.grow_factor}%", data=probe,
                                     loss_fn=F.cross_entropy, round_to=args.round_to, seed=args.seed + r,
                                     return_report=True)  # fmt: skip
        logger.info("grow round %d:\n%s", r, report.table())
        points.append(_point(f"grown {r} (before training)", model, trainer, x))
        trainer.fit(model, args.epochs, args.lr, f"grown {r}")
        points.append(_point(f"grown {r} (trained)", model, trainer, x))
    target = dense_flops / args.target
    start = points[-1].flops
    for s in range(1, args.prune_steps + 1):
        budget = int(start * (target / start) ** (s / args.prune_steps))
        calibration = trainer.batches(args.probe_batches * args.batch_size / len(trainer.train[0]))
        model = fxmorph.shrink(model, budget, (x,), data=calibration, loss_fn=F.cross_entropy, criterion="taylor",
                               round_to=args.round_to, seed=args.seed)  # fmt: skip
        points.append(_point(f"pruned {s}/{args.prune_steps}", model, trainer, x))
        trainer.fit(model, args.prune_epochs, args.lr / 5, f"prune {s}")
        points.append(_point(f"pruned {s}/{args.prune_steps} (fine-tuned)", model, trainer, x))
    trainer.fit(model, args.finetune_epochs, args.lr / 10, "final fine-tune")
    points.append(_point("final (fine-tuned)", model, trainer, x))
    return model, points


def baselines(args: argparse.Namespace, trainer: Trainer, x: torch.Tensor, final_flops: int) -> list[Point]:
    """The dense LeNet, and the uniformly narrowed one at the final FLOPs, from scratch for equal epochs."""
    epochs = trainer.epochs
    out = []
    for name, scale in (("dense (scratch)", 1.0), ("uniform (scratch)", _uniform_scale(args.arch, final_flops, x))):
        torch.manual_seed(args.seed)
        model = ARCHS[args.arch](scale)
        scratch = Trainer(trainer.train, trainer.test, args)
        scratch.fit(model, epochs, args.lr, name)
        out.append(_point(f"{name} x{scale:.3f}", model, scratch, x, epochs))
    return out


def _uniform_scale(arch: str, flops: int, x: torch.Tensor) -> float:
    """The largest width scale of the LeNet whose FLOPs stay at or below ``flops`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fxmorph.count_flops(ARCHS[arch](mid), (x,)) <= flops else (lo, mid)
    return lo


def plot(path: Path, points: list[Point], extra: list[Point], title: str) -> None:
    """Accuracy against FLOPs: the stages in order, joined, and the baselines as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot([p.flops for p in points], [100 * p.accuracy for p in points], "o-", label="grow and prune (in order)")
    for p in points[:1] + points[-1:]:
        ax.annotate(p.stage, (p.flops, 100 * p.accuracy), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for p, marker in zip(extra, "s^", strict=False):
        ax.plot([p.flops], [100 * p.accuracy], marker, markersize=8, label=p.stage)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (2 x MACs, batch 1)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_ylim(min(100 * p.accuracy for p in points + extra) - 2, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(args: argparse.Namespace, points: list[Point], extra: list[Point], dense_flops: int, seconds: float) -> None:
    """The results markdown and the accuracy-against-FLOPs plot."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"grow_and_prune_{args.arch}"
    plot(stem.with_suffix(".png"), points, extra, f"NeST-style grow and prune, {args.arch}")
    rows = [f"| {p.stage} | {p.flops:,} | {dense_flops / p.flops:.1f}x | {p.params:,} | {100 * p.accuracy:.2f} | "
            f"{p.epochs:.2f} |" for p in points + extra]  # fmt: skip
    options = {k: v for k, v in vars(args).items() if k not in ("quiet", "out", "baselines")}
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()) + (
        "" if args.baselines else " --no-baselines"
    )
    text = [
        f"# Grow and prune on MNIST ({args.arch})",
        "",
        f"Command: `python examples/grow_and_prune_mnist.py {command} --out {args.out}` ({seconds / 60:.1f} min, "
        f"{torch.get_num_threads()} threads). FLOPs are 2 x MACs at batch 1; the reduction is against the dense "
        f"{args.arch} ({dense_flops:,} FLOPs). Test accuracy on the 10k MNIST test images; 'epochs' counts "
        "training epochs so far (baselines train from scratch for as many epochs as the whole run).",
        "",
        "| stage | FLOPs | fewer than dense | params | test accuracy (%) | epochs |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"![accuracy against FLOPs]({stem.with_suffix('.png').name})",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(text))
    logger.info("wrote %s and %s", stem.with_suffix(".md"), stem.with_suffix(".png"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default="lenet300")
    p.add_argument("--seed-width", type=float, default=0.25, help="width of the seed, relative to the LeNet")
    p.add_argument("--grow-rounds", type=int, default=2)
    p.add_argument("--grow-factor", type=float, default=2.0, help="FLOPs multiple per growth round")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs of training (seed, after each growth)")
    p.add_argument("--target", type=float, default=10.0, help="final FLOPs = dense LeNet FLOPs / target")
    p.add_argument("--prune-steps", type=int, default=3)
    p.add_argument("--prune-epochs", type=float, default=0.5, help="fine-tune epochs after each prune step")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="final fine-tune epochs")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probe-batches", type=int, default=8, help="batches for growth gradients and Taylor scores")
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--train-size", type=int, default=50000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", dest="baselines", action="store_false")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Point]:
    """Run the example; returns the stage points followed by the baselines."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    start = time.perf_counter()
    trainer = Trainer(load_mnist("train", args.train_size), load_mnist("test"), args)
    x = trainer.test[0][:1]
    dense_flops = fxmorph.count_flops(ARCHS[args.arch](), (x,))
    model, points = grow_and_prune(args, trainer, x, dense_flops)
    fxmorph.check(model, (x,))
    extra = baselines(args, trainer, x, points[-1].flops) if args.baselines else []
    seconds = time.perf_counter() - start
    print(f"\n{'stage':40s} {'FLOPs':>12s} {'x fewer':>8s} {'params':>9s} {'accuracy':>9s} {'epochs':>7s}")
    for p in points + extra:
        print(f"{p.stage:40s} {p.flops:12,d} {dense_flops / p.flops:8.1f} {p.params:9,d} {100 * p.accuracy:8.2f}% "
              f"{p.epochs:7.2f}")  # fmt: skip
    write(args, points, extra, dense_flops, seconds)
    logger.info("done in %.1f min", seconds / 60)
    return points + extra


if __name__ == "__main__":
    main()
