"""Taking the modules that went with groups removed whole out of a copy of the user's model (for write-back)."""

from __future__ import annotations

from torch import fx, nn

from fxmorph.capture.blocks import CONTAINERS
from fxmorph.errors import WriteBackError
from fxmorph.meta import REMOVED_KEY

__all__ = ["drop_removed"]


def drop_removed(copied: nn.Module, result: fx.GraphModule) -> None:
    """Take the modules surgery removed (:data:`~fxmorph.meta.REMOVED_KEY`) out of their containers in the copy,
    keeping the other entries' names: a container whose forward runs what it holds (torchvision's dense block)
    then runs without them, and the comparison proves it. A module held by another class raises
    :class:`WriteBackError`: that class's forward names it."""
    for path in result.meta.get(REMOVED_KEY, ()):
        owner, _, leaf = path.rpartition(".")
        parent = _module_at(copied, owner)
        if parent is None:
            continue
        if not isinstance(parent, CONTAINERS):
            raise WriteBackError(
                f"cannot give the result back as {type(copied).__name__}: '{path}' went with a group removed whole, "
                f"and {type(parent).__name__}'s forward calls it by name (only a Sequential, ModuleList or ModuleDict "
                "runs without a module it held)."
            )
        parent._modules.pop(leaf, None)


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``model`` at ``path`` (``model`` for ``""``), or None where there is none."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None
