"""Passes: policy that decides WidthPlans (remove-dead, prune, width, grow) and structural rewrites
(drop-inputs, factorize, merge-factors), run by a checked Pipeline."""

from fxmorph.passes.base import Pass, PassContext, PassRecord, PassResult, Pipeline, PipelineResult
from fxmorph.passes.drop_inputs import DropInputsPass
from fxmorph.passes.factorize import FactorizePass
from fxmorph.passes.grow import GrowPass
from fxmorph.passes.merge_factors import MergeFactorsPass
from fxmorph.passes.prune import PrunePass
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.passes.width import WidthPass

PASSES: dict[str, type[Pass]] = {
    p.name: p for p in (RemoveDeadPass, PrunePass, WidthPass, GrowPass, DropInputsPass, FactorizePass, MergeFactorsPass)
}
"""Every pass by its kebab-case name."""

__all__ = [
    "PASSES",
    "DropInputsPass",
    "FactorizePass",
    "GrowPass",
    "MergeFactorsPass",
    "Pass",
    "PassContext",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "PrunePass",
    "RemoveDeadPass",
    "WidthPass",
]
