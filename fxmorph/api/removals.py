"""Which groups the user's class runs without: one removal tried per kind, before selection.

Selection removes a group whole only where write-back can take what goes with it out of the user's class
(:attr:`~fxmorph.analysis.removal.Removal.droppable`): modules in containers are taken out, a module returning a
residual branch left constant is replaced by the constant, and modules beside it that fed only that branch are
skipped. That the analysis allows it is not enough. torchvision's dense block runs what it holds, but timm's Res2Net
block zips its ``convs`` with the chunks of a split by position; torchvision's inverted residual adds its branch to
its input, but a ResNet block calls the activation it shares with the stream between the layers that went, and a
ConvNeXt block adds its input into the branch's output in place (the constant is one value per channel). Each of
those computes another graph, or fails, without the modules: write-back refuses it and the user gets a GraphModule.

:func:`confirm_removals` removes one group per kind of removal (the classes of the modules that go and of their
parents) in a trial, writes the result back, and records the modules of every kind that fails (or that was not
tried: at most :data:`TRIALS` are) in :data:`~fxmorph.meta.KEPT_MODULES_KEY`, so that selection keeps those groups.
What a trial proves is the kind's behaviour; the final write-back still proves the result itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import fx, nn

from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.graph import ChannelGraph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.analysis.removal import removed_modules
from fxmorph.errors import FxmorphError
from fxmorph.meta import KEPT_MODULES_KEY
from fxmorph.surgery.apply import apply_plan
from fxmorph.surgery.write_back import write_back

__all__ = ["TRIALS", "confirm_removals"]

logger = logging.getLogger(__name__)

TRIALS = 8
"""At most this many kinds are tried, those with the most groups first; the groups of the others are kept."""

Kind = frozenset[tuple[str, str]]
"""The classes of the modules a removal takes, each beside its parent's (``("Sequential", "InvertedResidual")``)."""


def _kind(model: nn.Module, paths: Iterable[str]) -> Kind | None:
    """The kind of a removal taking the modules at ``paths`` of ``model`` (None where one is not ``model``'s)."""
    out = set()
    for path in paths:
        try:
            module, parent = model.get_submodule(path), model.get_submodule(path.rpartition(".")[0])
        except AttributeError:
            return None
        out.add((type(module).__qualname__, type(parent).__qualname__))
    return frozenset(out)


def _kinds(cg: ChannelGraph, model: nn.Module) -> dict[Kind | None, list[tuple[int, tuple[str, ...]]]]:
    """The droppable groups of ``cg`` by kind, each with the module paths its removal takes."""
    kinds: dict[Kind | None, list[tuple[int, tuple[str, ...]]]] = {}
    for group in cg.free_groups:
        removal = cg.removal(group.id)
        if removal.droppable:
            paths = removed_modules(cg.gm, removal.dead)
            kinds.setdefault(_kind(model, paths), []).append((group.id, paths))
    return kinds


def _runs_without(model: nn.Module, cg: ChannelGraph, gid: int, leaf_modules: Iterable[type | str]) -> bool:
    """Whether the user's class, without what goes with group ``gid``, is proven to compute the graph surgery
    makes without it."""
    try:
        write_back(model, apply_plan(cg.gm, cg, WidthPlan({gid: GroupPlan(())})), leaf_modules)
    except FxmorphError as exc:  # a refused write-back, or surgery failing on the trial: the kind is not used
        logger.info("removing group %d whole: %s", gid, exc)
        return False
    return True


def confirm_removals(model: nn.Module, gm: fx.GraphModule, leaf_modules: Iterable[type | str] = ()) -> None:
    """Record in ``gm.meta[KEPT_MODULES_KEY]`` the modules of every kind of removal whose trial failed or that was
    not tried (see the module docstring), so that selection on ``gm`` keeps the groups that would take them."""
    cg = build_channel_graph(gm)
    leaf_modules = tuple(leaf_modules)
    ranked = sorted(_kinds(cg, model).items(), key=lambda item: -len(item[1]))
    kept: set[str] = set(gm.meta.get(KEPT_MODULES_KEY, ()))
    for rank, (kind, groups) in enumerate(ranked):
        if kind is not None and rank < TRIALS and _runs_without(model, cg, groups[0][0], leaf_modules):
            continue
        logger.info("keeping %d group(s) whole: the class does not run without %s", len(groups), sorted(kind or ()))
        kept.update(path for _, paths in groups for path in paths)
    gm.meta[KEPT_MODULES_KEY] = tuple(sorted(kept))
