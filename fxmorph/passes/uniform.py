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

A model with a configuration object (:mod:`fxmorph.capture.config_sizes`) ties more: the groups one config field
sizes keep one width in channels (BERT's ``hidden_size`` sizes the residual stream and every layer's heads, whose
width it derives, so both change together, a stream channel per head channel; GPT-2's ``n_embd`` also sizes its
MLP, at 4 channels per stream channel), and a group no field sizes (a
width held in a list the probe does not vary) keeps its own. Then the config states the result and
``from_pretrained`` rebuilds it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Mapping

import networkx as nx
import numpy as np

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel, Costs, TiedCosts
from fxmorph.capture.blocks import block_pattern, repeated_blocks
from fxmorph.capture.config_sizes import ConfigSizes
from fxmorph.meta import CONFIG_SIZES_KEY

__all__ = [
    "coarse_cumulative",
    "coarse_sum",
    "in_units",
    "per_unit",
    "same_role_classes",
    "settle_classes",
    "summed",
    "width_classes",
]

logger = logging.getLogger(__name__)


def _block_classes(cg: ChannelGraph) -> list[list[int]]:
    """Classes of groups that play one role in the repeated blocks of the model (recorded at trace time)."""
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


def _config_classes(cg: ChannelGraph, sizes: ConfigSizes) -> list[list[int]]:
    """Classes of groups sized by one config field alone (a parameter dim of each changes with that field and
    no other). A dim two fields size (Llama's query rows, ``num_attention_heads * head_dim``) ties nothing: it can
    change through either, so one field's other dims (rotary frequencies, by ``head_dim``) need not follow."""
    by_field: dict[str, set[int]] = {}
    for group in cg.groups:
        for m in group.params:
            fields = sizes.fields_of(m.name, m.dim)
            if len(fields) == 1:
                by_field.setdefault(next(iter(fields)), set()).add(group.id)
    return [sorted(ids) for ids in by_field.values() if len(ids) > 1]


def _tieable(cg: ChannelGraph, members: list[int]) -> bool:
    """Whether ``members`` can keep one width: each size a whole multiple of the smallest (see
    :class:`~fxmorph.analysis.cost.TiedCosts`)."""
    lead = min(cg.groups[g].size for g in members)
    return all(cg.groups[g].size % lead == 0 for g in members)


def _merged(cg: ChannelGraph, classes: list[list[int]]) -> list[list[int]]:
    """``classes`` joined where they share a group, each in group order."""
    graph = nx.Graph()
    for members in classes:
        graph.add_nodes_from(members)
        graph.add_edges_from(itertools.pairwise(members))
    return sorted(sorted(c) for c in nx.connected_components(graph) if len(c) > 1)


def same_role_classes(cg: ChannelGraph) -> list[list[int]]:
    """Classes (of two groups or more) of ``cg``'s groups that keep one width, each in group order: those that
    play one role in the repeated blocks of the model, joined with those one config field sizes (see the module
    doc). Groups without parameters play no role. The members of a class keep one width in proportion to their
    sizes: a field sizes its groups in proportion (GPT-2's ``n_embd`` sizes its MLP at 4x). A joined class whose
    sizes are not whole multiples of the smallest falls back to its block classes."""
    blocks = _block_classes(cg)
    sizes = cg.gm.meta.get(CONFIG_SIZES_KEY)
    if not isinstance(sizes, ConfigSizes):
        return blocks
    out = []
    for members in _merged(cg, [*blocks, *_config_classes(cg, sizes)]):
        if _tieable(cg, members):
            out.append(members)
        else:
            logger.info("%s's config sizes groups %s at different widths: only their blocks are tied",
                        sizes.class_name, members)  # fmt: skip
            out += [c for c in blocks if set(c) <= set(members)]
    return sorted(out)


def unsized_groups(cg: ChannelGraph) -> set[int]:
    """The groups with parameters none of whose dims a field of the model's config sizes (none without a
    recorded config): a config cannot state them at another width."""
    sizes = cg.gm.meta.get(CONFIG_SIZES_KEY)
    if not isinstance(sizes, ConfigSizes):
        return set()
    return {g.id for g in cg.groups if g.params and not any(sizes.fields_of(m.name, m.dim) for m in g.params)}


def width_classes(cg: ChannelGraph, free: Collection[int], uniform: bool) -> tuple[list[list[int]], list[int]]:
    """The classes width selection keeps at one width, all of whose groups are ``free``, and the free groups left.

    Always the groups the model's class states as one width (:attr:`~fxmorph.analysis.ChannelGraph.same_width`:
    the pieces of ``split(x, self.width)``), so that the result comes back as the class; with ``uniform``
    (``uniform_blocks``) also :func:`same_role_classes`, joined where they share a group, and without the groups
    the model's config cannot state at another width."""
    classes = [*cg.same_width, *(same_role_classes(cg) if uniform else [])]
    joined = [c for c in _merged(cg, classes) if _tieable(cg, c)]
    fixed = unsized_groups(cg) if uniform else set()
    if fixed & set(free):
        logger.info("uniform blocks: %d group(s) keep their width: no field of the config sizes them",
                    len(fixed & set(free)))  # fmt: skip
    return settle_classes(joined, [g for g in free if g not in fixed])


def settle_classes(classes: list[list[int]], free: Collection[int]) -> tuple[list[list[int]], list[int]]:
    """The classes all of whose groups are ``free``, and the free groups left (the members of a class with
    a fixed group are fixed too: every block keeps the width of the one that cannot change)."""
    free_set = set(free)
    kept = [c for c in classes if all(g in free_set for g in c)]
    fixed = {g for c in classes if c not in kept for g in c}
    if fixed:
        logger.info("uniform blocks: %d group(s) keep their width: a same-role group cannot change", len(fixed))
    return kept, [g for g in free if g not in fixed]


def per_unit(
    tied: TiedCosts,
    values: Mapping[int, np.ndarray],
    combine: Callable[[list[np.ndarray]], np.ndarray],
    coarsen: Callable[[np.ndarray, int], np.ndarray],
) -> dict[int, np.ndarray]:
    """``values`` of groups as values of units: ``combine`` of its members' values, each over the unit's elements
    (``coarsen(value, ratio)`` for a member of ``ratio`` elements per unit element), for every unit whose groups
    all have one."""
    return {
        u: combine([coarsen(values[g], int(tied.ratio[g])) if tied.ratio[g] > 1 else values[g] for g in members])
        for u, members in enumerate(tied.members)
        if all(g in values for g in members)
    }


def coarse_cumulative(cumulative: np.ndarray, ratio: int) -> np.ndarray:
    """A cumulative value array (its first ``k`` elements' values, for every ``k``) over elements of ``ratio`` of
    its own: every ``ratio``-th entry, per original element (the mean value of the elements one stands for)."""
    return cumulative[::ratio] / ratio


def coarse_sum(values: np.ndarray, ratio: int) -> np.ndarray:
    """Per-element values summed over runs of ``ratio`` elements (the last run padded with zeros)."""
    padded = np.zeros(-(-len(values) // ratio) * ratio)
    padded[: len(values)] = values
    return padded.reshape(-1, ratio).sum(axis=1)


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
    united = per_unit(tied, values, summed, coarse_sum) if values is not None else None
    return tied.expand(choose(tied, tied.units_within(groups), united))
