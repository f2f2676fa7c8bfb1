"""The ``torch.export`` capture: models symbolic tracing cannot enter (``**kwargs`` forwards, Python on tensor
shapes), as one graph in the vocabulary the engine knows.

``torch.export.export(model, args, strict=False)`` runs the forward in Python on fake tensors and records ATen
ops. Its ``module()`` is a GraphModule whose parameters and buffers sit at the model's own paths (``get_attr``
nodes), whose nodes keep their module path in ``nn_module_stack`` and their source line in ``stack_trace``.
:func:`~fxmorph.capture.aten.canonicalize` then writes its ATen overloads as the torch calls the op table
knows, so one analysis, one surgery and one checker serve both captures.

A GraphModule captured this way runs the ops of the mode it was captured in (eval: BatchNorm on its running
statistics, dropout off), whatever its ``training`` flag; given back as the user's own class (write-back),
the model trains as the original did.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn

from fxmorph.capture.aten import canonicalize
from fxmorph.capture.inline import inline_autocast_off
from fxmorph.errors import TraceError
from fxmorph.meta import CAPTURE_KEY, INTERFACE_KEY

__all__ = ["CAPTURES", "Capture", "example_inputs", "export_graph", "probe_inputs", "switched"]

logger = logging.getLogger(__name__)

Capture = Literal["auto", "fx", "export", "regions"]
"""How a model is captured: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``), ``"regions"`` (the
largest submodules that capture, :mod:`fxmorph.capture.regions`), or ``"auto"``: symbolic tracing where it works
(it is fast), else ``torch.export``, else regions."""
CAPTURES: tuple[str, ...] = ("auto", "fx", "export", "regions")


def export_graph(model: nn.Module, inputs: Sequence[Any], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """``model`` captured by ``torch.export`` (non-strict) on ``inputs`` (and keyword arguments ``kwargs``) and
    canonicalized; raises TraceError naming export's reason when it cannot capture the model."""
    try:
        with _quiet_torch(), _attributes_kept(model):
            program = torch.export.export(switched(model), tuple(inputs), kwargs, strict=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"cannot capture {type(model).__name__} with torch.export: {type(exc).__name__}: {reason}\n"
            "  fix: shapes that depend on tensor values (after non-maximum suppression, say) cannot be exported; "
            "capture the submodules that can be (capture='regions'), or shrink those submodules alone."
        ) from exc
    gm = program.module()
    inline_autocast_off(gm)  # before canonicalizing: the inlined ops are ATen ops too
    canonicalize(gm)
    for node in gm.graph.nodes:
        # export's fake values: fxmorph propagates shapes itself, and a fake tensor of a constant built in the
        # forward (YOLO's anchors) cannot be deep-copied with the graph
        node.meta.pop("val", None)
    gm.meta[CAPTURE_KEY] = "export"
    return gm


_SWITCHES = {"use_cache": False, "return_dict": False}
"""Keywords set when the forward takes them: a key-value cache (Hugging Face's ``DynamicCache``) is no channel of
the model and no tensor export can flatten, and a plain tuple is what the graph can return. The user's class,
given back, keeps both as its own forward has them."""


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put back every plain attribute of ``model``'s modules as it was: a non-strict export runs the real
    forward on fake tensors, and a forward that caches a tensor on its module (YOLO's ``Detect.anchors``) would
    leave a fake tensor in the user's model."""
    saved = {id(m): (m, dict(vars(m))) for m in model.modules()}
    try:
        with warnings.catch_warnings():
            # torch's advice to register such tensors as buffers is for the model's author: here they are put back
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            yield
    finally:
        for module, attributes in saved.values():
            state = vars(module)
            for name in [k for k in state if k not in attributes]:
                del state[name]
            state.update(attributes)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch's own loggers at ERROR and its prints to stderr captured while exporting: a capture that fails
    writes its partial graph there, which would bury fxmorph's one error (and the command line's one line)."""
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        # and what it prints itself (a failed trace's graph, written to stderr), kept for the debug log
        with contextlib.redirect_stderr(io.StringIO()) as printed:
            yield
    finally:
        if printed.getvalue().strip():
            logger.debug("torch.export printed:\n%s", printed.getvalue())
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def switched(model: nn.Module) -> nn.Module:
    """``model``, or where its forward takes any of :data:`_SWITCHES`, a shallow twin (the same submodules and
    tensors, so the same paths) whose forward has them set: constants of the graph, not inputs."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return model
    switches = {name: value for name, value in _SWITCHES.items() if name in params}
    if not switches:
        return model
    twin = copy.copy(model)
    twin.forward = functools.partial(type(model).forward, twin, **switches)  # an instance attribute: this twin only
    return twin


def example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Inputs of the shapes and dtypes ``gm`` was captured on (its recorded interface): zeros, which an
    exported graph, specialised to shapes only, computes the same ops on as any other values."""
    ins, _ = gm.meta[INTERFACE_KEY]
    # an input recorded as None (a non-tensor argument, as an optional mask passed as None) is passed again as None
    return tuple(None if spec is None else torch.zeros(spec[0], dtype=spec[1]) for spec in ins)


def probe_inputs(gm: fx.GraphModule, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the shapes and dtypes ``gm`` was captured on with values that tell models apart: normal floats,
    and integers 0 or 1 (valid token ids and masks of any model)."""
    ins, _ = gm.meta[INTERFACE_KEY]
    generator = torch.Generator().manual_seed(seed)
    return tuple(None if spec is None else _probe(*spec, generator) for spec in ins)


def _probe(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Normal floats, or integers 0 and 1, of ``shape`` and ``dtype``."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)
