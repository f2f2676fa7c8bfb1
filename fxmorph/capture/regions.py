"""Region capture: a model no capture takes whole (a detector: Python loops over images, non-maximum
suppression) as the largest submodules that do capture, in one graph.

The model runs once on the example (eval mode, no grad) with a pre-hook on every module recording the arguments
of its calls, and FLOPs counted over the whole forward. Then, from the root down, each module with parameters
that ran exactly once is captured on the arguments it was called with (symbolic tracing, else ``torch.export``);
where that fails, its children are tried. The captured submodules are the regions; the code around them
(``roi_heads``' own forward, a transform, an anchor generator) stays opaque, and so do the parameters it holds.

The regions' graphs are copied into one GraphModule (the *bundle*): each region's inputs become placeholders
and all its outputs outputs of the bundle, so every channel that crosses into opaque code is a model input or
output to the analysis, which pins it. Targets and module paths are the user's model's own (``backbone.body.
conv1``), so one analysis, one surgery and one write-back serve the bundle as they serve a whole model:
write-back captures the written-back copy's regions again and compares the two bundles node by node.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fxmorph.capture.export import export_graph
from fxmorph.capture.flops import flop_counter
from fxmorph.capture.model_checks import check_hooks
from fxmorph.capture.symbolic import symbolic_trace
from fxmorph.errors import InputError, TraceError
from fxmorph.meta import CAPTURE_KEY, REGIONS_KEY
from fxmorph.validate import first_line, frozen_mode

__all__ = ["Opaque", "Region", "RegionCapture", "TensorSpec", "capture_regions", "recapture_regions"]

logger = logging.getLogger(__name__)

Call: TypeAlias = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments of one call of a module."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor a region was called with (what capturing it again needs)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Region:
    """A submodule captured whole, and the arguments it was called with (tensors as :class:`TensorSpec`)."""

    path: str
    """The submodule's path in the model."""
    capture: Literal["fx", "export"]
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Opaque:
    """A submodule with parameters whose own code no capture took, and why (its children may be regions)."""

    path: str
    reason: str


@dataclass(frozen=True)
class RegionCapture:
    """What region capture found: the regions, the code left opaque, and the FLOPs of the whole forward."""

    regions: tuple[Region, ...]
    opaque: tuple[Opaque, ...]
    total_flops: int
    """FLOPs of the whole forward on the example; those outside the regions are a fixed cost."""
    region_flops: int = 0
    """FLOPs of the regions on the example (the bundle's, set once its shapes are propagated)."""
    inputs: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    """The bundle's example inputs, as recorded (dropped from the metadata once the entry point has them)."""

    @property
    def opaque_flops(self) -> int:
        """The FLOPs no region holds: a fixed cost of every result."""
        return max(self.total_flops - self.region_flops, 0)

    def describe(self) -> list[str]:
        """One line per region and per opaque module, for reports and ``explain()``."""
        lines = [f"region {r.path or '<model>'} ({r.capture})" for r in self.regions]
        lines += [f"opaque {o.path or '<model>'}: {o.reason}" for o in self.opaque]
        return lines


@dataclass
class _Calls:
    """The arguments of every call of every module in one forward (tensors cloned: later in-place ops
    must not change what a region is captured on)."""

    by_module: dict[int, list[Call]] = field(default_factory=dict)

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward pre-hook: record this call's arguments."""
        self.by_module.setdefault(id(module), []).append(pytree.tree_map(_detached, (args, kwargs)))


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _record(model: nn.Module, inputs: Sequence[Any]) -> tuple[_Calls, int]:
    """Run ``model`` once on ``inputs`` recording every module's calls; the FLOPs of the whole forward."""
    calls = _Calls()
    handles = [m.register_forward_pre_hook(calls.hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad(), flop_counter() as counter:
            model(*inputs)
    except Exception as exc:
        raise TraceError(
            f"cannot capture {type(model).__name__} in regions: the example inputs do not run through it: "
            f"{first_line(exc)}\n  fix: pass example_inputs the model's forward accepts."
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return calls, int(counter.get_total_flops())


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _relative(leaf_modules: Iterable[type | str], path: str) -> list[type | str]:
    """The leaf modules as the submodule at ``path`` names them (qualified names under it, re-rooted)."""
    prefix = f"{path}." if path else ""
    return [
        m if isinstance(m, type) else m[len(prefix) :]
        for m in leaf_modules
        if isinstance(m, type) or m.startswith(prefix)
    ]


def _bound(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by parameter name (``None`` where the signature cannot be read)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return dict(bound.arguments)


def _traced(module: nn.Module, path: str, call: Call, leaves: list[Any]) -> fx.GraphModule:
    """``module`` by symbolic tracing, where every placeholder receives a tensor or a constant (a list would be a
    value the bundle cannot feed) and no module the trace entered has hooks; else TraceError."""
    gm = symbolic_trace(module, _relative(leaves, path), None)
    try:  # hooks on a module the trace entered would be lost from the graph (export records what they do)
        check_hooks(module, {str(n.target) for n in gm.graph.nodes if n.op == "call_module"})
    except InputError as exc:
        raise TraceError(str(exc)) from exc
    arguments = _bound(module, *call)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = arguments.get(str(node.target), None) if arguments is not None else None
        if arguments is None or isinstance(value, list | tuple | dict):
            raise TraceError(f"argument '{node.target}' of {type(module).__name__} is not a tensor")
    return gm


def _try_capture(
    module: nn.Module, path: str, call: Call, leaf_modules: list[Any]
) -> tuple[fx.GraphModule, Literal["fx", "export"]] | str:
    """The region's graph and how it was captured, or the reasons no capture took it."""
    try:
        return _traced(module, path, call, leaf_modules), "fx"
    except TraceError as fx_error:
        try:
            return export_graph(module, call[0], call[1]), "export"
        except TraceError as export_error:
            return f"fx: {_reason(fx_error)}; export: {_reason(export_error)}"


def _reason(error: Exception, limit: int = 160) -> str:
    """The first sentence of a capture error's first line, without the capture's own preamble, and the user's
    line where the error names one."""
    lines = str(error).splitlines()
    text = lines[0].split(": ", 1)[1] if lines[0].startswith("cannot ") and ": " in lines[0] else lines[0]
    sentence = text.split(". ", 1)[0]
    sentence = sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."
    where = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("offending line:")), None)
    return f"{sentence} at {where}" if where and where != "unknown location" else sentence


@dataclass(frozen=True)
class _Found:
    """A region, its graph, and the values of the call it was captured on."""

    region: Region
    gm: fx.GraphModule
    call: Call
    kind: str = ""
    """The region module's class, as ``nn_module_stack`` names one."""


def _spec(value: Any) -> Any:
    return TensorSpec(tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value


def _region(path: str, capture: Literal["fx", "export"], call: Call) -> Region:
    args, kwargs = pytree.tree_map(_spec, call)
    return Region(path, capture, tuple(args), tuple(kwargs.items()))


def _walk(model: nn.Module, calls: _Calls, leaf_modules: list[Any]) -> tuple[list[_Found], list[Opaque]]:
    """The largest submodules that capture, top down, and the modules whose own code stays opaque."""
    found: list[_Found] = []
    opaque: list[Opaque] = []

    def visit(path: str, module: nn.Module) -> None:
        if not _has_parameters(module):
            return  # no channels to change: opaque or not, nothing to report
        recorded = calls.by_module.get(id(module), [])
        if not recorded:
            opaque.append(Opaque(path, "never called on the example"))
            return
        if len(recorded) > 1:
            # its children run as often: a region is one call, whose channels the bundle can hold once
            opaque.append(Opaque(path, f"called {len(recorded)} times on the example (a region is one call)"))
            return
        got = _try_capture(module, path, recorded[0], leaf_modules)
        if not isinstance(got, str):
            found.append(_Found(_region(path, got[1], recorded[0]), got[0], recorded[0], _kind(module)))
            return
        opaque.append(Opaque(path, got))
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return found, opaque


def _under(name: str, path: str) -> bool:
    return not path or name == path or name.startswith(f"{path}.")


def _unshared(model: nn.Module, found: list[_Found], opaque: list[Opaque]) -> tuple[list[_Found], list[Opaque]]:
    """The regions whose tensors no code outside them holds: a tensor held by opaque code or by another region
    would keep its old shape there (the region is left opaque, with the tensor named)."""
    owners: dict[int, set[str | None]] = {}
    names: dict[int, str] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        owner = next((f.region.path for f in found if _under(name, f.region.path)), None)
        owners.setdefault(id(tensor), set()).add(owner)
        names.setdefault(id(tensor), name)
    shared: dict[str, str] = {}  # region path -> the first tensor (in the model's order) it shares
    for key, held in owners.items():
        for path in held - {None} if len(held) > 1 else ():
            shared.setdefault(path, names[key])
    kept = [f for f in found if f.region.path not in shared]
    dropped = [Opaque(p, f"holds tensor '{t}', which code outside it holds too") for p, t in shared.items()]
    return kept, opaque + dropped


def _values(item: _Found) -> list[Any]:
    """The value each placeholder of the region's graph receives, in placeholder order."""
    placeholders = [n for n in item.gm.graph.nodes if n.op == "placeholder"]
    if item.region.capture == "export":
        return pytree.tree_leaves(item.call)  # export's own flattening: one placeholder per leaf, None included
    arguments = _bound(item.gm, *item.call) or {}
    return [arguments.get(str(n.target), n.args[0] if n.args else None) for n in placeholders]


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _kind(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _in_model(stack: dict[str, Any], item: _Found) -> dict[str, Any]:
    """``nn_module_stack`` with module paths relative to the model instead of the region, the region itself
    outermost: write-back looks for the attribute behind a constant on every module running at the node."""
    path = item.region.path
    if not path:
        return stack
    inner = {key: (f"{path}.{p}" if p else path, kind) for key, (p, kind) in stack.items()}
    return {f"region:{path}": (path, item.kind), **inner}


def _bundle(found: Sequence[_Found]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """One GraphModule holding every region's graph at the model's own paths, and its inputs."""
    graph = fx.Graph()
    attrs: dict[str, Any] = {}
    inputs: list[torch.Tensor] = []
    outputs: list[fx.Node] = []
    for item in found:
        path = item.region.path
        placeholders = [n for n in item.gm.graph.nodes if n.op == "placeholder"]
        val_map: dict[fx.Node, Any] = {}
        for node, value in zip(placeholders, _values(item), strict=True):
            if isinstance(value, torch.Tensor):
                val_map[node] = graph.placeholder(f"{path.replace('.', '_')}_{node.name}" if path else node.name)
                inputs.append(value)
            else:
                val_map[node] = value  # a constant of the call (None, an int): the region was captured with it
        out = graph.graph_copy(item.gm.graph, val_map)
        for old, new in val_map.items():
            if not isinstance(new, fx.Node) or old.op == "placeholder":
                continue
            if new.op in ("get_attr", "call_module"):
                new.target = f"{path}.{old.target}" if path else str(old.target)
                attrs[new.target] = _attribute(item.gm, str(old.target))
            new.meta["nn_module_stack"] = _in_model(new.meta.get("nn_module_stack") or {}, item)
        outputs += [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, fx.Node)]
    graph.output(tuple(outputs))
    return fx.GraphModule(attrs, graph, "Regions"), inputs


def _no_regions(model: nn.Module, opaque: list[Opaque]) -> TraceError:
    reasons = "; ".join(f"{o.path or '<model>'}: {o.reason}" for o in opaque[:4]) or "it holds no parameters"
    return TraceError(
        f"cannot capture {type(model).__name__} in regions: no submodule with parameters captures ({reasons})\n"
        "  fix: keep the failing code in a leaf module (`leaf_modules=[...]`), or shrink a submodule that traces."
    )


def _layers(module: nn.Module) -> int:
    """How many modules of ``module``'s tree hold parameters of their own."""
    return sum(1 for m in module.modules() if m._parameters)


def capture_regions(
    model: nn.Module, inputs: Sequence[Any], leaf_modules: Iterable[type | str], *, require_inner: bool = False
) -> fx.GraphModule:
    """The regions of ``model`` on ``inputs`` as one GraphModule (see the module doc); its
    ``meta[REGIONS_KEY]`` is a :class:`RegionCapture` holding the bundle's example inputs. Raises TraceError
    when no submodule with parameters captures, or with ``require_inner`` (``capture="auto"``'s last resort)
    when no region holds two layers: every channel of a lone layer crosses the region's boundary and is pinned,
    and the capture errors, which name the user's line, help more than a model with nothing free."""
    calls, total = _record(model, inputs)
    found, opaque = _walk(model, calls, list(leaf_modules))
    found, opaque = _unshared(model, found, opaque)
    if require_inner and not any(_layers(model.get_submodule(f.region.path)) > 1 for f in found):
        opaque = [
            *opaque,
            *(Opaque(f.region.path, "captures, but holds one layer: every channel pinned") for f in found),
        ]
        found = []
    if not found:
        raise _no_regions(model, opaque)
    gm, flat = _bundle(found)
    gm.meta[CAPTURE_KEY] = "regions"
    gm.meta[REGIONS_KEY] = RegionCapture(tuple(f.region for f in found), tuple(opaque), total, inputs=tuple(flat))
    logger.info("regions of %s: %s", type(model).__name__, "; ".join(gm.meta[REGIONS_KEY].describe()))
    return gm


def _probe(spec: Any, generator: torch.Generator) -> Any:
    """A tensor of ``spec``'s shape and dtype (normal floats, integers 0 and 1); other values as they are."""
    if not isinstance(spec, TensorSpec):
        return spec
    if spec.dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(spec.dtype)
    return torch.randint(0, 2, spec.shape, generator=generator).to(spec.dtype)


def _probe_call(region: Region, generator: torch.Generator) -> Call:
    def probe(spec: Any) -> Any:
        return _probe(spec, generator)

    return pytree.tree_map(probe, region.args), {k: pytree.tree_map(probe, v) for k, v in region.kwargs}


def _recaptured(model: nn.Module, region: Region, leaf_modules: list[Any], generator: torch.Generator) -> _Found:
    module = model.get_submodule(region.path) if region.path else model
    call = _probe_call(region, generator)
    gm = _traced(module, region.path, call, leaf_modules) if region.capture == "fx" else export_graph(module, *call)
    return _Found(region, gm, call, _kind(module))


def recapture_regions(model: nn.Module, like: fx.GraphModule, leaf_modules: Iterable[type | str]) -> fx.GraphModule:
    """``model``'s regions captured as ``like``'s were (the same paths and captures, on arguments of the recorded
    shapes), bundled alike: for comparing a written-back model with the result. Raises TraceError."""
    record: RegionCapture = like.meta[REGIONS_KEY]
    generator = torch.Generator().manual_seed(0)
    with frozen_mode(model):
        found = [_recaptured(model, r, list(leaf_modules), generator) for r in record.regions]
    gm, _ = _bundle(found)
    gm.meta[CAPTURE_KEY] = "regions"
    gm.meta[REGIONS_KEY] = record
    return gm
