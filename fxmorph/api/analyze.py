"""Public entry points of the engine: analyse a model, resize it by a plan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.api.deliver import deliver
from fxmorph.capture.export import Capture
from fxmorph.capture.trace import trace
from fxmorph.errors import InputError
from fxmorph.meta import INTERFACE_KEY, REGIONS_KEY, metadata
from fxmorph.surgery.apply import apply_plan

__all__ = ["analyze", "resize"]


def analyze(
    model: nn.Module | fx.GraphModule,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type | str] = (),
    capture: Capture = "auto",
) -> ChannelGraph:
    """Find every group of coupled channels of ``model``; changes no tensor.

    ``model`` may be a GraphModule from :func:`fxmorph.trace` or a result of fxmorph (then ``example_inputs``
    may be omitted: inputs of the shapes and dtypes it was made with are used) or any module, which is traced
    first. ``result.gm`` is the traced graph the groups refer
    to, ``result.groups`` the groups, and ``result.explain()`` a readable table. ``capture``: how a module is
    captured (``"fx"``, ``"export"`` or ``"auto"``, see :func:`fxmorph.trace`).
    """
    if isinstance(model, fx.GraphModule) and example_inputs is None:
        if not _has_shapes(model):
            raise InputError(
                "this GraphModule carries no shape metadata (it was not made by fxmorph.trace, shrink or grow), so "
                "its channels cannot be analysed: pass example_inputs, or trace it with fxmorph.trace first."
            )
        gm = model
    else:
        if example_inputs is None:
            example_inputs = _recorded_inputs(model)
        if example_inputs is None:
            raise InputError(
                f"example_inputs is required to analyse a {type(model).__name__} that is not traced yet: pass for "
                "example `fxmorph.analyze(model, (torch.randn(1, 3, 224, 224),))`."
            )
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, capture=capture)
        cg = build_channel_graph(gm)
        cg.source, cg.leaf_modules = model, tuple(leaf_modules)
        return cg
    return build_channel_graph(gm)


def _recorded_inputs(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """Inputs shaped like those a result of fxmorph was made with (its recorded interface), or None."""
    recorded = metadata(model).get(INTERFACE_KEY)
    if not recorded or REGIONS_KEY in metadata(model):  # a bundle's interface is its regions' arguments
        return None
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for spec in recorded[0]:
        if spec is None or not isinstance(spec[1], torch.dtype):
            return None  # a non-tensor input: only the caller knows its value
        shape, dtype = spec
        # zeros for integer inputs are valid indices (token ids); floats are drawn, as real data is not constant
        value = torch.randn(shape, generator=generator) if dtype.is_floating_point else torch.zeros(shape)
        inputs.append(value.to(dtype=dtype, device=device))
    return tuple(inputs)


def _has_shapes(gm: fx.GraphModule) -> bool:
    """True when every placeholder of ``gm`` carries shape metadata (``meta["tensor_meta"]``)."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    return bool(nodes) and all("tensor_meta" in n.meta for n in nodes if n.op == "placeholder")


def resize(
    cg: ChannelGraph, plan: WidthPlan | Mapping[int, GroupPlan], *, seed: int = 0, keep_class: bool | None = None
) -> nn.Module:
    """Apply ``plan`` to the model ``cg`` was built from; returns a new, independent model.

    When ``cg`` came from ``fxmorph.analyze(model, inputs)``, the result is of ``model``'s class where it is
    proven equal to the resized graph (``keep_class`` as in :func:`fxmorph.shrink`: ``None`` falls back to the
    GraphModule with a warning, ``True`` raises, ``False`` never tries); a ``cg`` built from a GraphModule
    gives a GraphModule.

    ``plan`` is a :class:`WidthPlan` or a mapping from group id to :class:`GroupPlan`. Raises
    :class:`~fxmorph.InputError` for arguments of the wrong kind and :class:`~fxmorph.PlanError` for a
    plan that does not fit ``cg`` (``docs/bad_input.md`` lists each case)."""
    if not isinstance(cg, ChannelGraph):
        raise InputError(
            f"resize takes the ChannelGraph of fxmorph.analyze(model, example_inputs), got "
            f"{type(cg).__name__}: call `cg = fxmorph.analyze(model, (x,))` first"
        )
    if isinstance(plan, Mapping) and not isinstance(plan, WidthPlan):
        plan = WidthPlan(plan)
    if not isinstance(plan, WidthPlan):
        raise InputError(
            f"resize takes a WidthPlan (or a dict of group id -> GroupPlan), got {type(plan).__name__}: "
            "for example `WidthPlan({0: GroupPlan(keep=(0, 1, 2))})`"
        )
    out = apply_plan(cg.gm, cg, plan, seed=seed)
    if cg.source is None:
        return out
    return deliver(cg.source, out, keep_class=keep_class, leaf_modules=cg.leaf_modules, entry="resize")[0]
