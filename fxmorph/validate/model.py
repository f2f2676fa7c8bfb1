"""Checks of the model and its example inputs, and the helpers every check shares.

:func:`check_model` admits a module with data of a supported dtype; :func:`frozen_mode` runs it in eval
mode without losing any module's training flag; :func:`run_failure_hint` names the usual reasons a model
does not run on its inputs (a hard-coded device, a dtype or device mismatch).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fxmorph.errors import InputError

__all__ = [
    "LOW_PRECISION",
    "SUPPORTED_DTYPES",
    "check_leaf_modules",
    "check_model",
    "check_tensor_inputs",
    "check_trainable",
    "first_line",
    "frozen_mode",
    "low_precision_dtype",
    "model_dtype",
    "run_failure_hint",
]

# Parameter dtypes fxmorph takes; integer buffers (``num_batches_tracked``) are fine whatever their dtype.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Dtypes too coarse for grow's SVDs and function checks or morph's training: grow works on a float32 copy, morph
# refuses.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Every module of ``model`` in train (or eval) mode for the duration, then each module's own flag back."""
    # Every module's own flag, not just the root's: a model in training may hold a frozen BatchNorm in eval mode on
    # purpose, and ``model.train()`` afterwards would flip it.
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def frozen_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put ``model`` in eval mode for the duration, then restore every module's training flag."""
    return _mode(model, train=False)


def training_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put every module of ``model`` in train mode for the duration, then restore each module's own flag."""
    return _mode(model, train=True)


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
