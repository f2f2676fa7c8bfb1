"""Taking the modules that went with groups removed whole out of a copy of the user's model (for write-back).

A module in a container (``Sequential``, ``ModuleList``, ``ModuleDict``) is taken out of it; a module that returned
a residual branch left constant is replaced by the result's :class:`~fxmorph.surgery.constant.Constant`; beside
such a constant, a module the class calls by name is :class:`~fxmorph.surgery.constant.Skipped` (what it returns
fed only the constant's branch). Write-back's comparison proves the copy computes the result's graph, and
:func:`computes_alike` runs both, since a constant's broadcast shape can fail where the class writes into the branch's
output in place (``result += input``), which a trace records as a plain ``add``.
"""

from __future__ import annotations

from torch import fx, nn

from fxmorph.capture.blocks import CONTAINERS
from fxmorph.capture.export import probe_inputs
from fxmorph.errors import WriteBackError
from fxmorph.meta import FOLDED_KEY, REMOVED_KEY
from fxmorph.surgery.config import same_outputs
from fxmorph.surgery.constant import Skipped

__all__ = ["computes_alike", "drop_removed"]


def drop_removed(copied: nn.Module, result: fx.GraphModule) -> None:
    """Take the modules surgery removed (:data:`~fxmorph.meta.REMOVED_KEY`) out of the copy, as the module
    docstring says, keeping the other entries' names: a container whose forward runs what it holds (torchvision's
    dense block) then runs without them, and the comparison proves it. A module held by another class, with no
    constant beside it, raises :class:`WriteBackError`: that class's forward names it."""
    folded = set(result.meta.get(FOLDED_KEY, ()))
    for path in result.meta.get(REMOVED_KEY, ()):
        owner, _, leaf = path.rpartition(".")
        parent = _module_at(copied, owner)
        if parent is None:
            continue
        if path in folded:
            parent._modules[leaf] = result.get_submodule(path)
        elif isinstance(parent, CONTAINERS):
            parent._modules.pop(leaf, None)
        elif folded:
            parent._modules[leaf] = Skipped()
        else:
            raise WriteBackError(
                f"cannot give the result back as {type(copied).__name__}: '{path}' went with a group removed whole, "
                f"and {type(parent).__name__}'s forward calls it by name (only a Sequential, ModuleList or ModuleDict "
                "runs without a module it held)."
            )


def computes_alike(copied: nn.Module, result: fx.GraphModule) -> None:
    """Where the result holds constants (:data:`~fxmorph.meta.FOLDED_KEY`), run the copy and the result on probe
    inputs, twice (an in-place write into a constant would show the second time), and raise
    :class:`WriteBackError` where they differ or the copy fails."""
    if not result.meta.get(FOLDED_KEY):
        return
    inputs = probe_inputs(result)
    for _ in range(2):
        try:
            alike = same_outputs(result, copied, inputs)
        except Exception as exc:  # the user's forward on the constant: an in-place broadcast, most often
            raise WriteBackError(
                f"cannot give the result back as {type(copied).__name__}: its forward fails on a residual branch "
                f"left constant ({type(exc).__name__}: {exc}); the class may write into the branch's output in "
                "place (`out += x`)."
            ) from exc
        if not alike:
            raise WriteBackError(
                f"cannot give the result back as {type(copied).__name__}: with a residual branch left constant, "
                "it computes other values than the result's graph."
            )


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``model`` at ``path`` (``model`` for ``""``), or None where there is none."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None
