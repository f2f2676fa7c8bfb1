"""Shared checks of what users pass to fxmorph's entry points.

Every check raises an :mod:`fxmorph.errors` exception whose message says what was wrong and what to do,
before any long step starts and without touching the user's model. The table of bad inputs per entry
point, and the test of each, is in ``docs/bad_input.md``.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxmorph.errors import InputError

__all__ = [
    "LOW_PRECISION",
    "SUPPORTED_DTYPES",
    "check_callable",
    "check_count",
    "check_data",
    "check_first_batch",
    "check_leaf_modules",
    "check_loss",
    "check_model",
    "check_number",
    "check_options",
    "check_out_path",
    "check_prefixes",
    "check_seed",
    "check_tensor_inputs",
    "check_tolerances",
    "check_trainable",
    "first_line",
    "frozen_mode",
    "low_precision_dtype",
    "model_dtype",
    "run_failure_hint",
    "split_batch",
]

# Parameter dtypes fxmorph takes; integer buffers (``num_batches_tracked``) are fine whatever their dtype.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Dtypes too coarse for grow's SVDs and function checks or morph's training: grow works on a float32 copy, morph
# refuses.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def frozen_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration, then restore every module's training flag."""
    # Every module's own flag, not just the root's: a model in training may hold a frozen BatchNorm in eval mode on
    # purpose, and ``model.train()`` afterwards would flip it.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of ``exc``, at most ``limit`` characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- models ----------------------------------------------------------------------------------------------
def check_model(model: Any, *, error: type[Exception] = InputError) -> None:
    """``model`` is an ``nn.Module`` whose tensors hold data (not on the meta device) of a supported dtype."""
    if not isinstance(model, nn.Module):
        raise error(f"expected a torch.nn.Module, got {type(model).__name__}: pass the model object itself.")
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise error(
                    f"{kind} '{name}' is on the meta device and has no data: materialise the model (for example "
                    "`model.to_empty(device='cpu')` and load a state dict) before calling fxmorph."
                )
            if kind == "parameter" and t.dtype not in SUPPORTED_DTYPES:
                raise error(
                    f"parameter '{name}' has dtype {t.dtype}; fxmorph supports float32, float64, float16 and "
                    "bfloat16 models: convert the model with `model.float()` first."
                )


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of ``model``'s parameters when they all share one, else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def low_precision_dtype(model: nn.Module) -> torch.dtype | None:
    """float16 or bfloat16 when every floating parameter and buffer of ``model`` has that dtype."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) in LOW_PRECISION:
        return dtype
    return None


def _model_device(model: nn.Module) -> torch.device | None:
    """The one device of every parameter and buffer of ``model``, else None (none, or several)."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def check_trainable(model: nn.Module, who: str, needs: str = "trains the model") -> None:
    """At least one parameter of ``model`` requires grad (``who needs`` says why it must)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(
            f"{who} {needs}, but none of its parameters requires grad: unfreeze it first "
            "(`model.requires_grad_(True)`, or at least the layers to reshape)."
        )


def check_leaf_modules(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple[type | str, ...]:
    """``leaf_modules`` as a tuple of module classes and qualified names that exist in ``model``."""
    if isinstance(leaf_modules, str | type):
        raise InputError(
            f"leaf_modules must be a list of module classes or names, got {leaf_modules!r} alone: pass "
            f"leaf_modules=[{getattr(leaf_modules, '__name__', repr(leaf_modules))}]."
        )
    if not isinstance(leaf_modules, Iterable):
        raise InputError(f"leaf_modules must be a list of module classes or names, got {type(leaf_modules).__name__}.")
    out = tuple(leaf_modules)
    names = None
    for entry in out:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            continue
        if not isinstance(entry, str):
            raise InputError(
                f"leaf_modules entry {entry!r} is neither a module class nor a qualified module name: pass for "
                "example `leaf_modules=[MyBlock]` or `leaf_modules=['encoder.block']`."
            )
        names = names if names is not None else [n for n, _ in model.named_modules() if n]
        # A GraphModule keeps only the modules its graph calls, so a name of the model it came from may be missing
        # here legitimately.
        if entry not in names and not isinstance(model, torch.fx.GraphModule):
            close = difflib.get_close_matches(entry, names, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else " See `dict(model.named_modules())`."
            raise InputError(f"leaf_modules names '{entry}', but the model has no submodule of that name.{hint}")
    return out


# -- example inputs --------------------------------------------------------------------------------------
def check_tensor_inputs(inputs: Sequence[Any], *, what: str = "example input") -> None:
    """No input tensor is on the meta device (fake or meta inputs hold no data to run on)."""
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise InputError(
                f"{what} {i} is on the meta device and has no data: pass real tensors, for example "
                f"`torch.randn({', '.join(str(s) for s in x.shape)})`."
            )


def run_failure_hint(model: nn.Module, inputs: Sequence[Any], exc: BaseException) -> str | None:
    """A specific fix when ``model(*inputs)`` failed with ``exc`` for a reason fxmorph can name, else None."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    # A hard-coded ``.cuda()`` is the usual cause.
    if not torch.cuda.is_available() and ("cuda" in text or "nvidia driver" in text):
        return "the model moves tensors to CUDA, which this machine lacks: use the input's device (`x.device`) instead"
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    dtype, device = model_dtype(model), _model_device(model)
    for i, x in enumerate(tensors):
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            return (
                f"input {i} is {_dtype_name(x.dtype)} but the model's parameters are {_dtype_name(dtype)}: pass "
                f"inputs of the model's dtype (`x.to(torch.{_dtype_name(dtype)})`) or convert the model"
            )
        if device is not None and x.device != device:
            return f"input {i} is on {x.device} but the model is on {device}: move both to one device"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its cause or context, theirs, and so on."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # exceptions can reference each other in a cycle
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


# -- data ------------------------------------------------------------------------------------------------
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


# -- scalars and names -----------------------------------------------------------------------------------
def check_callable(name: str, value: Any) -> None:
    """``value`` is None or callable."""
    if value is not None and not callable(value):
        raise InputError(
            f"{name} must be callable, got {type(value).__name__}: pass a function such as "
            "torch.nn.functional.cross_entropy."
        )


def check_number(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False
) -> float:
    """``value`` as a finite float (not a bool) within ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lower = "" if low is None else f"{'above' if open_low else 'at least'} {low:g}"
        upper = "" if high is None else f"at most {high:g}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise InputError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}.")
    return float(value)


def check_seed(seed: Any) -> int:
    """``seed`` as an int that ``torch.manual_seed`` takes (0 to 2**63 - 1; NumPy integers too)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**63:
        raise InputError(f"seed must be an int from 0 to 2**63 - 1, got {seed!r}.")
    return int(seed)


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int of at least {minimum}, got {value!r}.")
    return value


def check_prefixes(name: str, value: Any) -> tuple[str, ...]:
    """A sequence of module path prefixes (a lone string is refused: it would be read letter by letter)."""
    if isinstance(value, str):
        raise InputError(
            f"{name} must be a list of module path prefixes, got the string {value!r}: pass {name}=[{value!r}]."
        )
    prefixes = tuple(value) if isinstance(value, Iterable) else None
    if prefixes is None or not all(isinstance(v, str) for v in prefixes):
        raise InputError(f"{name} must be a list of module path prefixes (strings), got {value!r}.")
    return prefixes


def check_out_path(path: Any, what: str, *, error: type[Exception] = InputError) -> Path:
    """``path`` as a Path to a file that can be created: not a directory, its parent creatable."""
    if not isinstance(path, str | os.PathLike):
        raise error(f"{what} must be a path (str or pathlib.Path), got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory: pass a file path inside it, such as {path / 'model'}.")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise error(f"{what} {path} cannot be created: {blocker} is a file, not a directory.")
    return path


def check_tolerances(model: nn.Module, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``export_onnx``'s ``(rtol, atol)``: as given (finite, >= 0, not both 0), or the defaults for the model's
    dtype (float16 gets a few of its rounding steps); a bfloat16 model is refused."""
    half = model_dtype(model) == torch.float16
    if model_dtype(model) == torch.bfloat16:
        raise InputError(
            "the model is bfloat16: onnxruntime's CPU provider, which checks the file, lacks bfloat16 kernels for "
            "most operators, and numpy has no bfloat16. Export a float32 copy (`model.float()` with float32 "
            "inputs), or a float16 one."
        )
    # The float16 eps is 2**-10 (~1e-3): its default is ten of those steps.
    rtol = (1e-2 if half else 1e-4) if rtol is None else check_number("rtol", rtol, low=0.0)
    atol = (1e-3 if half else 1e-5) if atol is None else check_number("atol", atol, low=0.0)
    if rtol == 0 and atol == 0:
        raise InputError(
            "rtol and atol are both 0: onnxruntime and torch round differently, so no file would "
            "match; pass for example rtol=1e-4, atol=1e-5 (the float32 defaults)."
        )
    return rtol, atol


def check_options(name: str, given: Iterable[str], allowed: Callable[[str], bool], choices: Sequence[str]) -> None:
    """Every key of ``given`` is allowed; otherwise name the first unknown one and the choices."""
    for key in given:
        if not allowed(key):
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown {name} option {key!r}{hint}: choose from {', '.join(choices)}.")
