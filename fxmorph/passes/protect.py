"""Which groups a pass may change: ``protect`` prefixes, the free groups a cut may thin and the groups
growth may widen.

Every pass that changes widths (remove-dead aside, which removes only what cannot matter) reads these:
``prune`` and ``width`` cut :func:`free_group_ids`, ``grow`` and ``width`` above the model's FLOPs widen
:func:`grow_candidates`, and each checks its ``protect`` prefixes with :func:`check_protect` in its
``requires``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import fx

from fxmorph.analysis import ChannelGraph, Group
from fxmorph.errors import InputError

__all__ = ["check_protect", "free_group_ids", "grow_candidates", "is_protected"]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(f"{prefix}.")


def is_protected(group: Group, protect: Sequence[str]) -> bool:
    """True if a parameter that produces ``group`` lives at or under one of the module paths ``protect``
    (``"features.1"`` covers ``features.1.0.weight``, not ``features.10``)."""
    return any(_under(p.name, prefix) for p in group.producers for prefix in protect)


def check_protect(gm: fx.GraphModule, protect: Sequence[str]) -> None:
    """Raise :class:`InputError` for a ``protect`` entry that names no module or parameter of ``gm``."""
    names = [n for n, _ in gm.named_modules() if n] + [n for n, _ in gm.named_parameters()]
    for prefix in protect:
        if not any(_under(n, prefix) for n in names):
            close = difflib.get_close_matches(prefix, names, n=3)
            hint = f"Did you mean: {', '.join(close)}?" if close else "Pass paths as model.named_modules() names them."
            raise InputError(f"protect names '{prefix}', but the model has no module or parameter at that path. {hint}")


def free_group_ids(cg: ChannelGraph, protect: tuple[str, ...]) -> list[int]:
    """Free groups, minus those whose producing parameters live under a protected module path."""
    check_protect(cg.gm, protect)
    return [g.id for g in cg.free_groups if not is_protected(g, protect)]


def grow_candidates(cg: ChannelGraph, protect: Sequence[str]) -> tuple[list[int], dict[int, str]]:
    """Groups that may grow, and why each other free group may not (protected, or a grow pin)."""
    check_protect(cg.gm, protect)
    ok, skipped = [], {}
    for g in cg.free_groups:
        if is_protected(g, protect):
            skipped[g.id] = "protected"
        elif g.grow_pins:
            skipped[g.id] = "; ".join(dict.fromkeys(str(p) for p in g.grow_pins))
        else:
            ok.append(g.id)
    return ok, skipped
