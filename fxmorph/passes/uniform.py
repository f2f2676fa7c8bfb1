"""Uniform repeated blocks: the groups that play one role in every repeated block keep one width.

Configuration formats that hold one size per model (a Hugging Face config's ``intermediate_size``,
TensorRT-LLM's) can describe a pruned model only if every block kept the same widths. With
``uniform_blocks``, the passes that choose widths treat each class of same-role groups as one unit
(:class:`~fxmorph.analysis.cost.TiedCosts`): a step moves every member at once and costs their FLOPs summed;
pruning weighs it by its members' importance per FLOP averaged, growth by their gradient gains summed. The
budget is met over units exactly as over groups.

Two groups play the same role when they have the same size and their parameters are the same up to the
index of the repeated blocks they lie in (:func:`~fxmorph.capture.blocks.block_pattern`): ``layer3.1.conv1``'s
output channels and ``layer3.4.conv1``'s, or ``model.layers.*.mlp.up_proj``'s. A class one of whose groups
may not change (pinned, protected) keeps every member's width: one block cannot differ from the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

import numpy as np

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel, Costs, TiedCosts
from fxmorph.capture.blocks import block_pattern, repeated_blocks

__all__ = ["in_units", "per_unit", "same_role_classes", "settle_classes", "summed"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def same_role_classes(cg: ChannelGraph) -> list[list[int]]:
    """Classes (of two groups or more) of ``cg``'s groups that play one role in the repeated blocks of the
    model (recorded at trace time), each in group order. Groups without parameters play no role."""
    blocks = frozenset(repeated_blocks(cg.gm))
    if not blocks:
        return []
    roles: dict[tuple[int, frozenset[tuple[str, int, str]]], list[int]] = {}
    for group in cg.groups:
        patterns = frozenset((block_pattern(m.name, blocks), m.dim, str(m.role)) for m in group.params)
        # a group none of whose parameters lies in a repeated block has no counterpart to keep up with
        if any("*" in name for name, _, _ in patterns):
            roles.setdefault((group.size, patterns), []).append(group.id)
    return [ids for ids in roles.values() if len(ids) > 1]


def settle_classes(classes: list[list[int]], free: Collection[int]) -> tuple[list[list[int]], list[int]]:
    """The classes all of whose groups are ``free``, and the free groups left (the members of a class with
    a fixed group are fixed too: every block keeps the width of the one that cannot change)."""
    free_set = set(free)
    kept = [c for c in classes if all(g in free_set for g in c)]
    fixed = {g for c in classes if c not in kept for g in c}
    if fixed:
        logger.info("uniform blocks: %d group(s) keep their width: a same-role group cannot change", len(fixed))
    return kept, [g for g in free if g not in fixed]


def per_unit(tied: TiedCosts, values: Mapping[int, T], combine: Callable[[list[T]], T]) -> dict[int, T]:
    """``values`` of groups as values of units: ``combine`` of its members' values, for every unit whose
    groups all have one."""
    return {
        u: combine([values[g] for g in members])
        for u, members in enumerate(tied.members)
        if all(g in values for g in members)
    }


def summed(arrays: list[np.ndarray]) -> np.ndarray:
    """The element-wise sum of arrays, the shorter ones padded with zeros."""
    out = np.zeros(max(len(a) for a in arrays))
    for a in arrays:
        out[: len(a)] += a
    return out


def in_units(
    cost: CostModel,
    classes: list[list[int]],
    groups: Collection[int],
    choose: Callable[[Costs, list[int], Mapping[int, np.ndarray] | None], np.ndarray],
    values: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """The group widths that ``choose(costs, variables, values)`` picks with each of ``classes`` as one
    variable: ``choose`` sees the costs over units (:class:`~fxmorph.analysis.cost.TiedCosts`), the units
    all of whose groups are in ``groups``, and per unit its members' ``values`` summed (:func:`summed`).
    Without classes, it sees ``cost``, ``groups`` and ``values`` themselves."""
    if not classes:
        return choose(cost, list(groups), values)
    tied = cost.tied(classes)
    united = per_unit(tied, values, summed) if values is not None else None
    return tied.expand(choose(tied, tied.units_within(groups), united))
