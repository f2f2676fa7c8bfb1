"""A small embedded training loop: the default of :func:`fxmorph.morph`, usable on its own.

One loop, four parts a user can replace: the step (``step_fn(model, batch) -> scalar loss``; the default
is ``loss_fn(model(*inputs), targets)`` on ``(inputs, targets)`` batches), the optimizer (a factory, since
morph trains two different architectures), an optional penalty added to every step's loss (MorphNet's
FLOPs regularizer), and a tqdm progress bar. Data is whatever iterable of batches the user has (a list,
a ``DataLoader``); it is read once per epoch, on the device where the user put it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fxmorph.errors import FxmorphError, InputError
from fxmorph.validate import check_loss, first_line, run_failure_hint, split_batch

__all__ = ["EpochLog", "OptimizerFactory", "StepFn", "adam", "default_step", "fit"]

logger = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], torch.Tensor]
"""``step_fn(model, batch) -> loss``: a scalar tensor to minimise (the loop calls ``backward``)."""
OptimizerFactory = Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]
"""``optimizer(parameters) -> torch.optim.Optimizer``; called once per training phase."""


@dataclass(frozen=True)
class EpochLog:
    """One epoch of one phase: mean task loss, mean penalty (0 without one), steps, seconds."""

    phase: str
    epoch: int
    loss: float
    penalty: float
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def adam(lr: float) -> OptimizerFactory:
    """A factory of ``torch.optim.Adam(parameters, lr=lr)``."""

    def make(parameters: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=lr)

    return make


def _split(batch: Any) -> tuple[tuple[Any, ...], Any]:
    return split_batch(
        batch,
        "the default training step",
        "pass such batches, or pass step_fn(model, batch) -> loss to read your own batch format",
    )


def default_step(loss_fn: Callable[..., Any]) -> StepFn:
    """The step ``loss_fn(model(*inputs), targets)`` on a batch ``(inputs, targets)``."""

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = _split(batch)
        return loss_fn(model(*inputs), targets)

    return step


def _run_step(step: StepFn, model: nn.Module, batch: Any, where: str, at: str) -> Any:
    """``step(model, batch)``; the user's model, data or loss failing becomes an :class:`InputError`."""
    try:
        return step(model, batch)
    except FxmorphError:
        raise
    except Exception as exc:  # the user's model, batch and loss may raise anything
        inputs = batch[0] if isinstance(batch, list | tuple) and batch else batch
        inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
        hint = run_failure_hint(model, inputs, exc) or (
            "check that every batch is (inputs, targets) whose inputs the model accepts (like example_inputs) and "
            f"whose targets {where} accepts"
        )
        raise InputError(f"{at}: {where} failed ({first_line(exc)}): {hint}.") from exc


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def fit(
    model: nn.Module,
    data: Iterable[Any],
    step: StepFn,
    optimizer: OptimizerFactory,
    epochs: int,
    *,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: bool = True,
    phase: str = "train",
    where: str = "loss_fn",
) -> list[EpochLog]:
    """Train ``model`` in place for ``epochs`` passes over ``data``; returns one log per epoch.

    Each step: ``loss = step(model, batch) (+ penalty())``, ``backward``, optimizer step. The model is
    left in train mode. Preserves nothing: this is training.

    Raises:
        InputError: ``data`` yields no batch, a step fails on a batch (the model, batch or loss raised) or
            returns a non-scalar loss, no parameter requires grad, or ``optimizer`` returns no optimizer.
        FxmorphError: the loss became NaN or infinite (lower the learning rate or the penalty).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"{phase}: no parameter of the model requires grad: unfreeze it (`model.requires_grad_()`).")
    model.train()
    opt = optimizer(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise InputError(
            f"{phase}: the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer: pass a "
            "factory such as `lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)`."
        )
    logs = []
    for epoch in range(1, epochs + 1):
        start, total, total_penalty, steps = time.perf_counter(), 0.0, 0.0, 0
        bar = tqdm(data, desc=f"{phase} {epoch}/{epochs}", total=_length(data), disable=not progress, leave=False)
        for batch in bar:
            opt.zero_grad(set_to_none=True)
            loss = check_loss(_run_step(step, model, batch, where, f"{phase} epoch {epoch}, batch {steps + 1}"), where)
            extra = penalty() if penalty is not None else None
            (loss if extra is None else loss + extra).backward()
            opt.step()
            value, steps = float(loss.detach()), steps + 1
            if not math.isfinite(value):
                raise FxmorphError(
                    f"{phase}: the loss is {value} at epoch {epoch}, step {steps}: training diverged; "
                    "lower the learning rate (or the regularizer's strength)."
                )
            total += value
            total_penalty += float(extra.detach()) if extra is not None else 0.0
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        if steps == 0:
            raise InputError("data yielded no batch: pass a non-empty list or DataLoader of batches.")
        logs.append(EpochLog(phase, epoch, total / steps, total_penalty / steps, steps, time.perf_counter() - start))
        logger.info(
            "%s epoch %d/%d: loss %.4f, penalty %.4f, %d steps",
            phase,
            epoch,
            epochs,
            total / steps,
            total_penalty / steps,
            steps,
        )
    return logs
