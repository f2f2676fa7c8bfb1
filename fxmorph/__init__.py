"""fxmorph: make trained PyTorch models physically smaller (or wider) to a budget you name."""

from fxmorph.analysis import ChannelGraph, Group, Pin
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.api.analyze import analyze, resize
from fxmorph.api.grow import GrowReport, grow
from fxmorph.api.morph import MorphReport, morph
from fxmorph.api.regularizer import FlopsRegularizer
from fxmorph.api.report import ShrinkReport
from fxmorph.api.shrink import shrink
from fxmorph.capture.counting import count_flops, count_macs, count_params
from fxmorph.capture.trace import trace
from fxmorph.check import check
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
    WriteBackError,
    WriteBackWarning,
)
from fxmorph.io.export import ExportError, ExportResult, export_onnx
from fxmorph.io.latency import LatencyReport, compare_latency, measure_latency
from fxmorph.io.latency_profile import OnnxRuntimeCPU  # registers runtime="onnxruntime"
from fxmorph.io.serialize import SerializationError, load, save
from fxmorph.meta import metadata
from fxmorph.surgery.apply import apply_plan

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
    "OnnxRuntimeCPU",
    "PassError",
    "Pin",
    "PlanError",
    "SerializationError",
    "ShrinkReport",
    "SurgeryError",
    "TraceError",
    "WidthPlan",
    "WriteBackError",
    "WriteBackWarning",
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
    "metadata",
    "morph",
    "resize",
    "save",
    "shrink",
    "trace",
]
