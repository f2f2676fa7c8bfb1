"""Symbolic tracing with fxmorph's leaf policy: the one place that runs ``torch.fx``'s tracer.

:func:`fxmorph.capture.trace.trace` adds checks, shape propagation and FLOPs on top; write-back and the
train-mode comparison use the bare graph (:func:`trace_graph`).
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from fxmorph.capture.layers import through_forward, through_root, traced_through
from fxmorph.capture.parametrized import entered
from fxmorph.errors import TraceError
from fxmorph.validate import frozen_mode, training_mode

__all__ = ["symbolic_trace", "trace_graph"]


class _Tracer(fx.Tracer):
    """Leaf policy: torch.nn modules, their subclasses that keep the inherited forward, user leaves; but
    the torch.nn transformer layers are entered along their plain path (:mod:`fxmorph.capture.layers`), and
    layers with ``parametrizations.weight_norm`` through their parametrization
    (:mod:`fxmorph.capture.parametrized`)."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        # a buffer the forward reads itself (FrozenBatchNorm2d's statistics, as every pretrained torchvision
        # detector has) becomes a get_attr node at its path, not a constant fx computes from it once: the
        # analysis sees whose channels it holds, and the class, given back, computes from its own buffers
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether ``m`` stays one ``call_module`` node; the order of the tests is the precedence."""
        if self._user_leaf(m, module_qualified_name):
            return True
        # before fx's default: the transformer layers live in torch.nn, which fx would keep whole; so do the
        # weight_norm'd layers, whose stored g and v the graph must show
        if traced_through(m) or entered(m):
            return False
        if super().is_leaf_module(m, module_qualified_name):
            return True
        return _inherits_torch_forward(type(m))

    def _user_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Enter a transformer layer along its plain path; the choice depends on this call's arguments."""
        if traced_through(m) and not self._user_leaf(m, self.path_of_module(m)):
            plain = through_forward(m, args, kwargs)
            if plain is None:  # this call must stay whole: a leaf, whose channels the analysis pins
                return self.create_proxy("call_module", self.path_of_module(m), args, kwargs)
            forward = plain
        return super().call_module(m, forward, args, kwargs)


def _inherits_torch_forward(cls: type) -> bool:
    """True for a subclass of a torch.nn layer that does not override ``forward``."""
    # The first base that defines forward decides: the forward ``cls`` would run if it defines none.
    for base in cls.__mro__[1:]:
        if "forward" in vars(base):
            owner = base.__module__
            defined_here = any("forward" in vars(c) for c in cls.__mro__[: cls.__mro__.index(base)])
            # a container's forward only calls its children, which must be traced, and nn.Module's is the
            # "not implemented" stub: neither makes the subclass a torch.nn layer
            container = issubclass(base, nn.Sequential | nn.ModuleList | nn.ModuleDict) or base is nn.Module
            return owner.startswith("torch.nn") and not defined_here and not container
    return False


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback outside torch and fxmorph: the user's line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/fxmorph/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`"
    return "unknown location"


def symbolic_trace(
    model: nn.Module,
    leaf_modules: Iterable[type | str],
    concrete_args: dict[str, Any] | None,
    *,
    stack_traces: bool = False,
) -> fx.GraphModule:
    """``torch.fx`` symbolic tracing with fxmorph's leaf policy; a failure names the user's offending line.
    ``stack_traces`` records each node's source lines (``node.stack_trace``), which costs time per node."""
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
    tracer = _Tracer(leaf_types, leaf_names)
    tracer.record_stack_traces = stack_traces
    try:
        # a root of a type the user keeps as a leaf keeps its own forward, as such submodules do
        root = model if isinstance(model, leaf_types) else through_root(model)
        if root is model:
            # fx stores each tensor constant it meets as ``_tensor_constantN`` on the root it traces: a shallow twin
            # (its own attribute dict, the same submodules and tensors) takes them, and the user's model stays as
            # it was (and a second trace numbers its constants as the first did)
            root = copy.copy(model)
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}\n"
            f"  offending line: {_user_frame(exc)}\n"
            "  fix: name the submodule that holds this code as a leaf (`leaf_modules=[TheModuleClass]` or its "
            "qualified name) so it stays one call, or rewrite the branch without Python control flow on tensor "
            "values (for example with `torch.where`)."
        ) from exc
    # tracer.root is through_root's twin where it made one: it shares every submodule and tensor with model
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace_graph(
    model: nn.Module, leaf_modules: Iterable[type | str] = (), *, stack_traces: bool = False, train: bool = False
) -> fx.GraphModule:
    """The bare graph of ``model`` as :func:`~fxmorph.capture.trace.trace` captures it (eval mode, or train
    mode with ``train``; the same leaf policy), without the checks and shape propagation: for comparing a
    rebuilt model's graph with another's. Each module's training flag is restored. Raises TraceError."""
    with (training_mode if train else frozen_mode)(model):
        return symbolic_trace(model, leaf_modules, None, stack_traces=stack_traces)
