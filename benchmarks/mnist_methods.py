"""The methods of the MNIST table: how each one turns training epochs into a model at a FLOPs budget.

Every method gets the same number of training epochs (``Setup.epochs``), counted in passes over the
training set: the methods that start from a trained dense model (Torch-Pruning, fxmorph shrink, morph)
share one dense checkpoint trained for ``Setup.pretrain`` epochs and spend the rest after it; uniform
width and grow-and-prune start from scratch and spend all of them. SGD with momentum 0.9 and a learning
rate that falls linearly to a hundredth over each method's training, the same for every method.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import fxmorph

logger = logging.getLogger("benchmarks.mnist")

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def lenet5(scale: float = 1.0) -> nn.Module:
    """Caffe's LeNet-5 (20-50-500; 4.586M FLOPs at scale 1), ReLU after every hidden layer."""
    c1, c2, h = (max(1, round(scale * n)) for n in (20, 50, 500))
    return nn.Sequential(nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, h), nn.ReLU(), nn.Linear(h, 10))  # fmt: skip


def lenet300(scale: float = 1.0) -> nn.Module:
    """LeNet-300-100 (532K FLOPs at scale 1) on flattened 28x28 images."""
    h1, h2 = (max(1, round(scale * n)) for n in (300, 100))
    return nn.Sequential(nn.Flatten(), nn.Linear(784, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


NETS: dict[str, Callable[[float], nn.Module]] = {"lenet300": lenet300, "lenet5": lenet5}
FACTORIZE: dict[str, tuple[str, ...]] = {"lenet300": ("1", "3"), "lenet5": ()}
"""Layers fxmorph's shrink splits by SVD before pruning (``shrink(..., factorize=...)``), chosen on
MNIST's validation split, pruning to 10x fewer FLOPs from the 2-epoch checkpoint:
LeNet-300-100's two hidden Linears (median of seeds 0-6: 97.97% against 97.95% splitting only the first
and 97.33% splitting none (seeds 0-2); splitting the 10-way classifier too was no better). LeNet-5's
FLOPs sit in its convolutions, and splitting fc1 lost 0.01 to 0.07 points (seeds 0-2), so its layers
stay whole."""
MORPH_STRENGTH: dict[str, float] = {"lenet300": 1.0, "lenet5": 0.1}
"""morph's regularizer strength in units of ``1 / FLOPs`` of the dense net (fxmorph's default is 1),
chosen on MNIST's validation split at 3x and 25x (seeds 0 and 1; strengths 1, 0.3, 0.1, 0.03): on LeNet-5
the default killed 292 of 570 channels in one epoch and left the net at 96.4% before the width step;
0.1 gave 98.82-98.99% at 3x and 98.37-98.52% at 25x against 98.52-98.64% and 97.78-97.89% at 1.
LeNet-300-100 did as well or better at 1 (95.06-95.14% at 25x against 93.94-94.84% at 0.1)."""
GROW_PRUNE_STEPS: dict[str, int] = {"lenet300": 3, "lenet5": 1}
"""Pruning steps of grow-and-prune, chosen on MNIST's validation split (seed 0, and seed 1 for LeNet-5):
on LeNet-5, three steps starved conv2 at the last one (7 -> 2 channels beside 107 fc1 neurons, where one
conv2 channel costs as many FLOPs as 43 of them), 93.0-94.9% at 40x against 98.4-98.5% in one step
(10x: 98.6% against 98.7-98.9%); LeNet-300-100 was as good in three (97.39% against 97.19% at 10x,
96.02% against 96.05% at 40x)."""


@dataclass
class Setup:
    """Data and the training budget shared by every method."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    epochs: float = 5.0
    pretrain: float = 2.0
    lr: float = 0.05
    finetune_lr: float = 0.05
    """Starting rate of every fine-tune after pruning (Torch-Pruning and fxmorph alike). The full rate:
    with 2 epochs left, a fifth of it left LeNet-300-100 0.5 to 1.8 points lower at 10x-40x for both."""
    batch_size: int = 64
    probe_batches: int = 16
    seed: int = 0
    quiet: bool = False

    def batches(self, fraction: float, generator: torch.Generator) -> Batches:
        """Shuffled training batches covering ``fraction`` of an epoch."""
        n = len(self.train[0])
        order = torch.randperm(n, generator=generator)[: max(1, int(fraction * n))]
        b = self.batch_size
        return [(self.train[0][order[i : i + b]], self.train[1][order[i : i + b]]) for i in range(0, len(order), b)]

    def probe(self, generator: torch.Generator) -> Batches:
        """A few training batches for Taylor scores, growth gradients and calibration."""
        return self.batches(self.probe_batches * self.batch_size / len(self.train[0]), generator)


class Schedule:
    """SGD with momentum whose learning rate falls linearly from ``lr`` to ``lr / 100`` over ``epochs``,
    possibly spread over several calls of :meth:`fit` (the model may be replaced between them)."""

    def __init__(self, setup: Setup, epochs: float, lr: float | None = None, seed: int = 0) -> None:
        self.setup, self.total, self.lr = setup, epochs, setup.lr if lr is None else lr
        self.done = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    def fit(self, model: nn.Module, epochs: float, what: str) -> nn.Module:
        """Train ``model`` in place for ``epochs`` (fractional allowed) of the schedule."""
        whole, rest = int(epochs + 1e-9), epochs - int(epochs + 1e-9)
        fractions = [1.0] * whole + ([rest] if rest > 1e-9 else [])
        batches = [b for f in fractions for b in self.setup.batches(f, self.generator)]
        if not batches:
            return model
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        per_batch = epochs / len(batches)
        model.train()
        for xb, yb in tqdm(batches, desc=what, leave=False, disable=self.setup.quiet):
            for group in opt.param_groups:
                group["lr"] = self.lr * (1.0 - 0.99 * min(self.done / self.total, 1.0))
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            self.done += per_batch
        return model


def accuracy(model: nn.Module, setup: Setup) -> float:
    """Test accuracy in eval mode."""
    model.eval()
    with torch.no_grad():
        pairs = zip(setup.test[0].split(2000), setup.test[1].split(2000), strict=True)
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in pairs)
    return right / len(setup.test[0])


def uniform_scale(net: str, budget: int, x: torch.Tensor) -> float:
    """The largest width scale of ``net`` whose FLOPs stay at or below ``budget`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fxmorph.count_flops(NETS[net](mid), (x,)) <= budget else (lo, mid)
    return lo


def dense(setup: Setup, net: str, epochs: float) -> nn.Module:
    """The full LeNet trained from scratch for ``epochs``."""
    torch.manual_seed(setup.seed)
    model = NETS[net](1.0)
    return Schedule(setup, epochs, seed=setup.seed).fit(model, epochs, f"{net} dense")


def uniform(setup: Setup, net: str, budget: int, x: torch.Tensor, _ckpt: nn.Module) -> nn.Module:
    """The LeNet narrowed by one width multiplier to the budget, trained from scratch for every epoch."""
    torch.manual_seed(setup.seed)
    model = NETS[net](uniform_scale(net, budget, x))
    return Schedule(setup, setup.epochs, seed=setup.seed).fit(model, setup.epochs, "uniform")


def torch_pruning(setup: Setup, net: str, budget: int, x: torch.Tensor, ckpt: nn.Module) -> nn.Module:
    """Torch-Pruning's magnitude pruner (one ratio, bisected to the budget) on the dense checkpoint, then
    fine-tuned for the remaining epochs."""
    from benchmarks import tp_adapter

    _, model = tp_adapter.match_flops(ckpt, x, budget, None, under=True, high=0.995)
    rest = setup.epochs - setup.pretrain
    return Schedule(setup, rest, setup.finetune_lr, seed=setup.seed).fit(model, rest, "torch-pruning")


def _drop_inputs(model: nn.Module, x: torch.Tensor, data: Batches) -> nn.Module:
    """fxmorph's drop-inputs pass where the model reads its input through a Linear: input features that
    are constant over the whole training set go (exact on it)."""
    from fxmorph.passes import PASSES
    from fxmorph.passes.base import PassContext, Pipeline

    if "drop-inputs" not in PASSES:
        return model
    ctx = PassContext((x,), data=data, loss_fn=F.cross_entropy)
    return Pipeline([PASSES["drop-inputs"]()])(fxmorph.trace(model, (x,)), ctx).gm


def shrink(setup: Setup, net: str, budget: int, x: torch.Tensor, ckpt: nn.Module, steps: int = 1) -> nn.Module:
    """fxmorph shrink with Taylor importance on the dense checkpoint, then fine-tuning (as Torch-Pruning
    gets); input features constant on the training set are dropped first (exact), and the kept ones
    are then ranked against the hidden neurons, and the layers :data:`FACTORIZE` names are split by
    SVD so that their rank directions are ranked too. ``param_cost=0``: the budget and the goal are FLOPs,
    not batch-1 latency (the default's parameter cost cut LeNet-5's fc1 to 36 at 10x, 98.81% against
    99.01% without it). ``steps`` > 1 prunes in geometric steps, each fine-tuned: with this short
    schedule that did no better (LeNet-5 at 10x: 98.97% in 2 steps against 99.14% in one)."""
    rest = setup.epochs - setup.pretrain
    schedule = Schedule(setup, rest, setup.finetune_lr, seed=setup.seed)
    model = _drop_inputs(copy.deepcopy(ckpt), x, setup.batches(1.0, schedule.generator))
    start = fxmorph.count_flops(model, (x,))
    for s in range(1, steps + 1):
        target = int(start * (budget / start) ** (s / steps))
        model = fxmorph.shrink(model, target, (x,), data=setup.probe(schedule.generator), loss_fn=F.cross_entropy,
                               criterion="taylor", round_to=1, max_prune=0.99, param_cost=0,
                               factorize=FACTORIZE[net], seed=setup.seed)  # fmt: skip
        schedule.fit(model, rest / steps, f"shrink {s}/{steps}")
    return model


def morph(setup: Setup, net: str, budget: int, x: torch.Tensor, ckpt: nn.Module) -> nn.Module:
    """MorphNet's cycle (fxmorph.morph) on the dense checkpoint: regularized training (strength from
    :data:`MORPH_STRENGTH`), dead channels out, the width multiplier to the budget, fine-tuning, in the
    remaining epochs."""
    rest = round(setup.epochs - setup.pretrain)
    train_epochs = max(1, rest // 2)
    data = setup.batches(1.0, torch.Generator().manual_seed(setup.seed))
    strength = MORPH_STRENGTH[net] / fxmorph.count_flops(ckpt, (x,))
    model, _ = fxmorph.morph(ckpt, budget, (x,), data, F.cross_entropy, epochs=train_epochs, strength=strength,
                             finetune_epochs=max(rest - train_epochs, 0), round_to=1, progress=not setup.quiet,
                             seed=setup.seed)  # fmt: skip
    return model


def grow_and_prune(setup: Setup, net: str, budget: int, x: torch.Tensor, _ckpt: nn.Module,
                   seed_width: float = 0.25, rounds: int = 2, steps: int | None = None) -> nn.Module:  # fmt: skip
    """NeST: a seed at ``seed_width``, grown twice by gradient to the dense FLOPs (each round trained),
    then pruned with Taylor importance to the budget in ``steps`` fine-tuned steps (default
    :data:`GROW_PRUNE_STEPS`; the layers :data:`FACTORIZE` names split by SVD at the first); every epoch
    counts."""
    steps = GROW_PRUNE_STEPS[net] if steps is None else steps
    torch.manual_seed(setup.seed)
    schedule = Schedule(setup, setup.epochs, seed=setup.seed)
    model = NETS[net](seed_width)
    dense_flops = fxmorph.count_flops(NETS[net](1.0), (x,))
    train_share = setup.epochs * 0.6 / (rounds + 1)
    schedule.fit(model, train_share, "seed")
    for r in range(1, rounds + 1):
        flops = fxmorph.count_flops(model, (x,))
        goal = int(flops * (dense_flops / flops) ** (1 / (rounds - r + 1)))
        model = fxmorph.grow(model, (x,), budget_flops=goal, data=setup.probe(schedule.generator),
                             loss_fn=F.cross_entropy, round_to=1, seed=setup.seed + r)  # fmt: skip
        schedule.fit(model, train_share, f"grown {r}")
    model = _drop_inputs(model, x, setup.batches(1.0, schedule.generator))
    start = fxmorph.count_flops(model, (x,))
    for s in range(1, steps + 1):
        target = int(start * (budget / start) ** (s / steps))
        model = fxmorph.shrink(model, target, (x,), data=setup.probe(schedule.generator), loss_fn=F.cross_entropy,
                               criterion="taylor", round_to=1, max_prune=0.99, param_cost=0,
                               factorize=FACTORIZE[net], seed=setup.seed)  # fmt: skip
        schedule.fit(model, setup.epochs * 0.4 / steps, f"prune {s}/{steps}")
    return model


METHODS: dict[str, Callable[..., nn.Module]] = {
    "uniform": uniform,
    "torch-pruning": torch_pruning,
    "fxmorph shrink": shrink,
    "fxmorph morph": morph,
    "fxmorph grow-and-prune": grow_and_prune,
}
