"""Entry points on a model captured in regions (:mod:`fxmorph.capture.regions`): the inputs its bundle runs on,
and budgets that count the whole forward, the opaque code's FLOPs a fixed cost."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from fxmorph.errors import BudgetError, InputError
from fxmorph.meta import REGIONS_KEY

__all__ = ["bundle_inputs", "refuse_regions", "region_budget", "whole_flops"]


def bundle_inputs(
    gm: fx.GraphModule, inputs: tuple[Any, ...], data: Any = None, entry: str = "shrink"
) -> tuple[Any, ...]:
    """The inputs ``gm`` runs on: the model's, or for a bundle of regions the arguments its regions were called
    with (taken out of its metadata, which the result carries). Data batches are the whole model's inputs, which
    a bundle cannot run: with regions, ``data`` is refused."""
    record = gm.meta.get(REGIONS_KEY)
    if record is None:
        return inputs
    if data is not None:
        raise InputError(
            f"{entry}: data-driven criteria run the captured graph on batches of the model's inputs, but this model "
            f"was captured in regions ({', '.join(r.path for r in record.regions)}), whose graph takes their "
            "arguments instead: pass no data (the default criterion reads the weights), or shrink a submodule that "
            "captures whole."
        )
    gm.meta[REGIONS_KEY] = dataclasses.replace(record, inputs=())
    return record.inputs


def region_budget(gm: fx.GraphModule, budget: int) -> int:
    """The FLOPs the regions may keep under a ``budget`` for the whole forward (the opaque code's are fixed)."""
    record = gm.meta.get(REGIONS_KEY)
    if record is None:
        return budget
    left = budget - record.opaque_flops
    if left <= 0:
        raise BudgetError(
            f"budget {budget:,} FLOPs is below the {record.opaque_flops:,} FLOPs of the code outside the captured "
            "regions, which no width changes: raise the budget."
        )
    return left


def whole_flops(gm: fx.GraphModule, flops: int) -> int:
    """The FLOPs of the whole forward when ``gm``'s graph (or its bundle of regions) has ``flops``."""
    record = gm.meta.get(REGIONS_KEY)
    return flops if record is None else flops + record.opaque_flops


def refuse_regions(gm: fx.GraphModule, entry: str) -> None:
    """Entry points that train the captured graph (growth, morph) need the whole model in one graph."""
    record = gm.meta.get(REGIONS_KEY)
    if record is not None:
        raise InputError(
            f"{entry} trains the captured graph on the model's inputs, but this model captures only in regions "
            f"({', '.join(r.path for r in record.regions)}): {entry} a submodule that captures whole, or use "
            "fxmorph.shrink, which shrinks the regions."
        )
