"""fxmorph: make trained PyTorch models physically smaller (or wider) to a budget you name."""

from fxmorph.analysis import ChannelGraph, Group, Pin
from fxmorph.api import analyze, resize
from fxmorph.check import check
from fxmorph.cost import CostModel
from fxmorph.counting import count_flops, count_macs, count_params
from fxmorph.errors import (
    AnalysisError,
    BudgetError,
    ConsistencyError,
    FxmorphError,
    InputError,
    PassError,
    PlanError,
    SurgeryError,
    TraceError,
)
from fxmorph.export import ExportError, ExportResult, export_onnx
from fxmorph.grow import GrowReport, grow
from fxmorph.latency import LatencyReport, compare_latency, measure_latency
from fxmorph.morph import MorphReport, morph
from fxmorph.plan import GroupPlan, WidthPlan
from fxmorph.regularizer import FlopsRegularizer
from fxmorph.report import ShrinkReport
from fxmorph.serialize import SerializationError, load, save
from fxmorph.shrink import shrink
from fxmorph.surgery.apply import apply_plan
from fxmorph.trace import trace

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "BudgetError",
    "ChannelGraph",
    "ConsistencyError",
    "CostModel",
    "ExportError",
    "ExportResult",
    "FlopsRegularizer",
    "FxmorphError",
    "Group",
    "GroupPlan",
    "GrowReport",
    "InputError",
    "LatencyReport",
    "MorphReport",
    "PassError",
    "Pin",
    "PlanError",
    "SerializationError",
    "ShrinkReport",
    "SurgeryError",
    "TraceError",
    "WidthPlan",
    "analyze",
    "apply_plan",
    "check",
    "compare_latency",
    "count_flops",
    "count_macs",
    "count_params",
    "export_onnx",
    "grow",
    "load",
    "measure_latency",
    "morph",
    "resize",
    "save",
    "shrink",
    "trace",
]
