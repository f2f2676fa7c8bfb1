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

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fxmorph.capture.export import switched
from fxmorph.validate import frozen_mode

__all__ = ["ConfigUpdate", "restate_config"]

logger = logging.getLogger(__name__)

_BUILDS = 100
"""At most this many candidate configs are built (on the meta device: no memory for weights) per model."""

Shapes = dict[str, tuple[int, ...]]
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


def _config_of(model: nn.Module) -> Any:
    """The model's configuration object, where it has one the class can be built from."""
    config = getattr(model, "config", None)
    return config if config is not None and callable(getattr(config, "to_dict", None)) else None


def _shapes(model: nn.Module) -> Shapes:
    """The shape of every tensor the model saves."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _built_shapes(cls: type, config: Any) -> Shapes | None:
    """The tensor shapes of ``cls(config)``, built on the meta device; None where the config is not valid."""
    try:
        with torch.device("meta"):
            return _shapes(cls(config))
    except Exception as exc:  # any failure to build means: not this config
        logger.debug("config candidate rejected by %s: %s", cls.__name__, exc)
        return None


def _misses(built: Shapes | None, target: Shapes) -> int:
    """How many tensors of the result the built model lacks or holds in another shape (unbuildable: all)."""
    if built is None:
        return len(target) + 1
    return sum(built.get(name) != shape for name, shape in target.items()) + len(set(built) - set(target))


def _int_fields(config: Any) -> dict[str, int]:
    """The config's integer fields (booleans are not sizes)."""
    fields = config.to_dict()
    return {k: v for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}


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


def _search(
    cls: type, config: Any, target: Shapes, options: list[Change], accept: Callable[[Any], bool]
) -> list[Change] | None:
    """Changes under which ``cls`` builds every tensor in its target shape and ``accept`` holds, found depth
    first: at each step the changes that leave fewest tensors wrong, best first (smaller fields first)."""
    scores: dict[frozenset[Change], int] = {}  # a set of changes is built once, whatever order reached it

    def score(changes: list[Change]) -> int:
        key = frozenset(changes)
        if key not in scores:
            scores[key] = _misses(_built_shapes(cls, _with(config, changes)), target)
        return scores[key]

    def walk(changes: list[Change], misses: int) -> Iterator[list[Change]]:
        if misses == 0:
            yield changes
            return
        done = {name for name, _ in changes}
        scored = []
        for option in options:
            if option[0] in done or (len(scores) >= _BUILDS and frozenset([*changes, option]) not in scores):
                continue
            s = score([*changes, option])
            if s < misses:
                # among equals, a count before a size: pruning removes whole heads far more often than it
                # narrows every head, and both can give the same tensor shapes
                scored.append((s, getattr(config, option[0]), option))
        for s, _, option in sorted(scored):
            yield from walk([*changes, option], s)

    for changes in walk([], score([])):
        if accept(_with(config, changes)):
            return changes
    return None


def _same_outputs(a: nn.Module, b: nn.Module, inputs: tuple[Any, ...]) -> bool:
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


def restate_config(model: nn.Module, original: nn.Module, inputs: tuple[Any, ...]) -> ConfigUpdate | None:
    """Set the fields of ``model.config`` (a written-back copy of ``original``) that size its tensors, so the
    class built from the config holds the result; None for a model without a config (see the module doc)."""
    config = _config_of(model)
    if config is None:
        return None
    cls, target = type(model), _shapes(model)
    options = _candidates(_int_fields(config), _width_changes(_shapes(original), target))

    refused: list[str] = []

    def accept(candidate: Any) -> bool:
        """The class built from ``candidate`` takes the result's weights and computes what the result does."""
        try:
            if callable(getattr(candidate, "validate", None)):
                candidate.validate()  # the checks save_pretrained makes (hidden size a multiple of the heads)
            with frozen_mode(model):  # compared in eval mode; the result keeps the mode the user's model had
                return _same_outputs(_rebuilt(cls, candidate, model), model, inputs)
        except Exception as exc:  # a config that builds on meta may still fail to validate, load or run
            logger.debug("config candidate rejected: %s", exc)
            refused.append(f"{type(exc).__name__}: {exc}".splitlines()[-1].strip())
            return False

    changes = _search(cls, config, target, options, accept)
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
