"""What ``fxmorph-export`` checks before any long step: the input shape, the budget's syntax, the output
directory, the model spec (a torchvision name or ``package.module:factory``), the checkpoint (read with
``weights_only=True`` unless the user trusts the file) and a first forward pass. Every failure is a
:class:`UsageError` with one line that names the cause and the fix (exit code 2).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxmorph.errors import BudgetError, FxmorphError, InputError

__all__ = [
    "PROG",
    "RESULT_FILES",
    "UsageError",
    "check_budget",
    "check_out",
    "first_forward",
    "first_line",
    "load_checkpoint",
    "load_model",
    "parse_shape",
]

PROG = "fxmorph-export"
RESULT_FILES = (
    "original.onnx",
    "original.onnx.data",
    "shrunk.onnx",
    "shrunk.onnx.data",
    "flops_budget.onnx",
    "flops_budget.onnx.data",
    "report.json",
    "report.md",
    "widths.png",
    "latency.png",
    "flops.png",
    "latency_flops.png",
)


class UsageError(FxmorphError):
    """Bad command-line input (exit code 2)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))  # "1x3x224x224" too
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape '{text}' is not a list of positive integers such as 1,3,224,224")
    # An example input this large would exhaust memory before any useful error; refuse it now.
    if len(shape) > 8 or torch.Size(shape).numel() > 2**31:
        raise UsageError(f"--input-shape '{text}' is too large for an example input")
    return shape


def check_budget(text: str | None, latency: str | None = None) -> None:
    """Reject a budget that cannot be parsed or is out of range before the model is even built."""
    from fxmorph.api.budget import parse_budget, parse_latency

    try:
        # The model's FLOPs and latency are not known yet: any total lets the syntax and range of a relative budget
        # be checked.
        if text is not None:
            parse_budget(text, 10**18)
    except BudgetError as exc:
        raise UsageError(f"--budget-flops: {first_line(exc)}") from exc
    try:
        if latency is not None:
            parse_latency(latency, 1.0)
    except BudgetError as exc:
        raise UsageError(f"--budget-latency: {first_line(exc)}") from exc


def check_out(out: Path, force: bool) -> None:
    """``--out`` is (or can become) a writable directory that holds no earlier results unless ``force``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: pass a directory")
    # The nearest folder that exists: run creates the rest under it.
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be written: {existing} is not a writable directory")
    present = [name for name in RESULT_FILES if (out / name).exists()]
    if present and not force:
        raise UsageError(
            f"--out {out} already holds results ({', '.join(present[:3])}{', ...' if len(present) > 3 else ''}): "
            "pass --force to overwrite them, or choose another directory"
        )


def load_model(spec: str) -> nn.Module:
    """A torchvision model name (random weights) or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UsageError(f"'{spec}' is not of the form package.module:factory")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current directory import
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot import '{spec}': {first_line(exc)}") from exc
        if not callable(factory):
            raise UsageError(f"'{spec}' is a {type(factory).__name__}, not a callable that returns a model")
        try:
            model = factory()
        except Exception as exc:  # the user's code may raise anything
            raise UsageError(f"calling '{spec}()' failed: {type(exc).__name__}: {first_line(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise UsageError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See torchvision.models.list_models()."
        raise UsageError(f"unknown model '{spec}'.{hint}")
    try:
        return torchvision.models.get_model(spec, weights=None)
    except Exception as exc:  # torchvision builders raise various types
        raise UsageError(f"cannot build torchvision model '{spec}': {type(exc).__name__}: {first_line(exc)}") from exc


def _tensor_dict(value: Any) -> dict[str, torch.Tensor] | None:
    """``value`` as a state dict (a module's, or a non-empty mapping of tensors), else None."""
    if isinstance(value, nn.Module):
        return value.state_dict()
    if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return dict(value)
    return None


def _state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint: itself, or under a usual key (``state_dict``, ``model``, ...)."""
    state = _tensor_dict(obj)
    if state is None and isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "weights", "net"):
            state = _tensor_dict(obj.get(key))
            if state is not None:
                break
    if state is None:
        raise UsageError(
            f"--checkpoint {path} holds a {type(obj).__name__} with no state dict in it: save model.state_dict()"
        )
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str, trust: bool, name: str | None = None) -> int:
    """Load the state dict at ``path`` into ``model``; returns the number of tensors loaded.

    The file is read with ``weights_only=True`` unless ``trust`` (``--trust-checkpoint``): a file that
    holds pickled Python objects (a whole model) is refused, since unpickling it can run any code.
    """
    import pickle

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--checkpoint {path}: no such file")
    try:
        # Full unpickling happens only when the user vouched for the file with --trust-checkpoint.
        obj = torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # What weights_only loading says when the file holds a class or function.
        if not trust and "Unsupported global" in str(exc):
            raise UsageError(
                f"--checkpoint {path} holds pickled Python objects (such as a whole model), which fxmorph does "
                "not unpickle: save model.state_dict() instead, or pass --trust-checkpoint only if you trust "
                "the file (unpickling can run arbitrary code)"
            ) from exc
        raise UsageError(f"--checkpoint {path} cannot be read: it is not a torch.save file or it is damaged") from exc
    except Exception as exc:  # torch raises many types for unreadable files
        raise UsageError(
            f"--checkpoint {path} cannot be read ({type(exc).__name__}): it is not a torch.save file or it is damaged"
        ) from exc
    if isinstance(obj, Mapping) and obj.get("format") == "fxmorph.shrunk-model":
        raise UsageError(
            f"--checkpoint {path} is a shrunk model written by fxmorph.save, not weights of {name or 'MODEL'}: "
            "pass the original model's state dict (rebuild the shrunk one in Python with fxmorph.load)"
        )
    state = _state_dict_of(obj, path)
    # Compared here for a one-line message that names the tensors; strict loading would give a long one.
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})")
        if unexpected:
            more = ", ..." if len(unexpected) > 2 else ""
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:2])}{more})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape ({k}: {list(state[k].shape)} in the file, {list(own[k].shape)} "
                "in the model)"
            )
        raise UsageError(
            f"--checkpoint {path} does not fit {name or type(model).__name__}: tensors {'; '.join(parts)}; pass a "
            "state dict saved from this architecture"
        )
    model.load_state_dict(state, strict=True)
    return len(state)


def first_forward(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> int:
    """Run the model once on the example input and count its FLOPs; bad inputs become exit code 2."""
    from fxmorph import count_flops
    from fxmorph.validate import check_model, model_dtype, run_failure_hint

    try:
        check_model(model)
    except InputError as exc:
        raise UsageError(f"{args.model}: {first_line(exc)}") from exc
    dtype = model_dtype(model)
    if dtype is not None and dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        raise UsageError(
            f"{args.model} is a {name} model, but {PROG} works in float32 (its example input, the ONNX check and "
            f"the onnxruntime CPU timing): return a float32 model from the factory (`model.float()`); a {name} "
            "--checkpoint still loads into it"
        )
    try:
        return count_flops(model, (x,))
    except InputError as exc:
        raise UsageError(f"{args.model}: {first_line(exc)}") from exc
    except Exception as exc:  # the model's own forward may raise anything
        hint = run_failure_hint(model, (x,), exc)
        raise UsageError(
            f"the example inputs do not run through {args.model} (--input-shape {args.input_shape}): "
            # Shorter when a hint follows, so the line stays readable.
            f"{type(exc).__name__}: {first_line(exc, 100 if hint else 200)}{f'; fix: {hint}' if hint else ''}"
        ) from exc
