"""The reports of shrink, grow and morph: what changed, what could not, and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fxmorph.api.deliver import Delivery
from fxmorph.api.latency_budget import LatencyOutcome
from fxmorph.api.training import EpochLog
from fxmorph.passes.base import PassRecord

__all__ = ["GroupRow", "GrowReport", "MorphReport", "MorphStage", "ShrinkReport"]


_CAPTURES = {
    "fx": "symbolic tracing (torch.fx)",
    "export": "torch.export, its ATen ops read as torch calls",
    "regions": "regions (the submodules that capture; FLOPs outside them a fixed cost)",
}


@dataclass(frozen=True)
class GroupRow:
    """One channel group: who makes it, its width before and after, and why it is pinned (if it is)."""

    id: int
    made_by: str
    before: int
    after: int
    pinned: str | None


@dataclass
class ShrinkReport:
    """Everything :func:`fxmorph.shrink` did, as numbers (``to_dict``) and as text (``table``)."""

    budget_flops: int
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seconds: float
    groups: list[GroupRow] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    dropped_modules: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    delivery: Delivery | None = None
    """Whether the result came back as the user's class (and why not)."""
    capture: str = "fx"
    """How the model was captured: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``) or ``"regions"``."""
    regions: tuple[str, ...] = ()
    """For a model captured in regions: each region and each module left opaque, with why."""
    latency: LatencyOutcome | None = None
    """For a latency budget: the runtime, the measured latency before and after, and each round's prediction and
    measurement."""

    @property
    def macs_before(self) -> int:
        """Multiply-accumulates before (half the FLOPs)."""
        return self.flops_before // 2

    @property
    def macs_after(self) -> int:
        """Multiply-accumulates after."""
        return self.flops_after // 2

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / FLOPs before."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        out = asdict(self)
        out["passes"] = [p.to_dict() for p in self.passes]  # each under its "pass" name, as always
        out.update(macs_before=self.macs_before, macs_after=self.macs_after, flops_ratio=self.flops_ratio)
        return out

    def table(self, *, changed_only: bool = True) -> str:
        """A readable summary: totals, then one line per group."""
        # a latency budget alone leaves the FLOPs budget at the model's own FLOPs: no FLOPs budget to state
        flops_budget = self.latency is None or self.budget_flops < self.flops_before
        budget = f", budget {self.budget_flops / 1e9:.3f} G" if flops_budget else ""
        lines = [
            f"FLOPs   {self.flops_before / 1e9:9.3f} G -> {self.flops_after / 1e9:9.3f} G "
            f"({100 * self.flops_ratio:.1f}%{budget})",
            f"MACs    {self.macs_before / 1e9:9.3f} G -> {self.macs_after / 1e9:9.3f} G",
            f"params  {self.params_before / 1e6:9.3f} M -> {self.params_after / 1e6:9.3f} M",
            f"time    {self.seconds:.2f} s ({', '.join(p.name for p in self.passes)})",
        ]
        if self.latency is not None:
            lines += self.latency.describe()
        if "rounding" in self.settings:
            lines.append(f"widths  {self.settings['rounding']}")
        lines.append(f"capture {_CAPTURES.get(self.capture, self.capture)}")
        lines += [f"        {line}" for line in self.regions]
        if self.delivery is not None:
            lines.append(f"result  {self.delivery.describe()}")
        if self.dropped_modules:
            lines.append(
                "dropped (never run in eval mode, so not in the shrunk model): " + ", ".join(self.dropped_modules)
            )
        rows = [r for r in self.groups if r.before != r.after or not changed_only]
        width = max((len(r.made_by) for r in rows), default=10)
        lines.append(f"\n{'group':>5}  {'made by':<{width}}  {'before':>6}  {'after':>6}  pinned because")
        for r in rows:
            lines.append(f"{r.id:>5}  {r.made_by:<{width}}  {r.before:>6}  {r.after:>6}  {r.pinned or ''}")
        pinned = sum(1 for r in self.groups if r.pinned)
        changed = sum(1 for r in self.groups if r.before != r.after)
        gone = sum(1 for r in self.groups if r.after == 0)
        removed = f" ({gone} to width 0, removed with the ops that computed them)" if gone else ""
        lines.append(f"{len(self.groups)} groups: {changed} changed{removed}, {pinned} pinned")
        return "\n".join(lines)


@dataclass
class GrowReport:
    """What :func:`fxmorph.grow` did: totals, per grown group ``(id, made_by, before, after, init,
    note)``, skipped groups with the reason, and the largest output change it measured (relative)."""

    budget_flops: int | None
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seconds: float
    groups: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    max_difference: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    delivery: Delivery | None = None
    """Whether the result came back as the user's class (and why not)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    def table(self) -> str:
        """A readable summary: totals, then one line per grown group."""
        lines = [
            f"FLOPs {self.flops_before:,} -> {self.flops_after:,}, params {self.params_before:,} -> "
            f"{self.params_after:,}, {len(self.groups)} groups grown, {len(self.skipped)} skipped, "
            f"max output change {self.max_difference:.1e} ({self.seconds:.1f} s)"
        ]
        if self.delivery is not None:
            lines.append(f"  result {self.delivery.describe()}")
        for row in self.groups:
            note = f"  ({row['note']})" if row["note"] else ""
            lines.append(
                f"  group {row['id']:4d} {row['made_by'][:50]:50s} {row['before']:6d} -> {row['after']:6d}"
                f"  {row['init']}{note}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class MorphStage:
    """The model after one stage: FLOPs, parameters, the metric from ``evaluate`` (None without it),
    and the width of every free channel group, keyed by the modules that make it."""

    name: str
    flops: int
    params: int
    metric: float | None
    widths: dict[str, int]


@dataclass
class MorphReport:
    """What :func:`fxmorph.morph` did: the budget, one :class:`MorphStage` per stage (``original``, ``trained``,
    ``dead removed``, ``resized``, ``fine-tuned``), dead channels removed, per-epoch losses, settings."""

    budget_flops: int
    stages: list[MorphStage] = field(default_factory=list)
    dead_channels: int = 0
    history: list[EpochLog] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    delivery: Delivery | None = None
    """Whether the result came back as the user's class (and why not)."""

    def stage(self, name: str) -> MorphStage:
        """The stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage '{name}': {[s.name for s in self.stages]}")

    @property
    def flops_before(self) -> int:
        """FLOPs of the user's model."""
        return self.stages[0].flops

    @property
    def flops_after(self) -> int:
        """FLOPs of the returned model."""
        return self.stages[-1].flops

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    def table(self) -> str:
        """A readable summary: one line per stage (FLOPs, share of the original, params, metric)."""
        lines = [
            f"morph to {self.budget_flops:,} FLOPs ({self.budget_flops / self.flops_before:.1%} of the model): "
            f"{self.dead_channels} dead channels removed, {self.seconds:.1f} s"
        ]
        for s in self.stages:
            metric = "" if s.metric is None else f"  metric {s.metric:.4f}"
            lines.append(
                f"  {s.name:13s} FLOPs {s.flops:>14,} ({s.flops / self.flops_before:6.1%})  "
                f"params {s.params:>12,}{metric}"
            )
        if self.delivery is not None:
            lines.append(f"  result {self.delivery.describe()}")
        return "\n".join(lines)
