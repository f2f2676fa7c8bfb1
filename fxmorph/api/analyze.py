"""Public entry points of the engine: analyse a model, resize it by a plan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import fx, nn

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.capture.trace import trace
from fxmorph.errors import InputError
from fxmorph.surgery.apply import apply_plan

__all__ = ["analyze", "resize"]


def analyze(
    model: nn.Module | fx.GraphModule,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type | str] = (),
) -> ChannelGraph:
    """Find every group of coupled channels of ``model``; changes no tensor.

    ``model`` may be a GraphModule from :func:`fxmorph.trace` (then ``example_inputs`` may be
    omitted) or any module, which is traced first. ``result.gm`` is the traced graph the groups refer
    to, ``result.groups`` the groups, and ``result.explain()`` a readable table.
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
            raise InputError(
                f"example_inputs is required to analyse a {type(model).__name__} that is not traced yet: pass for "
                "example `fxmorph.analyze(model, (torch.randn(1, 3, 224, 224),))`."
            )
        gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    return build_channel_graph(gm)


def _has_shapes(gm: fx.GraphModule) -> bool:
    """True when every placeholder of ``gm`` carries shape metadata (``meta["tensor_meta"]``)."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    return bool(nodes) and all("tensor_meta" in n.meta for n in nodes if n.op == "placeholder")


def resize(cg: ChannelGraph, plan: WidthPlan | Mapping[int, GroupPlan], *, seed: int = 0) -> fx.GraphModule:
    """Apply ``plan`` to the model ``cg`` was built from; returns a new, independent GraphModule.

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
    return apply_plan(cg.gm, cg, plan, seed=seed)
