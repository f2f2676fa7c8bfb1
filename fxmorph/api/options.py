"""The options of ``shrink``, ``grow`` and ``morph``: frozen dataclasses, each validated once.

Each entry point keeps its keyword API (same names, defaults and docstrings), builds one options object
from it and passes that object down; what the options mean belongs to the passes, which the objects
build (:meth:`ShrinkOptions.cut_pass`, :meth:`GrowOptions.grow_pass`). Validation covers what the
options say on their own and together (``criterion="taylor"`` needs ``data`` and ``loss_fn``); what
needs the model (a ``protect`` path, a budget's reach, the first batch of ``data``) is checked by the
entry point or by the pass's ``requires``. The layers above (``io``, the CLI) read the defaults here,
so none of them reaches into a pass module for one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fxmorph.analysis.latency import LatencyBudget
from fxmorph.api.runtimes import LatencyRuntime
from fxmorph.capture.export import CAPTURES, Capture
from fxmorph.errors import BudgetError, InputError
from fxmorph.passes.grow import GrowPass
from fxmorph.passes.grow_init import DATA_INITS, INITS
from fxmorph.passes.importance import CRITERIA
from fxmorph.passes.prune import BudgetPass, PrunePass
from fxmorph.passes.rounding import AUTO, Grid, RoundTo, check_round_to
from fxmorph.passes.select import DEFAULT_MAX_PRUNE, DEFAULT_PARAM_COST, DEFAULT_ROUND_TO
from fxmorph.passes.select_latency import KEEPS, LatencyKeep
from fxmorph.passes.width import WidthPass
from fxmorph.validate import check_callable, check_number, check_prefixes, check_seed

__all__ = [
    "AUTO",
    "CAPTURES",
    "DEFAULT_MAX_PRUNE",
    "DEFAULT_PARAM_COST",
    "DEFAULT_ROUND_TO",
    "KEEPS",
    "STRATEGIES",
    "Budget",
    "GrowOptions",
    "MorphOptions",
    "Options",
    "RoundTo",
    "ShrinkOptions",
    "Strategy",
]

Budget = float | int | str
"""A FLOPs budget as users write it: absolute, a fraction of the model, ``"50%"``, ``"1.2G"``."""

Strategy = Literal["prune", "width"]
STRATEGIES: tuple[Strategy, ...] = ("prune", "width")
"""How shrink cuts: importance per FLOP over every group (``prune``), or one multiplier (``width``)."""


def _check_criterion(criterion: Any) -> None:
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r}: choose one of {', '.join(CRITERIA)}.")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{name} must be a non-negative int, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class Options:
    """What every entry point takes: a budget, data and a loss, the rounding grid, protected module
    paths, a seed and extra leaf modules for tracing. Subclasses validate in ``__post_init__`` (in the
    order their entry point always has) and normalise ``protect`` to a tuple and ``seed`` to an int."""

    budget_flops: Budget | None = None
    data: Iterable[Any] | None = None
    loss_fn: Callable[..., Any] | None = None
    round_to: RoundTo = DEFAULT_ROUND_TO
    protect: tuple[str, ...] = ()
    seed: int = 0
    leaf_modules: Iterable[type | str] = ()
    keep_class: bool | None = None
    """Give the result back as the user's own class: ``None`` where it can be proven equal to the graph (else
    the GraphModule, with a warning), ``True`` always (else a WriteBackError), ``False`` never."""
    uniform_blocks: bool = False
    """Keep the groups playing one role in the model's repeated blocks at one width (see
    :mod:`fxmorph.passes.uniform`)."""
    capture: Capture = "auto"
    """How the model is captured (see :func:`fxmorph.trace`): ``"fx"``, ``"export"`` or ``"auto"``."""

    def _normalise(self, name: str, value: Any) -> None:
        # A frozen dataclass sets fields only through object.__setattr__, as dataclasses do themselves.
        object.__setattr__(self, name, value)

    def _check_protect_and_seed(self) -> None:
        self._normalise("protect", check_prefixes("protect", self.protect))
        self._normalise("seed", check_seed(self.seed))
        if not (self.keep_class is None or isinstance(self.keep_class, bool)):
            raise InputError(f"keep_class must be None, True or False, got keep_class={self.keep_class!r}.")
        if self.capture not in CAPTURES:
            raise InputError(f"unknown capture {self.capture!r}: choose one of {', '.join(CAPTURES)}.")
        if not isinstance(self.uniform_blocks, bool):
            raise InputError(f"uniform_blocks must be True or False, got uniform_blocks={self.uniform_blocks!r}.")


@dataclass(frozen=True, kw_only=True)
class ShrinkOptions(Options):
    """The options of :func:`fxmorph.shrink` (see its docstring for each)."""

    budget_flops: Budget | None = None
    budget_latency: Budget | None = None
    """A latency budget: a fraction or percentage of the model's measured latency, or a time (``"12ms"``)."""
    runtime: str | LatencyRuntime = "onnxruntime"
    """The runtime a latency budget is measured on: a registered name, or a runtime object."""
    latency_threads: int | None = None
    """The runtime's intra-op threads for a latency budget (None: every core)."""
    latency_keep: LatencyKeep = "model"
    """What a latency budget keeps the most of (:data:`~fxmorph.passes.select_latency.LatencyKeep`)."""
    criterion: str = "l1"
    strategy: Strategy = "prune"
    min_width: int | None = None
    """No group goes below this many channels; 0 lets the groups that can go whole go. None (the default): 0 under a
    latency budget (a removal saves the fixed time of the ops that go with it), 1 otherwise (:attr:`floor`)."""
    max_prune: float | Literal["auto"] = AUTO
    param_cost: float = DEFAULT_PARAM_COST
    calibrate: bool = False
    factorize: bool | tuple[str, ...] = False

    def __post_init__(self) -> None:
        self._check_budgets()
        _check_criterion(self.criterion)
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}.")
        self._check_latency_keep()
        if not check_round_to(self.round_to):
            raise InputError(f"round_to must be 'auto' or a positive integer, got round_to={self.round_to!r}.")
        if self.min_width is not None and (
            isinstance(self.min_width, bool) or not isinstance(self.min_width, int) or self.min_width < 0
        ):
            raise InputError(
                f"min_width must be a non-negative integer, got min_width={self.min_width!r}: 1 keeps every group, "
                "0 also lets the groups that can go whole go (a dense layer's new features); None (the default) is 0 "
                "under a latency budget and 1 otherwise."
            )
        if not (isinstance(self.max_prune, str) and self.max_prune == AUTO):
            check_number("max_prune", self.max_prune, low=0.0, high=1.0, open_low=True)
        check_callable("loss_fn", self.loss_fn)
        check_number("param_cost", self.param_cost, low=0.0)
        if self.criterion == "taylor" and (self.data is None or self.loss_fn is None):
            raise InputError("criterion='taylor' needs data and loss_fn: pass both, or use 'l1', 'l2' or 'bn_scale'.")
        if self.calibrate and self.data is None:
            raise InputError("calibrate=True needs data: pass batches of (inputs, targets).")
        self._check_protect_and_seed()
        if not isinstance(self.factorize, bool):
            self._normalise("factorize", check_prefixes("factorize", self.factorize))

    def _check_budgets(self) -> None:
        """At least one budget; a latency budget's thread count (the budgets themselves need the model)."""
        if self.budget_flops is None and self.budget_latency is None:
            raise BudgetError("shrink needs a budget: pass budget_flops ('50%'), budget_latency ('60%'), or both.")
        if self.budget_latency is not None and self.latency_threads is not None:
            _check_positive_int("latency_threads", self.latency_threads)

    def _check_latency_keep(self) -> None:
        """``latency_keep`` is one of :data:`~fxmorph.passes.select_latency.KEEPS`, and only says something under a
        latency budget's pruning."""
        if not isinstance(self.latency_keep, str) or self.latency_keep not in KEEPS:
            raise InputError(
                f"unknown latency_keep {self.latency_keep!r}: choose one of {', '.join(KEEPS)} ('model' keeps the most "
                "FLOPs while keeping the parameters a FLOPs budget keeps; 'flops' the most FLOPs)."
            )
        if self.latency_keep != "model" and (self.budget_latency is None or self.strategy != "prune"):
            raise InputError(
                f"latency_keep={self.latency_keep!r} says what a latency budget's pruning keeps: pass budget_latency "
                "with strategy='prune', or leave latency_keep out."
            )

    @property
    def floor(self) -> int:
        """The width no group goes below: ``min_width``, or where it is None, 0 under a latency budget (groups may go
        whole) and 1 otherwise."""
        if self.min_width is not None:
            return self.min_width
        return 0 if self.budget_latency is not None else 1

    @property
    def cuts_with_data(self) -> bool:
        """Whether the cut reads ``data``: Taylor importance, or gradient-chosen growth (width, a loss)."""
        uses = self.criterion == "taylor" or (self.strategy == "width" and self.loss_fn is not None)
        return self.data is not None and uses

    def cut_pass(self, budget: int, grid: Grid, max_prune: float, latency: LatencyBudget | None = None) -> BudgetPass:
        """The pass that cuts (or, with ``strategy="width"``, grows) to ``budget`` FLOPs on ``grid`` (and to
        ``latency``)."""
        shared = {
            "criterion": self.criterion,
            "round_to": grid,
            "min_width": self.floor,
            "protect": self.protect,
            "uniform_blocks": self.uniform_blocks,
            "latency": latency,
        }
        if self.strategy == "prune":
            kept = KEEPS[self.latency_keep]
            return PrunePass(budget, max_prune=max_prune, param_cost=self.param_cost, param_values=kept, **shared)
        return WidthPass(budget, **shared)

    def settings(self, rounding: str) -> dict[str, Any]:
        """The report's ``settings``: every option as given, and ``rounding``, the grid used."""
        factorize = self.factorize if isinstance(self.factorize, bool) else list(self.factorize)
        latency: dict[str, Any] = {}
        if self.budget_latency is not None:
            runtime = self.runtime if isinstance(self.runtime, str) else type(self.runtime).__name__
            latency = {
                "budget_latency": self.budget_latency,
                "runtime": runtime,
                "latency_threads": self.latency_threads,
                "latency_keep": self.latency_keep,
            }
        return {
            **latency,
            "criterion": self.criterion,
            "strategy": self.strategy,
            "round_to": self.round_to,
            "min_width": self.floor,
            "max_prune": self.max_prune,
            "rounding": rounding,
            "param_cost": self.param_cost,
            "protect": list(self.protect),
            "calibrate": self.calibrate,
            "factorize": factorize,
            "seed": self.seed,
            "keep_class": self.keep_class,
            "uniform_blocks": self.uniform_blocks,
        }


@dataclass(frozen=True, kw_only=True)
class GrowOptions(Options):
    """The options of :func:`fxmorph.grow` (see its docstring for each); exactly one of
    ``budget_flops`` and ``channels``."""

    channels: int | Mapping[int | str, int] | None = None
    init: str = "auto"
    max_factor: float = 4.0
    rank: int = 8
    batches: int = 4
    scale: float = 0.5
    noise: float = 0.01

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}.")
        if self.init in DATA_INITS and self.data is None:
            raise InputError(
                f"init='{self.init}' needs data and loss_fn (gradients choose its values): pass both, "
                "or use init='net2net' or 'zero'."
            )
        if self.data is not None and self.loss_fn is None:
            raise InputError("data needs loss_fn: pass a loss such as torch.nn.functional.cross_entropy.")
        check_callable("loss_fn", self.loss_fn)
        if not check_round_to(self.round_to):
            raise InputError(f"round_to must be 'auto' or a positive int, got {self.round_to!r}.")
        _check_positive_int("rank", self.rank)
        _check_positive_int("batches", self.batches)
        check_number("max_factor", self.max_factor, low=1.0, open_low=True)
        check_number("scale", self.scale, low=0.0)
        check_number("noise", self.noise, low=0.0)
        if (self.budget_flops is None) == (self.channels is None):
            raise InputError("pass exactly one of budget_flops and channels.")
        self._check_protect_and_seed()

    def grow_pass(self, budget: int | None, channels: Mapping[int, int]) -> GrowPass:
        """The pass that grows to ``budget`` FLOPs, or by ``channels`` per group id."""
        return GrowPass(
            budget,
            tuple(sorted(channels.items())),
            self.init,
            self.round_to,
            self.max_factor,
            self.rank,
            self.batches,
            self.scale,
            self.noise,
            self.protect,
            uniform_blocks=self.uniform_blocks,
        )

    def settings(self) -> dict[str, Any]:
        """The report's ``settings``."""
        return {
            "init": self.init,
            "round_to": self.round_to,
            "max_factor": self.max_factor,
            "rank": self.rank,
            "batches": self.batches,
            "scale": self.scale,
            "noise": self.noise,
            "protect": list(self.protect),
            "seed": self.seed,
            "keep_class": self.keep_class,
            "uniform_blocks": self.uniform_blocks,
            "data": self.data is not None,
        }


@dataclass(frozen=True, kw_only=True)
class MorphOptions(Options):
    """The options of :func:`fxmorph.morph` (see its docstring for each). ``criterion`` None resolves to
    ``"taylor"`` with a ``loss_fn`` and ``"l1"`` without; ``data`` must be a non-empty re-iterable."""

    budget_flops: Budget
    data: Iterable[Any]
    strength: float | None = None
    threshold: float = 1e-2
    epochs: int = 2
    finetune_epochs: int = 1
    optimizer: Callable[..., Any] | None = None
    lr: float = 5e-3
    finetune_lr: float = 1e-3
    step_fn: Callable[..., Any] | None = None
    evaluate: Callable[..., Any] | None = None
    criterion: str | None = None
    recalibrate: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "finetune_epochs", "recalibrate"):
            _check_count(name, getattr(self, name))
        self._check_callables()
        for name in ("lr", "finetune_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise InputError(f"{name} must be a positive finite number, got {value!r}.")
        if not check_round_to(self.round_to):
            raise InputError(f"round_to must be 'auto' or a positive int, got {self.round_to!r}.")
        self._check_protect_and_seed()
        self._normalise("criterion", self.criterion or ("taylor" if self.loss_fn is not None else "l1"))
        _check_criterion(self.criterion)
        if self.criterion == "taylor" and self.loss_fn is None:
            raise InputError("criterion='taylor' needs loss_fn; with step_fn alone use 'l1', 'l2' or 'bn_scale'.")
        self._check_data()

    def _check_callables(self) -> None:
        if self.loss_fn is None and self.step_fn is None:
            raise InputError("pass loss_fn (used as loss_fn(model(inputs), targets)) or step_fn(model, batch) -> loss.")
        if isinstance(self.optimizer, torch.optim.Optimizer):
            raise InputError(
                "optimizer must be a factory, not an optimizer: morph trains two different architectures, so pass "
                "for example `optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)`."
            )
        named = (
            ("loss_fn", self.loss_fn),
            ("step_fn", self.step_fn),
            ("optimizer", self.optimizer),
            ("evaluate", self.evaluate),
        )
        for name, value in named:
            if value is not None and not callable(value):
                raise InputError(f"{name} must be callable, got {type(value).__name__}.")

    def _check_data(self) -> None:
        """A non-empty re-iterable: morph reads the data in every phase (this reads its first batch)."""
        if self.data is None:
            raise InputError("morph needs data: an iterable of batches (a list or a DataLoader) to train on.")
        if isinstance(self.data, Iterator):
            raise InputError(
                "data is a one-shot iterator; morph reads it several times (training, growth or importance, "
                "fine-tuning): pass a list of batches or a DataLoader."
            )
        if not isinstance(self.data, Iterable):
            raise InputError(f"data must be an iterable of batches, got {type(self.data).__name__}.")
        if next(iter(self.data), None) is None:
            raise InputError("data yielded no batch: pass a non-empty list or DataLoader of batches.")

    def width_step(self, budget: int, leaf_modules: tuple[type | str, ...]) -> ShrinkOptions:
        """The options of the width step: ``shrink(strategy="width")`` to ``budget`` FLOPs, with the data
        and loss when there is a loss (Taylor importance, gradient-chosen growth)."""
        with_data = {"data": self.data, "loss_fn": self.loss_fn} if self.loss_fn is not None else {}
        return ShrinkOptions(
            budget_flops=budget,
            strategy="width",
            criterion=str(self.criterion),
            round_to=self.round_to,
            protect=self.protect,
            seed=self.seed,
            leaf_modules=leaf_modules,
            keep_class=False,  # an inner step: morph gives its own result back as the user's class
            uniform_blocks=self.uniform_blocks,
            capture=self.capture,
            **with_data,
        )

    def settings(self) -> dict[str, Any]:
        """The report's ``settings`` (``strength`` as given: morph records the regularizer's own)."""
        return {
            "strength": self.strength,
            "threshold": self.threshold,
            "epochs": self.epochs,
            "finetune_epochs": self.finetune_epochs,
            "optimizer": "custom" if self.optimizer else "adam",
            "lr": self.lr,
            "finetune_lr": self.finetune_lr,
            "criterion": self.criterion,
            "round_to": self.round_to,
            "recalibrate": self.recalibrate,
            "seed": self.seed,
            "keep_class": self.keep_class,
            "uniform_blocks": self.uniform_blocks,
            "step_fn": self.step_fn is not None,
        }
