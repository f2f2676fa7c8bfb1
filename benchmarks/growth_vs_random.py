"""Does gradient-chosen growth lower the MNIST training loss faster than random growth of the same size?

    python -m benchmarks.growth_vs_random                      # ReLU MLP, 3 seeds, about a minute
    python -m benchmarks.growth_vs_random --act gelu --steps 200

Per seed: train a narrow MLP (784-``--widths``-10) for ``--pretrain`` SGD steps, then grow it to
``--factor`` times its FLOPs in several ways and train every copy for ``--steps`` more steps on the same
batches with the same optimizer (plain SGD, fresh state), recording the loss on a fixed training subset:

- ``none``: no growth (the narrow model trains on);
- ``auto``, ``gradmax``, ``dual``: ``fxmorph.grow`` with data (groups ranked by singular value per FLOP;
  values from the bridging matrix; behind ``nn.ReLU`` GradMax falls back to dual, see the report);
- ``random (same groups)``: the same channel counts per group as ``auto`` chose, ``init="zero"``
  (random fan-in drawn as PyTorch draws it, zero fan-out): the placement is the gradient's, the values not;
- ``random (uniform)``: no data, one multiplier for every group, ``init="zero"``: neither is.

Every growth keeps the function, so all curves start from the same loss. The median over seeds is written
to ``--out``/GROWTH.md with the command, and both curves to ``growth_vs_random.png``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph.io.data import load_mnist

logger = logging.getLogger("growth_vs_random")

METHODS = ("none", "auto", "gradmax", "dual", "random (same groups)", "random (uniform)")
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def mlp(widths: list[int], act: str) -> nn.Sequential:
    """784 -> widths -> 10 with the activation after every hidden layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip([784, *widths], widths, strict=False):
        layers += [nn.Linear(a, b), ACTS[act]()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10))


def batches(data: tuple[torch.Tensor, torch.Tensor], count: int, size: int, seed: int) -> list[Any]:
    """``count`` random batches of ``size`` (with replacement across batches)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randint(0, len(data[0]), (size,), generator=g)
        out.append((data[0][idx], data[1][idx]))
    return out


def loss_on(model: nn.Module, subset: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean cross-entropy on ``subset`` (train mode is irrelevant: no BatchNorm or dropout)."""
    with torch.no_grad():
        return float(F.cross_entropy(model(subset[0]), subset[1]))


def train(model: nn.Module, data: list[Any], lr: float, subset: Any = None, every: int = 0) -> list[float]:
    """Plain SGD over ``data``; the subset loss before the first step and every ``every`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    curve = [loss_on(model, subset)] if subset is not None else []
    for i, (xb, yb) in enumerate(data, 1):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if subset is not None and i % every == 0:
            curve.append(loss_on(model, subset))
    return curve


def grown(model: nn.Module, method: str, x: torch.Tensor, budget: str, probe: list[Any], seed: int,
          auto_counts: dict[int, int]) -> tuple[nn.Module, Any]:  # fmt: skip
    """The model grown by ``method`` and its report (None for ``none``)."""
    options: dict[str, Any] = {"round_to": 1, "seed": seed, "return_report": True}
    if method == "none":
        return copy.deepcopy(model), None
    if method in ("auto", "gradmax", "dual"):
        return fxmorph.grow(model, (x,), budget_flops=budget, data=probe, loss_fn=F.cross_entropy, init=method,
                            **options)  # fmt: skip
    if method == "random (same groups)":
        return fxmorph.grow(model, (x,), channels=auto_counts, init="zero", **options)
    return fxmorph.grow(model, (x,), budget_flops=budget, init="zero", **options)


def run_seed(args: argparse.Namespace, seed: int, train_set: Any, subset: Any) -> dict[str, dict[str, Any]]:
    """All methods for one seed: per method the loss curve, FLOPs, widths and inits used."""
    torch.manual_seed(seed)
    base = mlp(args.widths, args.act)
    x = subset[0][:1]
    train(base, batches(train_set, args.pretrain, args.batch_size, seed), args.lr)
    probe = batches(train_set, args.probe_batches, args.batch_size, 1000 + seed)
    after = batches(train_set, args.steps, args.batch_size, 2000 + seed)
    budget = f"{100 * args.factor}%"
    results: dict[str, dict[str, Any]] = {}
    auto_counts: dict[int, int] = {}
    for method in METHODS:
        model, report = grown(base, method, x, budget, probe, seed, auto_counts)
        if method == "auto":
            auto_counts = {r["id"]: r["after"] - r["before"] for r in report.groups}
        start_loss = loss_on(model, subset)
        assert abs(start_loss - loss_on(base, subset)) < 1e-4, (method, start_loss)  # growth kept the function
        curve = train(model, after, args.lr, subset, args.every)
        results[method] = {
            "curve": curve,
            "flops": fxmorph.count_flops(model, (x,)),
            "widths": [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1],
            "inits": sorted({r["init"] for r in report.groups}) if report else [],
        }
        logger.info("seed %d %-22s FLOPs %8s  loss %.4f -> %.4f", seed, method, f"{results[method]['flops']:,}",
                    curve[0], curve[-1])  # fmt: skip
    return results


def median_curves(runs: list[dict[str, dict[str, Any]]]) -> dict[str, list[float]]:
    """Per method, the pointwise median of the seeds' curves."""
    return {m: [statistics.median(v) for v in zip(*(r[m]["curve"] for r in runs), strict=True)] for m in METHODS}


def plot(path: Path, curves: dict[str, list[float]], every: int, title: str) -> None:
    """Median training-loss curves of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"none": ":", "random (same groups)": "--", "random (uniform)": "--"}
    for method, curve in curves.items():
        ax.plot([i * every for i in range(len(curve))], curve, styles.get(method, "-"), label=method)
    ax.set_xlabel("SGD steps after growth")
    ax.set_ylabel("training loss (fixed 5k subset, median of seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(args: argparse.Namespace, runs: list[dict[str, dict[str, Any]]], curves: dict[str, list[float]],
             seconds: float) -> str:  # fmt: skip
    """The results section: command, table of median losses, per-seed drops, FLOPs and widths."""
    checkpoints = sorted({min(len(c) - 1, k // args.every) for c in curves.values() for k in (10, 25, 50, args.steps)})
    head = " | ".join(f"step {k * args.every}" for k in checkpoints)
    lines = [f"| method | FLOPs (seed 0) | widths (seed 0) | inits | {head} | drop after {args.steps} (per seed) |",
             "|---|---|---|---|" + "---|" * len(checkpoints) + "---|"]  # fmt: skip
    for m in METHODS:
        drops = ", ".join(f"{r[m]['curve'][0] - r[m]['curve'][-1]:.4f}" for r in runs)
        values = " | ".join(f"{curves[m][k]:.4f}" for k in checkpoints)
        first = runs[0][m]
        lines.append(f"| {m} | {first['flops']:,} | {first['widths']} | {', '.join(first['inits']) or '-'} | "
                     f"{values} | {drops} |")  # fmt: skip
    command = (f"python -m benchmarks.growth_vs_random --act {args.act} --widths {' '.join(map(str, args.widths))} "
               f"--factor {args.factor} --pretrain {args.pretrain} --steps {args.steps} --lr {args.lr} "
               f"--seeds {args.seeds} --every {args.every}")  # fmt: skip
    return "\n".join([
        f"## {args.act} MLP 784-{'-'.join(map(str, args.widths))}-10, grown to {args.factor}x its FLOPs",
        "",
        f"Command: `{command}` ({seconds:.0f} s, {torch.get_num_threads()} threads). Median over seeds "
        f"{list(range(args.seeds))} of the cross-entropy on a fixed 5,000-image training subset.",
        "",
        *lines,
        "",
        f"![loss curves](growth_vs_random_{args.act}.png)",
        "",
    ])  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act", choices=sorted(ACTS), default="relu")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 16])
    p.add_argument("--factor", type=float, default=1.5, help="FLOPs after growth / before")
    p.add_argument("--pretrain", type=int, default=300, help="SGD steps before growing")
    p.add_argument("--steps", type=int, default=100, help="SGD steps after growing (k)")
    p.add_argument("--every", type=int, default=5, help="measure the loss every this many steps")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--probe-batches", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="benchmarks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Run every seed, write the plot and append the results section to GROWTH.md; returns the medians."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    start = time.perf_counter()
    train_set = load_mnist("train")
    subset = (train_set[0][:5000], train_set[1][:5000])
    runs = [run_seed(args, seed, train_set, subset) for seed in range(args.seeds)]
    curves = median_curves(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = "-".join(map(str, args.widths))
    title = f"{args.act} MLP 784-{shape}-10 grown to {args.factor}x FLOPs; median of {args.seeds} seeds"
    plot(out / f"growth_vs_random_{args.act}.png", curves, args.every, title)
    section = markdown(args, runs, curves, time.perf_counter() - start)
    print(section)
    (out / f"growth_vs_random_{args.act}.md").write_text(section)
    logger.info("wrote %s", out / f"growth_vs_random_{args.act}.md")
    return curves


if __name__ == "__main__":
    main()
