"""Trace a model to a torch.fx GraphModule and annotate every node with shapes and dtypes.

This layer knows nothing about channels. It owns the leaf-module policy, shape propagation (on real
tensors for ordinary models, on fake tensors for huge ones so no compute or memory is spent), and the
list of submodules the trace never reached (for example GoogLeNet's aux heads, which run only in train
mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxmorph.capture.blocks import container_paths, repeated_blocks
from fxmorph.capture.config_sizes import config_of, config_sizes, unread_tensors
from fxmorph.capture.export import CAPTURES, Capture, export_graph
from fxmorph.capture.flops import flop_counter
from fxmorph.capture.model_checks import check_hooks, check_reshapable, check_unwrapped
from fxmorph.capture.regions import capture_regions
from fxmorph.capture.symbolic import symbolic_trace
from fxmorph.capture.train_mode import train_only_readers
from fxmorph.errors import InputError, TraceError
from fxmorph.meta import (
    BLOCKS_KEY,
    CAPTURE_KEY,
    CONFIG_SIZES_KEY,
    CONTAINERS_KEY,
    FLOPS_KEY,
    INTERFACE_KEY,
    REGIONS_KEY,
    TRAIN_READERS_KEY,
    UNREACHED_KEY,
)
from fxmorph.validate import check_leaf_modules, check_model, check_tensor_inputs, frozen_mode, run_failure_hint

__all__ = [
    "as_inputs",
    "check_input_count",
    "interface",
    "mutable_args",
    "propagate_shapes",
    "trace",
    "unreached_modules",
]

logger = logging.getLogger(__name__)

FAKE_THRESHOLD_BYTES = 1 << 30  # models with more weight bytes than this propagate on fake tensors


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise ``example_inputs`` to a tuple, with a clear error for obviously wrong values."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        if not example_inputs:
            raise InputError("example_inputs is empty: pass a tuple with one example tensor per input.")
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}: "
        "pass for example `example_inputs=(torch.randn(1, 3, 224, 224),)`."
    )


def _check_model(model: Any) -> None:
    """A module with data (not on the meta device) of a supported dtype; see :func:`fxmorph.validate.check_model`."""
    check_model(model)


def mutable_args(value: Any) -> Any:
    """fx's immutable argument containers as fresh lists and dicts, as generated code passes them.

    Some library functions mutate list arguments (torchvision's 3-D Swin does); generated code
    passes them fresh literals, and so must any Interpreter.
    """
    if isinstance(value, list):
        return [mutable_args(v) for v in value]
    if type(value) is tuple:  # not namedtuples nor torch.return_types (``max(dim).values``): they keep their type
        return tuple(mutable_args(v) for v in value)
    if isinstance(value, dict):
        return {k: mutable_args(v) for k, v in value.items()}
    return value


class _ShapeProp(ShapeProp):
    """ShapeProp that hands functions mutable argument containers."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        """Call ``target`` on fresh copies of the argument containers (see :func:`mutable_args`)."""
        return super().call_function(target, mutable_args(args), mutable_args(kwargs))


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any], *, fake: bool = False) -> None:
    """Store ``meta['tensor_meta']`` (shape, dtype) on every tensor-valued node of ``gm``.

    The FLOPs of the run (``torch.utils.flop_counter``) are stored in ``gm.meta['fxmorph.flops']``
    and the input and output shapes and dtypes in ``gm.meta['fxmorph.interface']``.
    """
    try:
        # NOTE: ShapeProp prints a traceback to stderr before re-raising; fxmorph reports the cause itself.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            if fake:
                from torch._subclasses.fake_tensor import FakeTensorMode

                # ShapeProp copies the module's weights to this mode; allow_non_fake_inputs lets a real tensor
                # that still reaches an op (a constant the forward holds) run fake instead of raising
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
                with flop_counter() as counter:
                    _ShapeProp(gm, fake_mode=mode).propagate(*fake_inputs)
            else:
                with flop_counter() as counter:
                    _ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        fix = (
            run_failure_hint(gm, inputs, exc)
            or "pass example_inputs with the shapes, dtypes and device the model expects"
        )
        raise TraceError(
            f"the example inputs do not run through the traced model{_failing_node(exc)}: {_root_cause(exc)}\n"
            f"  fix: {fix} (got {_describe(inputs)})."
        ) from exc
    gm.meta[FLOPS_KEY] = int(counter.get_total_flops())
    gm.meta[INTERFACE_KEY] = interface(gm)


def _failing_node(exc: BaseException) -> str:
    """`` at node 'name'`` read from ShapeProp's wrapping message, or nothing when it has another form."""
    match = re.match(r"ShapeProp error for: node=%(\S+)", str(exc))
    return f" at node '{match.group(1)}'" if match else ""


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (ShapeProp wraps the real error in its own)."""
    while exc.__cause__ is not None and str(exc).startswith("ShapeProp error"):
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def interface(gm: fx.GraphModule) -> tuple[tuple[Any, ...], Any]:
    """Shapes and dtypes of the placeholders and of the output structure, from node metadata."""
    ins = tuple(_sig(n.meta.get("tensor_meta")) for n in gm.graph.nodes if n.op == "placeholder")
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = fx.node.map_arg(out_node.args[0], lambda n: _sig(n.meta.get("tensor_meta")))
    return ins, outs


def _sig(meta: Any) -> Any:
    """``(shape, dtype)`` of a ``tensor_meta``, nested like the value; ``None`` for a non-tensor."""
    if meta is None:
        return None
    # TensorMetadata is itself a NamedTuple: the shape attribute tells it from a tuple of them
    if isinstance(meta, list | tuple) and not hasattr(meta, "shape"):
        return tuple(_sig(m) for m in meta)
    return (tuple(meta.shape), meta.dtype)


def _describe(inputs: Sequence[Any]) -> str:
    """The example inputs as an error message shows them: shape, dtype and device of each tensor."""
    parts = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"Tensor{list(x.shape)} {x.dtype} on {x.device}")
        else:
            parts.append(type(x).__name__)
    return ", ".join(parts)


def unreached_modules(model: nn.Module, gm: fx.GraphModule) -> tuple[str, ...]:
    """Top-most submodules of ``model`` that hold parameters but never appear in the traced graph."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            used.add(str(node.target))
    out: list[str] = []
    # named_modules lists a parent before its children, so a reported module hides its whole subtree
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in out):
            continue
        if not any(True for _ in module.parameters()):
            continue
        # reached: called itself, a submodule or attribute of it used, or it sits inside a called leaf
        reached = any(u == name or u.startswith(name + ".") or name.startswith(u + ".") for u in used)
        if not reached:
            out.append(name)
    return tuple(out)


def check_input_count(gm: fx.GraphModule, inputs: Sequence[Any], name: str) -> None:
    """No more example inputs than the traced forward takes (extra ones would be silently ignored)."""
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    # fx names the placeholder of ``*args`` "*args": such a forward takes any number of inputs
    if len(inputs) <= len(targets) or any(t.startswith("*") for t in targets):
        return
    params = ", ".join(targets)
    example = f"({params},)" if len(targets) == 1 else f"({params})"
    raise InputError(
        f"got {len(inputs)} example inputs, but {name}.forward takes {len(targets)} ({params or 'none'}): pass "
        f"one example tensor per forward parameter, for example `example_inputs={example}`."
    )


def _weight_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters of ``model`` (buffers not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _capture(
    model: nn.Module,
    inputs: tuple[Any, ...],
    leaf_modules: Iterable[type | str],
    concrete_args: dict[str, Any] | None,
    capture: Capture,
) -> fx.GraphModule:
    """The graph of ``model`` by ``capture`` (see :func:`trace`), its capture recorded in its metadata."""
    if capture not in CAPTURES:
        raise InputError(f"unknown capture {capture!r}: choose one of {', '.join(CAPTURES)}.")
    if capture == "export":
        return export_graph(model, inputs)
    if capture == "regions":
        return capture_regions(model, inputs, leaf_modules)
    try:
        gm = symbolic_trace(model, leaf_modules, concrete_args)
    except TraceError as fx_error:
        if capture == "fx" or concrete_args is not None:
            raise
        logger.info("symbolic tracing failed, capturing with torch.export: %s", str(fx_error).splitlines()[0])
        return _exported_or_regions(model, inputs, leaf_modules, fx_error)
    gm.meta[CAPTURE_KEY] = "fx"
    return gm


def _exported_or_regions(
    model: nn.Module, inputs: tuple[Any, ...], leaf_modules: Iterable[type | str], fx_error: TraceError
) -> fx.GraphModule:
    """``capture="auto"`` once symbolic tracing failed: ``torch.export``, else the regions that capture; one
    TraceError giving every capture's reason when none takes the model."""
    try:
        return export_graph(model, inputs)
    except TraceError as export_error:
        logger.info("torch.export failed, capturing in regions: %s", str(export_error).splitlines()[0])
        try:
            return capture_regions(model, inputs, leaf_modules, require_inner=True)
        except TraceError as regions_error:
            raise TraceError(f"{fx_error}\n{export_error}\n{regions_error}") from regions_error


def _propagate(gm: fx.GraphModule, inputs: tuple[Any, ...], fake: bool) -> None:
    """Shapes and FLOPs of ``gm`` on ``inputs``, or for a bundle of regions on the arguments its regions were
    called with (whose FLOPs its record then holds)."""
    record = gm.meta.get(REGIONS_KEY)
    if record is None:
        propagate_shapes(gm, inputs, fake=fake)
        return
    propagate_shapes(gm, record.inputs, fake=fake)
    gm.meta[REGIONS_KEY] = dataclasses.replace(record, region_flops=gm.meta[FLOPS_KEY])


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    fake: bool | None = None,
    allow_tied_weights: bool = False,
    capture: Capture = "auto",
) -> fx.GraphModule:
    """Trace ``model`` to a GraphModule whose tensor nodes carry ``meta['tensor_meta']``.

    The model is traced and propagated in eval mode (so data-dependent train-only branches, such as
    GoogLeNet's aux heads, are left out and recorded in ``gm.meta['fxmorph.unreached']``); every
    module's training flag is restored afterwards and no parameter or buffer is written. The returned
    GraphModule shares its parameters with ``model``: fxmorph's own passes never write to them, and
    :func:`fxmorph.shrink` and friends work on a copy.

    Args:
        model: the module to trace.
        example_inputs: a tensor or a tuple of tensors, one per positional input.
        leaf_modules: extra module classes or qualified names to keep as single graph nodes.
        concrete_args: forwarded to ``torch.fx.Tracer.trace`` for arguments that drive control flow. The
            result is for inspection: fxmorph's entry points do not accept it (they trace again).
        fake: propagate shapes on fake tensors (no compute). ``None`` chooses fake tensors for models
            with more than 1 GiB of weights.
        capture: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, non-strict: forwards that take
            ``**kwargs`` or compute on shapes in Python; ``leaf_modules`` and ``concrete_args`` do not apply),
            ``"regions"`` (the largest submodules that capture, bundled in one graph whose inputs and outputs are
            their arguments and results: :mod:`fxmorph.capture.regions`), or ``"auto"`` (the default): symbolic
            tracing, ``torch.export`` where it fails, regions where both fail. The graph's
            ``meta['fxmorph.capture']`` says which was used.
        allow_tied_weights: no longer needed (kept so that calls passing it still work): tied weights, one
            Parameter held by two modules, are traced, analysed and reshaped as one tensor everywhere.

    Raises:
        InputError: ``model`` is not a module, a DataParallel / DDP / ``torch.compile`` wrapper, has
            parametrized weights other than ``parametrizations.weight_norm`` (which is kept, see
            :mod:`fxmorph.capture.parametrized`) or hook-based weight_norm / spectral_norm, hooks torch.fx would
            drop, or more example inputs than its forward takes; the inputs are malformed, or the dtype is
            unsupported.
        TraceError: the model cannot be traced, or the example inputs do not run through it.
    """
    # Checks that need only the model and the inputs run first, before any tracing time is spent.
    _check_model(model)
    check_unwrapped(model)
    check_reshapable(model)
    inputs = as_inputs(example_inputs)
    check_tensor_inputs(inputs)
    leaf_modules = check_leaf_modules(model, leaf_modules)
    with frozen_mode(model):
        gm = _capture(model, inputs, leaf_modules, concrete_args, capture)
        if gm.meta[CAPTURE_KEY] == "fx":  # an exported graph holds the hooks' code (they ran while it was captured)
            # after the trace: which modules stayed leaves (and so keep their hooks) is known only now
            check_hooks(model, {str(n.target) for n in gm.graph.nodes if n.op == "call_module"})
        if gm.meta[CAPTURE_KEY] != "regions":  # a bundle's inputs are its regions' arguments
            check_input_count(gm, inputs, type(model).__name__)
        use_fake = _weight_bytes(model) > FAKE_THRESHOLD_BYTES if fake is None else fake
        _propagate(gm, inputs, use_fake)
    # modules outside the regions are the record's opaque ones, which run: none is unreached in train mode's sense
    gm.meta[UNREACHED_KEY] = unreached_modules(model, gm) if gm.meta[CAPTURE_KEY] != "regions" else ()
    gm.meta[BLOCKS_KEY] = repeated_blocks(model)
    gm.meta[CONTAINERS_KEY] = container_paths(model)
    # a bundle of regions leaves the opaque modules' tensors out: those are unread by design, and keep their widths
    unread = unread_tensors(model, gm) if config_of(model) is not None and gm.meta[CAPTURE_KEY] != "regions" else ()
    sizes = config_sizes(model, unread)
    if sizes is not None:
        gm.meta[CONFIG_SIZES_KEY] = sizes
    if gm.meta[UNREACHED_KEY]:
        logger.info("modules never reached by the trace: %s", ", ".join(gm.meta[UNREACHED_KEY]))
        # what those modules read in train mode keeps its channels (the analysis pins it), so that the result,
        # given back as the user's class, still runs in train mode
        readers = train_only_readers(model, gm, gm.meta[UNREACHED_KEY], leaf_modules)
        gm.meta[TRAIN_READERS_KEY] = readers or {}
    gm.training = model.training  # root flag only: the submodules are shared with ``model``
    return gm
