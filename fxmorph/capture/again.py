"""Capture a model again the way a result's graph was captured: write-back's proof compares the two graphs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from fxmorph.capture.export import example_inputs, export_graph
from fxmorph.capture.regions import recapture_regions
from fxmorph.capture.symbolic import trace_graph
from fxmorph.meta import CAPTURE_KEY
from fxmorph.validate import frozen_mode

__all__ = ["capture_again"]


def capture_again(
    model: nn.Module, like: fx.GraphModule, leaf_modules: Sequence[type | str], *, stack_traces: bool = False
) -> fx.GraphModule:
    """``model`` captured the way ``like`` was (its :data:`~fxmorph.meta.CAPTURE_KEY`), without shape
    propagation: for comparing a written-back model with the graph it should be. ``stack_traces``: record each
    node's source lines (an exported graph always has them). Raises TraceError."""
    capture = like.meta.get(CAPTURE_KEY)
    if capture == "export":
        with frozen_mode(model):
            return export_graph(model, example_inputs(like))
    if capture == "regions":
        return recapture_regions(model, like, leaf_modules)
    return trace_graph(model, leaf_modules, stack_traces=stack_traces)
