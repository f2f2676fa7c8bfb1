"""Which containers of the user's model run without a module they held: tried once per kind, before selection.

Selection removes a group whole only where write-back can take the modules that go with it out of the user's class
(:attr:`~fxmorph.analysis.removal.Removal.droppable`): each must sit in a container, a ``Sequential``,
``ModuleList`` or ``ModuleDict`` that tracing recorded (:data:`~fxmorph.meta.CONTAINERS_KEY`). That the parent is
a container is not enough. torchvision's dense block runs what it holds, but timm's Res2Net block zips its
``convs`` with the chunks of a split by position, and a mixed convolution indexes its chunks by its convolutions'
order. Without one of them, the class computes a different graph: write-back refuses it and the user gets a
GraphModule.

:func:`confirm_containers` removes one group per kind of container (the container's class in its owner's class)
in a trial, writes the result back and takes every container of a kind that fails out of the recorded containers,
so that selection keeps those groups. What it proves is the kind's behaviour. The final write-back still proves
the result itself.
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
from fxmorph.meta import CONTAINERS_KEY
from fxmorph.surgery.apply import apply_plan
from fxmorph.surgery.write_back import write_back

__all__ = ["confirm_containers"]

logger = logging.getLogger(__name__)

Kind = tuple[str, str]
"""A container's class and the class of the module that holds it (``("ModuleList", "Bottle2neck")``)."""


def _kind(model: nn.Module, path: str) -> Kind | None:
    """The kind of the container at ``path`` of ``model`` (None where ``model`` has no module there)."""
    try:
        container, owner = model.get_submodule(path), model.get_submodule(path.rpartition(".")[0])
    except AttributeError:
        return None
    return type(container).__qualname__, type(owner).__qualname__


def _trials(cg: ChannelGraph, model: nn.Module) -> dict[Kind | None, int]:
    """Per kind of container, the first droppable group whose removal takes modules out of containers of that kind
    alone."""
    trials: dict[Kind | None, int] = {}
    for group in cg.free_groups:
        removal = cg.removal(group.id)
        if not removal.droppable:
            continue
        parents = frozenset(p.rpartition(".")[0] for p in removed_modules(cg.gm, removal.dead))
        kinds = {_kind(model, p) for p in parents}
        if len(kinds) == 1 and None not in kinds:
            trials.setdefault(next(iter(kinds)), group.id)
    return trials


def _runs_without(model: nn.Module, cg: ChannelGraph, gid: int, leaf_modules: Iterable[type | str]) -> bool:
    """Whether the user's class, without the modules that go with group ``gid``, is proven to compute the graph
    surgery makes without them."""
    try:
        write_back(model, apply_plan(cg.gm, cg, WidthPlan({gid: GroupPlan(())})), leaf_modules)
    except FxmorphError as exc:  # a refused write-back, or surgery failing on the trial: the kind is not used
        logger.info("removing group %d whole: %s", gid, exc)
        return False
    return True


def confirm_containers(model: nn.Module, gm: fx.GraphModule, leaf_modules: Iterable[type | str] = ()) -> None:
    """Take every container of ``gm.meta[CONTAINERS_KEY]`` whose kind failed its trial (see the module docstring)
    out of that record, so that selection on ``gm`` removes no group whose modules such containers hold."""
    containers = tuple(gm.meta.get(CONTAINERS_KEY, ()))
    if not containers:
        return
    cg = build_channel_graph(gm)
    leaf_modules = tuple(leaf_modules)
    failed = {kind for kind, gid in _trials(cg, model).items() if not _runs_without(model, cg, gid, leaf_modules)}
    if failed:
        kept = tuple(p for p in containers if _kind(model, p) not in failed)
        logger.info("containers that do not run without a module they held: %s", sorted(failed))
        gm.meta[CONTAINERS_KEY] = kept
