"""Repeated blocks: where a model repeats one kind of block, so that groups playing the same role in each can
keep one width (``shrink(..., uniform_blocks=True)``).

A repeated block is a child of a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``, or a
subclass) that has submodules of its own and shares its type with at least one sibling: ``layer3.1`` of a
torchvision ResNet (a ``Bottleneck`` in a ``Sequential`` of them), ``encoder.layers.encoder_layer_4`` of a
torchvision ViT, ``model.layers.7`` of a Hugging Face Llama. Two rules keep out what only looks repeated:
a child without submodules (``mlp.0`` and ``mlp.3``, two ``nn.Linear`` of one MLP) is a layer, not a block,
and a plain ``nn.Module`` is not a container (two attributes ``left`` and ``right`` of one type are two
blocks the user named apart).

The blocks are found on the user's model, whose container types the trace does not keep (a GraphModule's
intermediate modules are plain ``nn.Module``), and recorded in the GraphModule's metadata; a GraphModule
that fxmorph made carries them on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from torch import fx, nn

from fxmorph.meta import BLOCKS_KEY, CONTAINERS_KEY

__all__ = ["CONTAINERS", "block_pattern", "container_paths", "repeated_blocks"]

CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
"""Module types whose children are indexed blocks (by position or by key)."""


def repeated_blocks(model: nn.Module) -> tuple[str, ...]:
    """The module paths of ``model``'s repeated blocks (see the module docstring), in module order.

    A GraphModule that fxmorph traced answers from its metadata, since its own containers are plain modules.
    """
    if isinstance(model, fx.GraphModule) and BLOCKS_KEY in model.meta:
        return tuple(model.meta[BLOCKS_KEY])
    found: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, CONTAINERS):
            continue
        blocks = [(name, child) for name, child in module.named_children() if next(child.children(), None) is not None]
        kinds = Counter(type(child) for _, child in blocks)
        found += [f"{path}.{name}" if path else name for name, child in blocks if kinds[type(child)] > 1]
    return tuple(found)


def container_paths(model: nn.Module) -> tuple[str, ...]:
    """The module paths of ``model``'s containers (:data:`CONTAINERS`; ``""`` for the model itself), whose forward
    may run whatever they hold. A GraphModule that fxmorph traced answers from its metadata."""
    if isinstance(model, fx.GraphModule) and CONTAINERS_KEY in model.meta:
        return tuple(model.meta[CONTAINERS_KEY])
    return tuple(path for path, module in model.named_modules() if isinstance(module, CONTAINERS))


def block_pattern(name: str, blocks: Collection[str]) -> str:
    """``name`` (a parameter or module path) with the index of every repeated block it lies in written ``*``:
    ``layer3.4.conv1.weight`` -> ``layer3.*.conv1.weight`` when ``layer3.4`` is a repeated block."""
    parts = name.split(".")
    prefix = ""
    for k, part in enumerate(parts):
        prefix = f"{prefix}.{part}" if prefix else part  # the original path so far (never the pattern)
        if prefix in blocks:
            parts[k] = "*"
    return ".".join(parts)
