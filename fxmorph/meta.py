"""Every metadata key fxmorph writes (``GraphModule.meta``), and typed access to the node metadata it relies on
(shapes and dtypes from shape propagation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = [
    "BLOCKS_KEY",
    "CAPTURE_KEY",
    "CONFIG_SIZES_KEY",
    "CONTAINERS_KEY",
    "DROP_KEY",
    "FACTORS_KEY",
    "FLOPS_KEY",
    "FOLDED_KEY",
    "GROW_KEY",
    "INTERFACE_KEY",
    "KEPT_MODULES_KEY",
    "META_ATTR",
    "MORPH_KEY",
    "REGIONS_KEY",
    "REMOVED_KEY",
    "REPORT_KEY",
    "TRAIN_READERS_KEY",
    "UNREACHED_KEY",
    "TensorInfo",
    "metadata",
    "node_info",
    "tensor_shape",
]

# Keys of ``GraphModule.meta``: every one fxmorph writes is here, so layers never spell one by hand.
UNREACHED_KEY = "fxmorph.unreached"
"""Top-most submodules with parameters that the traced graph never reaches (written by tracing)."""
TRAIN_READERS_KEY = "fxmorph.train_readers"
"""``{node name: module}``: values of the graph that modules running only in train mode read (written by
tracing when some module is unreached); the analysis pins their channels."""
BLOCKS_KEY = "fxmorph.blocks"
"""Module paths of the traced model's repeated blocks (written by tracing, see :mod:`fxmorph.capture.blocks`);
``uniform_blocks`` keeps the groups playing one role in each at one width."""
CONTAINERS_KEY = "fxmorph.containers"
"""Module paths of the traced model's containers (``Sequential``, ``ModuleList``, ``ModuleDict``; written by tracing,
see :func:`~fxmorph.capture.blocks.container_paths`): a module removed with a group is taken out of its container
by write-back, and selection removes only modules so held."""
KEPT_MODULES_KEY = "fxmorph.kept_modules"
"""Module paths that write-back was found by trial not to take out of the user's class
(:mod:`fxmorph.api.removals`): selection removes no group whose removal takes one."""
FOLDED_KEY = "fxmorph.folded_modules"
"""Paths of the modules that surgery replaced by a :class:`~fxmorph.surgery.constant.Constant` (a residual branch
left constant by a group removed whole): write-back puts the result's in their place."""
CONFIG_SIZES_KEY = "fxmorph.config_sizes"
"""The :class:`~fxmorph.capture.config_sizes.ConfigSizes` of a model with a configuration object (written by
tracing; absent without one): which config fields size which tensor dims, so that ``uniform_blocks`` keeps a
result its config can state."""
CAPTURE_KEY = "fxmorph.capture"
"""How the graph was captured: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, canonicalized) or
``"regions"`` (the submodules that capture, bundled: :mod:`fxmorph.capture.regions`)."""
REGIONS_KEY = "fxmorph.regions"
"""The :class:`~fxmorph.capture.regions.RegionCapture` of a graph captured in regions: its regions, the modules
left opaque and why, the FLOPs of the whole forward."""
FLOPS_KEY = "fxmorph.flops"
"""FLOPs of one run on the example inputs (written by shape propagation)."""
INTERFACE_KEY = "fxmorph.interface"
"""``(inputs, outputs)`` shapes and dtypes on the example inputs (written by shape propagation)."""
FACTORS_KEY = "fxmorph.factors"
"""``{path: {"rank": r, "full_rank": R}}`` for every layer split into ``path.0``, ``path.1`` (factorize)."""
GROW_KEY = "fxmorph.grow"
"""Growth's record: ``{"groups", "skipped", "max_difference"}`` from the grow pass, replaced by a
:class:`~fxmorph.api.report.GrowReport` in the result of :func:`fxmorph.grow`."""
DROP_KEY = "fxmorph.dropped_inputs"
"""``{"linear", "features", "kept", "constant", "unimportant"}`` (feature indices) of drop-inputs."""
REMOVED_KEY = "fxmorph.removed_modules"
"""Paths of the modules that surgery removed with groups removed whole (:mod:`fxmorph.analysis.removal`), the
top-most whose every call went: write-back takes them out of the user's class too."""
REPORT_KEY = "fxmorph.report"
"""The :class:`~fxmorph.api.report.ShrinkReport` of the shrink that made the model."""
MORPH_KEY = "fxmorph.morph"
"""The :class:`~fxmorph.api.report.MorphReport` of the morph that made the model."""

META_ATTR = "fxmorph_meta"
"""The attribute under which a result given back as the user's own class holds the metadata that a GraphModule
result holds in ``meta`` (the report, the FLOPs, ...)."""


def metadata(model: Any) -> dict[str, Any]:
    """The fxmorph metadata of a result: ``model.meta`` for a GraphModule, the dict under :data:`META_ATTR`
    for a result given back as the user's class (empty for a model fxmorph did not make)."""
    if isinstance(model, fx.GraphModule):
        return model.meta
    found = getattr(model, META_ATTR, None)
    return found if isinstance(found, dict) else {}


TensorInfo = Any  # torch.fx.passes.shape_prop.TensorMetadata, or a tuple/list of them


def node_info(node: fx.Node) -> TensorInfo | None:
    """Return the propagated tensor metadata of ``node`` (``None`` for non-tensor values)."""
    return node.meta.get("tensor_meta")


def tensor_shape(value: Any) -> tuple[int, ...] | None:
    """Shape of a node's tensor value, or ``None`` if the node (or value) is not a single tensor."""
    info = node_info(value) if isinstance(value, fx.Node) else value
    shape = getattr(info, "shape", None)
    if isinstance(shape, torch.Size):
        return tuple(int(s) for s in shape)
    return None
