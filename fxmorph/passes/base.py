"""Pass infrastructure: small frozen dataclasses run by a Pipeline that checks after every pass.

Modelled on torch.fx's ``PassBase.call -> PassResult`` and onnx-ir's stricter contracts: a pass
receives a GraphModule it may replace (never the user's model: the Pipeline copies once), returns a
:class:`PassResult`, and the Pipeline runs :func:`fxmorph.check` after it. Any failure is raised as
:class:`~fxmorph.errors.PassError` naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import abc
import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import fx

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.analysis.plan import WidthPlan
from fxmorph.capture.trace import propagate_shapes
from fxmorph.check import check
from fxmorph.errors import FxmorphError, PassError
from fxmorph.meta import INTERFACE_KEY
from fxmorph.validate import frozen_mode

__all__ = ["Pass", "PassContext", "PassResult", "Pipeline", "PipelineResult"]

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


class Pass(abc.ABC):
    """Base of every pass: subclasses are frozen dataclasses with a kebab-case ``name``.

    ``preserves_function`` says whether the output equals the input's on every input (under the
    conditions the pass's docstring states). ``call`` does the work; ``__call__`` enforces the result
    type and wraps failures in :class:`PassError`.
    """

    name: ClassVar[str]
    preserves_function: ClassVar[bool]

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run the pass on ``gm`` (which it may replace); return the result."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = self.call(gm, ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{self.name}' returned {type(result).__name__}, not a PassResult (pass developer)")
        return result

    @staticmethod
    def analyse(gm: fx.GraphModule) -> ChannelGraph:
        """The channel graph of ``gm`` (whose shapes the Pipeline keeps up to date)."""
        return build_channel_graph(gm)


@dataclass
class PipelineResult:
    """Output of a :class:`Pipeline`: the model and one record per pass: name, modified, seconds,
    ``changes`` (per group, width before and after), note, and ``kept`` (per group that lost channels,
    the indices it kept, in the group ids of the model the pass received)."""

    gm: fx.GraphModule
    records: list[dict[str, Any]]


def _kept(result: PassResult) -> dict[int, list[int]]:
    """Per group that lost channels, the indices it kept (in the group ids of the model the pass
    received): what removed which channels, so the result can be checked against the mask oracle."""
    if result.plan is None:
        return {}
    return {g: [int(i) for i in result.plan[g].keep] for g, (before, after) in result.changes.items()
            if after < before and g in result.plan}  # fmt: skip


@dataclass(frozen=True)
class Pipeline:
    """Run passes in order on a copy of the model, checking the model after every pass.

    ``check_each`` runs :func:`fxmorph.check` (lint, module consistency, shape replay, unchanged
    interface) after every pass that changed the model; either way the shape metadata the next pass
    reads is refreshed. A pass that changed nothing is not re-checked.
    """

    passes: Sequence[Pass]
    check_each: bool = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext, *, copy_model: bool = True) -> PipelineResult:
        if copy_model:
            gm = copy.deepcopy(gm)
        interface = gm.meta.get(INTERFACE_KEY)
        done: list[str] = []
        records: list[dict[str, Any]] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(gm, ctx)
                if result.gm is not gm or result.modified:
                    self._refresh(result.gm, ctx, interface)
            except FxmorphError as exc:
                raise PassError(f"pass '{p.name}' failed after {done}: {exc}") from exc
            except Exception as exc:
                raise PassError(f"pass '{p.name}' failed after {done}: {type(exc).__name__}: {exc}") from exc
            gm = result.gm
            gm.meta[INTERFACE_KEY] = interface
            done.append(p.name)
            records.append({"pass": p.name, "modified": result.modified, "seconds": time.perf_counter() - start,
                            "changes": result.changes, "note": result.note, "kept": _kept(result)})  # fmt: skip
            logger.info("pass %s: modified=%s %s", p.name, result.modified, result.note)
        return PipelineResult(gm, records)

    def _refresh(self, gm: fx.GraphModule, ctx: PassContext, interface: Any) -> None:
        """Check the model (or at least refresh its shape metadata, which the next pass reads)."""
        if self.check_each:
            check(gm, ctx.example_inputs, expected_interface=interface, reanalyze=False)
        else:
            with frozen_mode(gm):
                propagate_shapes(gm, ctx.example_inputs)
