"""Restate a model's configuration object after its widths changed (Hugging Face's ``config``).

A model built from a configuration (``type(model)(config)``, Hugging Face's convention) is rebuilt from it by
``from_pretrained``: its config must state the new widths, or the saved weights do not load. Which config
fields size which tensors is the class's business, so nothing here is specific to a family: the fields are
found by building the class on the meta device from candidate configs until every tensor has the shape the
result holds, and the config found is accepted only if a model built from it and given the result's weights
computes exactly what the result computes. Where no config states the result (layers of one role kept
different widths), the config is left as it was and the reason is given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fxmorph.capture.config_sizes import ConfigSizes, Shapes, built_shapes, config_of, config_sizes, int_fields, shapes
from fxmorph.capture.export import switched
from fxmorph.validate import frozen_mode

__all__ = ["ConfigUpdate", "restate_config"]

logger = logging.getLogger(__name__)

_BUILDS = 100
"""At most this many candidate configs are built (on the meta device: no memory for weights) per model."""

Change = tuple[str, int]


@dataclass(frozen=True)
class ConfigUpdate:
    """What became of a model's config: the fields set (``name: old -> new``), or why none could be."""

    changes: tuple[str, ...] = ()
    reason: str | None = None
    """Why the config was left as it was (``None`` when it states the result)."""

    @property
    def states_result(self) -> bool:
        """Whether the class built from the config holds the result's weights and computes the same."""
        return self.reason is None


def _misses(built: Shapes | None, target: Shapes) -> int:
    """How many tensors of the result the built model lacks or holds in another shape (unbuildable: all)."""
    if built is None:
        return len(target) + 1
    return sum(built.get(name) != shape for name, shape in target.items()) + len(set(built) - set(target))


def _width_changes(before: Shapes, after: Shapes) -> set[tuple[int, int]]:
    """Every (old, new) size of a tensor dim that changed."""
    pairs = set()
    for name, shape in after.items():
        old = before.get(name)
        if old is not None and len(old) == len(shape):
            pairs.update((a, b) for a, b in zip(old, shape, strict=True) if a != b)
    return pairs


def _candidates(fields: dict[str, int], pairs: set[tuple[int, int]]) -> list[Change]:
    """Field values that would explain a changed dim: the dim itself (``hidden_size``), or the field as a factor
    of it (``num_attention_heads`` of heads x head width)."""
    found: set[Change] = set()
    for name, value in fields.items():
        for old, new in pairs:
            if old == value:
                found.add((name, new))
            elif value > 1 and old % value == 0 and new % (old // value) == 0:
                found.add((name, new // (old // value)))
    return sorted(found)


def _with(config: Any, changes: list[Change]) -> Any:
    """A copy of ``config`` with ``changes`` set."""
    new = copy.deepcopy(config)
    for name, value in changes:
        setattr(new, name, value)
    return new


def _solved(config: Any, sizes: ConfigSizes, before: Shapes, after: Shapes) -> list[Change]:
    """The field values that the result's shapes imply, where each sized dim is taken as proportional to each
    field that sizes it: a dim one field sizes gives that field's new value (``hidden_size`` from the embedding's
    width), and a dim of two (Llama's query rows, ``num_attention_heads * head_dim``) gives one once the other is
    known. Fields no dim determines, or whose dims disagree, keep their value."""
    old = int_fields(config)
    # every sized dim of a tensor both models hold, with how much it grew or shrank
    dims = [
        (fields, after[name][dim] / before[name][dim])
        for (name, dim), fields in sizes.sized.items()
        if name in after and name in before and len(after[name]) == len(before[name]) and fields <= old.keys()
    ]
    ratio: dict[str, float] = {}
    progress = True
    while progress:
        progress = False
        for fields, r in dims:
            unknown = [f for f in fields if f not in ratio]
            if len(unknown) == 1:
                ratio[unknown[0]] = r / float(np.prod([ratio[f] for f in fields if f in ratio]))
                progress = True
    disagree: set[str] = set()  # every dim must agree with the values found
    for fields, r in dims:
        if fields <= ratio.keys() and not np.isclose(np.prod([ratio[f] for f in fields]), r):
            disagree |= fields
    changes = []
    for field, r in ratio.items():
        value = old[field] * r
        if field not in disagree and r != 1 and np.isclose(value, round(value)) and round(value) > 0:
            changes.append((field, round(value)))
    return sorted(changes)


def _search(
    cls: type,
    config: Any,
    target: Shapes,
    options: list[Change],
    accept: Callable[[Any], bool],
    start: list[Change] | None = None,
) -> list[Change] | None:
    """Changes under which ``cls`` builds every tensor in its target shape and ``accept`` holds, found depth
    first from ``start`` (the solved values), then from no change: at each step the changes that leave fewest
    tensors wrong, best first (smaller fields first)."""
    scores: dict[frozenset[Change], int] = {}  # a set of changes is built once, whatever order reached it

    def score(changes: list[Change]) -> int:
        key = frozenset(changes)
        if key not in scores:
            scores[key] = _misses(built_shapes(cls, _with(config, changes)), target)
        return scores[key]

    def walk(changes: list[Change], misses: int) -> Iterator[list[Change]]:
        if misses == 0:
            yield changes  # not accepted if the walk goes on: then changes that move no shape may make it so
        done = {name for name, _ in changes}
        scored = []
        for option in options:
            if option[0] in done or (len(scores) >= _BUILDS and frozenset([*changes, option]) not in scores):
                continue
            s = score([*changes, option])
            # with every shape right, a count that sizes nothing alone (BERT's heads, whose width hidden_size /
            # num_attention_heads the class derives) may still be what makes the outputs right
            if s < misses or s == misses == 0:
                # among equals, a count before a size: pruning removes whole heads far more often than it
                # narrows every head, and both can give the same tensor shapes
                scored.append((s, getattr(config, option[0]), option))
        for s, _, option in sorted(scored):
            yield from walk([*changes, option], s)

    tried: set[frozenset[Change]] = set()  # reached in another order: checked once
    for first in ([start] if start else []) + [[]]:  # the walk adds no field ``first`` already set
        for changes in walk(first, score(first)):
            if frozenset(changes) not in tried and accept(_with(config, changes)):
                return changes
            tried.add(frozenset(changes))
    return None


def same_outputs(a: nn.Module, b: nn.Module, inputs: tuple[Any, ...]) -> bool:
    """Whether two models compute bit for bit the same on ``inputs`` (a cache switched off where there is one)."""
    with torch.no_grad():
        out_a, _ = tree_flatten(switched(a)(*inputs))
        out_b, _ = tree_flatten(switched(b)(*inputs))
    pairs = list(zip(out_a, out_b, strict=False))
    return len(out_a) == len(out_b) and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y) for x, y in pairs
    )


def _rebuilt(cls: type, config: Any, model: nn.Module) -> nn.Module:
    """``cls(config)`` holding ``model``'s tensors themselves: built on the meta device and given them, so the
    check costs no memory for weights (a 7 B model included). Buffers the class computes and does not save
    (rotary frequencies) are taken from ``model`` too, where they have the same shape."""
    with torch.device("meta"):
        rebuilt = cls(config).eval()
    rebuilt.load_state_dict(model.state_dict(), assign=True)
    theirs = dict(model.named_modules())
    for path, module in rebuilt.named_modules():
        source = theirs.get(path)
        if source is None:
            continue
        # unsaved buffers and plain tensor attributes (rotary frequencies) are still meta: the result's own
        for table, own in ((module._buffers, source._buffers), (vars(module), vars(source))):
            for name, value in list(table.items()):
                mine = own.get(name)
                meta = isinstance(value, torch.Tensor) and value.is_meta
                if meta and isinstance(mine, torch.Tensor) and mine.shape == value.shape:
                    table[name] = mine
    return rebuilt


def restate_config(
    model: nn.Module, original: nn.Module, inputs: tuple[Any, ...], sizes: ConfigSizes | None = None
) -> ConfigUpdate | None:
    """Set the fields of ``model.config`` (a written-back copy of ``original``) that size its tensors, so the
    class built from the config holds the result; None for a model without a config (see the module doc).
    ``sizes``: what each field of ``original``'s config sizes (probed here when not given)."""
    config = config_of(model)
    if config is None:
        return None
    cls, target, before = type(model), shapes(model), shapes(original)
    options = _candidates(int_fields(config), _width_changes(before, target))
    sizes = sizes if sizes is not None else config_sizes(original)
    start = _solved(config, sizes, before, target) if sizes is not None else None

    refused: list[str] = []

    def accept(candidate: Any) -> bool:
        """The class built from ``candidate`` takes the result's weights and computes what the result does."""
        try:
            if callable(getattr(candidate, "validate", None)):
                candidate.validate()  # the checks save_pretrained makes (hidden size a multiple of the heads)
            with frozen_mode(model):  # compared in eval mode; the result keeps the mode the user's model had
                return same_outputs(_rebuilt(cls, candidate, model), model, inputs)
        except Exception as exc:  # a config that builds on meta may still fail to validate, load or run
            logger.debug("config candidate rejected: %s", exc)
            refused.append(f"{type(exc).__name__}: {exc}".splitlines()[-1].strip())
            return False

    changes = _search(cls, config, target, options, accept, start)
    if changes is None and refused:
        reason = f"the config that states the result's widths is refused by {cls.__name__}: {refused[0]}"
    elif changes is None:
        reason = (
            f"no config of {cls.__name__} builds the result's tensor shapes: layers of one role kept different "
            "widths (pass uniform_blocks=True to keep them equal), or the class states a width its config does not hold"
        )
    if changes is None:
        logger.info("config left as it was: %s", reason)
        return ConfigUpdate(reason=reason)
    described = tuple(f"{name}: {getattr(config, name)} -> {value}" for name, value in changes)
    for name, value in changes:
        setattr(config, name, value)
    return ConfigUpdate(described)
