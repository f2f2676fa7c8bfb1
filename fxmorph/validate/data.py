"""Checks of the training data and the loss: batches, their first run through the model, and loss values."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fxmorph.errors import InputError
from fxmorph.validate.model import (
    check_tensor_inputs,
    check_trainable,
    first_line,
    frozen_mode,
    run_failure_hint,
)

__all__ = ["check_data", "check_first_batch", "check_loss", "split_batch"]


def check_data(data: Any, who: str, *, reads: int = 1) -> tuple[Iterable[Any], Any]:
    """``data`` as an iterable with at least one batch; a one-shot iterator is accepted only when read once.

    Returns the data to use and its first batch: ``data`` itself, or for an iterator an equivalent one
    (its first batch, read to check it, is put back in front).
    """
    if not isinstance(data, Iterable) or isinstance(data, str | bytes | torch.Tensor):
        raise InputError(
            f"{who}: data must be an iterable of batches (a list or a DataLoader), got {type(data).__name__}."
        )
    if isinstance(data, Iterator) and reads > 1:
        raise InputError(
            f"{who}: data is a one-shot iterator, but it is read {reads} times here: pass a list of batches "
            "or a DataLoader."
        )
    # A fresh iterator over a re-iterable: the data loses no batch.
    first = next(data if isinstance(data, Iterator) else iter(data), None)
    if first is None:
        raise InputError(f"{who}: data yielded no batch: pass a non-empty list or DataLoader of batches.")
    return (itertools.chain([first], data) if isinstance(data, Iterator) else data), first


def split_batch(
    batch: Any, who: str, fix: str = "yield such pairs (a DataLoader over a TensorDataset(x, y) does)"
) -> tuple[tuple[Any, ...], Any]:
    """``(inputs tuple, targets)`` of a batch ``(inputs, targets)``; ``fix`` ends the error message."""
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise InputError(
            f"{who}: each batch of data must be a pair (inputs, targets), got {type(batch).__name__}: {fix}."
        )
    inputs = batch[0]
    return (tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)), batch[1]


def check_first_batch(
    model: nn.Module,
    batch: Any,
    who: str,
    *,
    pair: bool = True,
    loss_fn: Callable[..., Any] | None = None,
    needs: str = "",
) -> None:
    """The first ``batch`` of the data runs through ``model`` (eval mode; nothing is written). With ``loss_fn``,
    that same forward runs with gradients on and ``loss_fn(outputs, targets)`` must be a finite scalar that
    depends on the parameters (no ``backward``); ``needs`` says what ``who`` uses the gradients for, for the
    message about a frozen model."""

    if pair:
        inputs, targets = split_batch(batch, who)
    else:
        raw = batch[0] if isinstance(batch, list | tuple) else batch
        inputs, targets = (tuple(raw) if isinstance(raw, list | tuple) else (raw,)), None
    check_tensor_inputs(inputs, what="the first batch's input")
    # Gradients on only when the loss is checked: check_loss needs the graph to see that the loss depends on the
    # parameters.
    with frozen_mode(model), torch.enable_grad() if loss_fn is not None else torch.no_grad():
        try:
            outputs = model(*inputs)
        except Exception as exc:  # the user's model and data may raise anything
            hint = run_failure_hint(model, inputs, exc) or (
                "every batch must be (inputs, targets) whose inputs the model accepts, like example_inputs"
            )
            raise InputError(
                f"{who}: the first batch of data does not run through the model ({first_line(exc)}): {hint}."
            ) from exc
        if loss_fn is not None:
            check_trainable(model, who, needs)
            check_loss(_first_loss(loss_fn, outputs, targets, who), f"{who}: loss_fn", batch=1)


def _first_loss(loss_fn: Callable[..., Any], outputs: Any, targets: Any, who: str) -> Any:
    """``loss_fn(outputs, targets)``, any failure turned into an :class:`InputError` that says how it is called."""
    try:
        return loss_fn(outputs, targets)
    except Exception as exc:  # the user's loss may raise anything
        raise InputError(
            f"{who}: loss_fn failed on the first batch of data ({first_line(exc)}): it is called as "
            "loss_fn(model(*inputs), targets) and must return a scalar tensor; check that it takes those two "
            "arguments and that the targets have the dtype and shape it expects (class indices are int64)."
        ) from exc


def check_loss(loss: Any, where: str, *, batch: int | None = None) -> torch.Tensor:
    """``loss`` as a 0-d tensor if it is a scalar tensor that requires grad, and with ``batch`` (the batch it
    came from, counted from 1, for the message) also finite; otherwise an :class:`InputError`. ``where`` names
    what returned it (``"shrink: loss_fn"``)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InputError(
            f"{where} must return a scalar tensor, got {got}: reduce the loss (for example with "
            ".mean(), or the loss's default reduction)."
        )
    if not loss.requires_grad:
        raise InputError(
            f"{where} returned a loss that does not depend on the model's parameters (no grad): compute it from "
            "the model's outputs with torch operations, not under torch.no_grad() nor through .detach(), .item() "
            "or numpy."
        )
    if batch is not None and not torch.isfinite(loss.detach()).all():
        raise InputError(
            f"{where} returned {float(loss.detach())} on batch {batch} of data, but the loss must be finite on every "
            "batch: check that batch for NaN or inf inputs or targets, and the weights and loss_fn."
        )
    return loss.reshape(())
