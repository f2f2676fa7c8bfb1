"""Which fields of a model's configuration object size which tensor dims (Hugging Face's ``config``).

A model built from a config (``type(model)(config)``) is rebuilt from it by ``from_pretrained``, so a shrunk model
reloads only where its config can state every width. Which fields size which tensors is the class's business:
``hidden_size`` sizes BERT's residual stream and, through the head width it derives (``hidden_size /
num_attention_heads``), its query, key and value heads too; Llama states ``head_dim`` and sizes its heads by
``num_attention_heads``. Nothing here is specific to a family: each integer field is doubled (tripled where the
doubled config does not build) and the class is built from the changed config on the meta device (no memory
for weights, under a second for a 1 B parameter Llama); the tensor dims whose size changed are the ones that
field sizes.

The finding is recorded at trace time (:data:`fxmorph.meta.CONFIG_SIZES_KEY`), and ``uniform_blocks`` reads it
(:mod:`fxmorph.passes.uniform`): the groups one field sizes keep one width, and a group no field sizes keeps its
own, so that the config can state the result.

It also names the tensors the captured forward never reads that a field sizes: Wav2Vec2's ``masked_spec_embed``
(``hidden_size`` wide) is read only by SpecAugment's masking in train mode. Which channels of it go with which
group is unknown, so the analysis pins the groups that field sizes (a result that shrank them would fail in
``model.train()``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "ConfigSizes",
    "Shapes",
    "built_shapes",
    "config_of",
    "config_sizes",
    "int_fields",
    "shapes",
    "unread_tensors",
]

logger = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]
Axis = tuple[str, int]
"""A tensor of the model's state dict by name, and one of its dims."""

_FACTORS = (2, 3)
"""A field is probed at these multiples of its value, the first that builds: doubling keeps a size a multiple of
the counts that divide it (``hidden_size`` of the heads), but a doubled count may no longer divide its size (12
heads of a 36-wide stream: 24 do not divide 36, 36 do), so a second factor is tried."""


def config_of(model: nn.Module) -> Any:
    """The model's configuration object, where it has one the class can be built from (``to_dict``)."""
    config = getattr(model, "config", None)
    return config if config is not None and callable(getattr(config, "to_dict", None)) else None


def shapes(model: nn.Module) -> Shapes:
    """The shape of every tensor the model saves."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def built_shapes(cls: type, config: Any) -> Shapes | None:
    """The tensor shapes of ``cls(config)``, built on the meta device; None where the config is not valid."""
    try:
        with torch.device("meta"):
            return shapes(cls(config))
    except Exception as exc:  # any failure to build means: not this config
        logger.debug("config candidate rejected by %s: %s", cls.__name__, exc)
        return None


def int_fields(config: Any) -> dict[str, int]:
    """The config's positive integer fields (booleans are not sizes)."""
    fields = config.to_dict()
    return {k: v for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}


@dataclass(frozen=True)
class ConfigSizes:
    """The fields of a model's config that size each tensor dim of its state dict (see the module doc)."""

    class_name: str
    """The class the config builds (named in log lines and reasons)."""
    sized: Mapping[Axis, frozenset[str]]
    """``{(tensor name, dim): fields}`` for every dim some integer field sizes; a dim absent is sized by none."""
    unprobed: tuple[str, ...] = ()
    """Integer fields no multiple of which builds the class: what they size is unknown."""
    unread: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """``{field: tensor name}``: fields that size a tensor the captured forward never reads (one named each)."""

    def fields_of(self, name: str, dim: int) -> frozenset[str]:
        """The fields that size dim ``dim`` of tensor ``name`` (empty where none does)."""
        return self.sized.get((name, dim), frozenset())


def _changed_dims(before: Shapes, after: Shapes) -> list[Axis]:
    """The dims of ``before``'s tensors whose size ``after`` changed (tensors it lacks or reshapes ignored)."""
    found = []
    for name, shape in before.items():
        other = after.get(name)
        if other is not None and len(other) == len(shape):
            found += [(name, d) for d, (a, b) in enumerate(zip(shape, other, strict=True)) if a != b]
    return found


def unread_tensors(model: nn.Module, gm: fx.GraphModule) -> tuple[str, ...]:
    """The names of ``model``'s saved tensors that ``gm`` (its capture) never reads, by storage: a tensor under two
    names (a tied embedding and head) that the graph reads under one is read. The graph reads the tensors of its
    ``get_attr`` nodes that have users and those of the modules it calls."""
    read: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:  # an exported graph fetches every tensor, read or not
            value = _attribute(gm, str(node.target))
            if isinstance(value, torch.Tensor) and not value.is_meta:
                read.add(value.data_ptr())
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            read.update(t.data_ptr() for t in (*module.parameters(), *module.buffers()) if not t.is_meta)
    return tuple(name for name, t in model.state_dict().items() if t.numel() and t.data_ptr() not in read)


def _attribute(root: nn.Module, path: str) -> object:
    """The attribute at dotted ``path`` of ``root`` (None where there is none)."""
    value: object = root
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def config_sizes(model: nn.Module, unread: Collection[str] = ()) -> ConfigSizes | None:
    """What each integer field of ``model.config`` sizes (see the module doc), and which fields size one of the
    ``unread`` tensors; None for a model without a config, or one whose class does not build from its own config
    on the meta device."""
    config = config_of(model)
    if config is None:
        return None
    cls = type(model)
    base = built_shapes(cls, config)
    if base is None or base != shapes(model):
        # the class does not rebuild this model from its config: no field can be said to size anything
        logger.debug("%s does not rebuild from its config: its fields are not probed", cls.__name__)
        return None
    sized: dict[Axis, set[str]] = {}
    unprobed = []
    for field, value in int_fields(config).items():
        for factor in _FACTORS:
            probe = copy.deepcopy(config)
            setattr(probe, field, value * factor)
            after = built_shapes(cls, probe)
            if after is not None:
                for axis in _changed_dims(base, after):
                    sized.setdefault(axis, set()).add(field)
                break
        else:
            unprobed.append(field)
    found = {axis: frozenset(f) for axis, f in sized.items()}
    by_field = {field: name for (name, _), fields in sorted(found.items()) if name in unread for field in fields}
    return ConfigSizes(cls.__name__, found, tuple(unprobed), by_field)
