"""Pass infrastructure: small frozen dataclasses run by a Pipeline that checks before and after every pass.

Modelled on torch.fx's ``PassBase.call -> PassResult`` and onnx-ir's stricter contracts: a pass
receives a GraphModule it may replace (never the user's model: the Pipeline copies once), returns a
:class:`PassResult`, and the Pipeline

1. calls the pass's :meth:`Pass.requires` first (its preconditions on the model and the context),
2. runs :func:`fxmorph.check` on the result (lint, module consistency, shape replay, interface),
3. compares the outputs on the example inputs with the input's when the pass promises to keep the
   function (:meth:`Pass.promises_function`, from ``preserves_function``),
4. records what the pass did as a :class:`PassRecord`.

Any failure is raised as :class:`~fxmorph.errors.PassError` naming the pass and the passes that ran
before it, with the underlying error as its cause.
"""

from __future__ import annotations

import abc
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.plan import WidthPlan
from fxmorph.capture.counting import count_params
from fxmorph.capture.trace import propagate_shapes
from fxmorph.check import check
from fxmorph.errors import FxmorphError, PassError
from fxmorph.meta import FLOPS_KEY, INTERFACE_KEY
from fxmorph.validate import frozen_mode

__all__ = [
    "Pass",
    "PassContext",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "equivalence_bound",
    "precision_bound",
]

logger = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What passes may read besides the model: example inputs, data, a loss, a seed, options."""

    example_inputs: tuple[Any, ...]
    data: Iterable[Any] | None = None
    loss_fn: Callable[..., Any] | None = None
    seed: int = 0
    frozen_groups: frozenset[str] = frozenset()
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PassResult:
    """The model after a pass, whether it changed, per group ``(width before, width after)``, and the
    WidthPlan the pass applied (in the group ids of the model the pass received)."""

    gm: fx.GraphModule
    modified: bool
    changes: dict[int, tuple[int, int]] = field(default_factory=dict)
    note: str = ""
    plan: WidthPlan | None = None


@dataclass(frozen=True)
class PassRecord:
    """What one pass of a :class:`Pipeline` did.

    ``changes``: per group, its width before and after; ``kept``: per group that lost channels, the
    indices it kept (both in the group ids of the model the pass received), so that the result can be
    checked against the mask oracle. FLOPs are the counts recorded at capture (None for a model fxmorph
    did not trace). ``difference``: the largest change of the outputs on the example inputs that the
    Pipeline measured (relative, see :func:`equivalence_bound`), or None where the pass did not promise
    the function or changed nothing.

    Readers written for the dictionaries the Pipeline used to record may still index a record by the old
    keys (``record["pass"]`` is its ``name``); :meth:`to_dict` gives that dictionary, for JSON.
    """

    name: str
    modified: bool
    seconds: float
    changes: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    note: str = ""
    kept: Mapping[int, list[int]] = field(default_factory=dict)
    flops_before: int | None = None
    flops_after: int | None = None
    params_before: int = 0
    params_after: int = 0
    difference: float | None = None

    def __getitem__(self, key: str) -> Any:
        """The field ``key`` (``"pass"`` for ``name``), as the old dictionary records were read."""
        if key == "pass":
            return self.name
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """:meth:`__getitem__`, or ``default`` for an unknown key."""
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the pass's name under ``"pass"``, as reports have always written it)."""
        out: dict[str, Any] = {"pass": self.name}
        out.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k != "name"})
        out["changes"] = {g: list(widths) for g, widths in self.changes.items()}
        out["kept"] = {g: list(keep) for g, keep in self.kept.items()}
        return out


class Pass(abc.ABC):
    """Base of every pass: subclasses are frozen dataclasses with a kebab-case ``name``.

    ``preserves_function`` says whether the output equals the input's on every input (under the
    conditions the pass's docstring states; :meth:`promises_function` narrows it to this instance and
    context, and the Pipeline checks that promise). ``requires`` checks the preconditions, ``call``
    does the work; ``__call__`` runs both and enforces the result type.

    A pass that promises the function and changes the model returns a new GraphModule (surgery builds
    one; never write to the model received), so that the Pipeline can compare the two.
    """

    name: ClassVar[str]
    preserves_function: ClassVar[bool]

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise an :class:`~fxmorph.errors.FxmorphError` that says what is missing when the pass cannot
        run on ``gm`` with ``ctx`` (an :class:`~fxmorph.errors.InputError` for what the user passed, a
        :class:`~fxmorph.errors.BudgetError` for a budget out of reach). The Pipeline raises it as a
        :class:`PassError` naming the pass. The default requires nothing."""
        return None  # a hook, not abstract: most passes need nothing beyond their fields

    def promises_function(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        """Whether the outputs on ``ctx.example_inputs`` (in eval mode) stay those of ``gm`` through this
        pass, so that the Pipeline checks them. The default is the class's ``preserves_function``; a pass
        exact only under a condition it knows (a setting, the data it was calibrated on) narrows it."""
        return type(self).preserves_function

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run the pass on ``gm`` (which it may replace); return the result."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.requires(gm, ctx)
        return _checked_call(self, gm, ctx)

    @staticmethod
    def analyse(gm: fx.GraphModule) -> ChannelGraph:
        """The channel graph of ``gm`` (whose shapes the Pipeline keeps up to date)."""
        return build_channel_graph(gm)


def _checked_call(p: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = p.call(gm, ctx)
    if not isinstance(result, PassResult):
        raise PassError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult (pass developer)")
    return result


@dataclass
class PipelineResult:
    """Output of a :class:`Pipeline`: the model and one :class:`PassRecord` per pass."""

    gm: fx.GraphModule
    records: list[PassRecord]


def _kept(result: PassResult) -> dict[int, list[int]]:
    """Per group that lost channels, the indices it kept (in the group ids of the model the pass
    received): what removed which channels, so the result can be checked against the mask oracle."""
    if result.plan is None:
        return {}
    plan = result.plan
    return {
        g: [int(i) for i in plan[g].keep]
        for g, (before, after) in result.changes.items()
        if after < before and g in plan
    }


# -- the equivalence check ---------------------------------------------------------------------------------
_LOW_PRECISION_EPS = 16
"""The bound in float16 and bfloat16, in machine epsilons. Kernels accumulate those dtypes in float32, so
an exact rewrite's error is the rounding of each layer's output to the dtype: remove-dead, factorize and
merge-factors on resnet18 and mobilenet_v3_small measured 1 to 2 eps even relative to the largest output
alone (float16 up to 1.0e-3, bfloat16 up to 1.3e-2). 16 eps (1.6e-2 and 0.125) leaves 8x headroom for
deeper models; such dtypes cannot tell a smaller bug from rounding anyway."""

_TF32_EPS = 2.0**-10
"""TF32 keeps float16's 10 mantissa bits: float32 models on CUDA are bounded as float16 ones where it is on."""

_BOUNDS = {torch.float64: 1e-9, torch.float32: 1e-4}
"""The bound in float64 and float32, which accumulate in their own dtype, so the error grows with the
layers' fan-in: the same rewrites measured up to 1.4e-6 in float32 (about 12 eps) and 1.3e-14 in float64.
1e-4 is 70x that and the bound :class:`~fxmorph.passes.grow.GrowPass` checks itself against; 1e-9 is 1e5
times the float64 figure."""


def equivalence_bound(dtype: torch.dtype) -> float:
    """The largest relative change of the outputs the Pipeline accepts from a pass that promises the
    function, for a model computing in ``dtype``. Relative means ``max |after - before|`` over
    ``max(max |before|, 1)`` per output tensor: rounding errors scale with the activations inside the
    network, which normalisation keeps near 1 even when an output is tiny, so outputs below 1 are
    compared absolutely (the convention of :class:`~fxmorph.passes.grow.GrowPass`'s own check)."""
    if dtype in _BOUNDS:
        return _BOUNDS[dtype]
    return _LOW_PRECISION_EPS * torch.finfo(dtype).eps


def eval_outputs(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> list[Any]:
    """The flattened outputs of ``gm`` on ``inputs``, in eval mode (nothing is written to ``gm``)."""
    with frozen_mode(gm), torch.no_grad():
        return tree_flatten(gm(*inputs))[0]


def _floating(values: Iterable[Any]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _tf32(model: nn.Module) -> bool:
    """Whether float32 convolutions or matmuls of ``model`` may run in TF32 (on CUDA: 10 mantissa bits,
    the precision of float16), under either of torch's switches for it."""
    if not any(t.is_cuda for t in model.parameters()):
        return False
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    legacy = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    return legacy or "tf32" in (conv, matmul)


def precision_bound(model: nn.Module, outputs: Iterable[Any] = ()) -> tuple[str, float]:
    """The precision ``model`` computes in (its least precise floating dtype among parameters, buffers and
    ``outputs``; ``"tf32"`` for float32 where CUDA may use TF32) and the bound of
    :func:`equivalence_bound` for it."""
    tensors = [*_floating(model.parameters()), *_floating(model.buffers()), *_floating(outputs)]
    dtype = max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).eps, default=torch.float32)
    if dtype == torch.float32 and _tf32(model):
        return "tf32", _LOW_PRECISION_EPS * _TF32_EPS
    return str(dtype).removeprefix("torch."), equivalence_bound(dtype)


def relative_change(before: list[Any], after: list[Any]) -> float:
    """The largest relative change over the floating outputs (see :func:`equivalence_bound`). Positions
    where ``before`` is not finite are not compared; a change of shape or count is infinite."""
    old, new = _floating(before), _floating(after)
    if len(old) != len(new):
        return math.inf
    worst = 0.0
    for a, b in zip(old, new, strict=True):
        if a.shape != b.shape:
            return math.inf
        finite = torch.isfinite(a)
        if not finite.any():
            continue
        a64, b64 = a.double(), b.double()
        gap = torch.where(finite, (a64 - b64).abs(), 0.0).nan_to_num(nan=math.inf)
        scale = max(float(a64[finite].abs().max()), 1.0)
        worst = max(worst, float(gap.max()) / scale)
    return worst


def _failed(p: Pass, done: list[str]) -> str:
    return f"pass '{p.name}' failed after {done}"


@dataclass(frozen=True)
class Pipeline:
    """Run passes in order on a copy of the model, checking the model before and after every pass.

    Before a pass, its :meth:`Pass.requires`. After a pass that changed the model, ``check_each`` runs
    :func:`fxmorph.check` (lint, module consistency, shape replay, unchanged interface); either way the
    shape metadata the next pass reads is refreshed. ``check_function`` compares the outputs on the
    example inputs with the input's after every pass that changed the model and promises its function
    (one forward of each model, and the output of one check is the reference of the next). A pass that
    changed nothing is not re-checked.
    """

    passes: Sequence[Pass]
    check_each: bool = True
    check_function: bool = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext, *, copy_model: bool = True) -> PipelineResult:
        if copy_model:
            gm = copy.deepcopy(gm)
        interface = gm.meta.get(INTERFACE_KEY)
        done: list[str] = []
        records: list[PassRecord] = []
        # The outputs of the last model compared, by identity: the reference of the next comparison.
        reference: tuple[fx.GraphModule, list[Any]] | None = None
        for p in self.passes:
            start = time.perf_counter()
            try:
                p.requires(gm, ctx)
            except FxmorphError as exc:
                raise PassError(f"pass '{p.name}' cannot run after {done}: {exc}") from exc
            promised = self.check_function and p.promises_function(gm, ctx)
            totals = gm.meta.get(FLOPS_KEY), count_params(gm)  # before a pass that may work in place
            result = self._run(p, gm, ctx, interface, done)
            difference = None
            if result.gm is not gm or result.modified:
                if promised:
                    after, difference = self._compare(p, done, gm, result.gm, ctx, reference)
                    reference = (result.gm, after)
                else:
                    reference = None  # the model changed: the outputs held are no one's any more
            records.append(self._record(p, result, totals, time.perf_counter() - start, difference))
            gm = result.gm
            gm.meta[INTERFACE_KEY] = interface
            done.append(p.name)
            logger.info("pass %s: modified=%s %s", p.name, result.modified, result.note)
        return PipelineResult(gm, records)

    def _run(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, interface: Any, done: list[str]) -> PassResult:
        """The pass's result, checked; any failure as a PassError naming the pass and those before it."""
        try:
            result = _checked_call(p, gm, ctx)
            if result.gm is not gm or result.modified:
                self._refresh(result.gm, ctx, interface)
        except FxmorphError as exc:
            raise PassError(f"{_failed(p, done)}: {exc}") from exc
        except Exception as exc:
            raise PassError(f"{_failed(p, done)}: {type(exc).__name__}: {exc}") from exc
        return result

    @staticmethod
    def _compare(
        p: Pass,
        done: list[str],
        old: fx.GraphModule,
        new: fx.GraphModule,
        ctx: PassContext,
        reference: tuple[fx.GraphModule, list[Any]] | None,
    ) -> tuple[list[Any], float]:
        """The outputs of ``new`` and their relative change from ``old``'s; a PassError when the change is
        more than rounding allows."""
        if new is old:
            raise PassError(
                f"{_failed(p, done)}: it promises the model's function but changed the model it received in "
                "place, so there is nothing to compare with: return a new GraphModule (pass developer)."
            )
        # The input model is intact (a pass never writes to it), so its outputs can be taken now.
        known = reference is not None and reference[0] is old
        before = reference[1] if known and reference is not None else eval_outputs(old, ctx.example_inputs)
        after = eval_outputs(new, ctx.example_inputs)
        difference = relative_change(before, after)
        precision, bound = precision_bound(new, after)
        if not difference <= bound:  # written so that NaN fails too
            raise PassError(
                f"{_failed(p, done)}: it promises the model's function, but its outputs on the example inputs "
                f"changed by {difference:.2e} (relative, eval mode), above the {bound:.0e} that {precision} rounding "
                "allows. This is a bug in fxmorph: please report it with the model."
            )
        return after, difference

    @staticmethod
    def _record(
        p: Pass, result: PassResult, totals: tuple[int | None, int], seconds: float, difference: float | None
    ) -> PassRecord:
        flops, params = totals
        return PassRecord(
            name=p.name,
            modified=result.modified,
            seconds=seconds,
            changes=result.changes,
            note=result.note,
            kept=_kept(result),
            flops_before=flops,
            flops_after=result.gm.meta.get(FLOPS_KEY),
            params_before=params,
            params_after=count_params(result.gm),
            difference=difference,
        )

    def _refresh(self, gm: fx.GraphModule, ctx: PassContext, interface: Any) -> None:
        """Check the model (or at least refresh its shape metadata, which the next pass reads)."""
        if self.check_each:
            check(gm, ctx.example_inputs, expected_interface=interface, reanalyze=False)
        else:
            with frozen_mode(gm):
                propagate_shapes(gm, ctx.example_inputs)
