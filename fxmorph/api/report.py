"""The report of a shrink: what changed, what could not, and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GroupRow", "ShrinkReport"]


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
    passes: list[dict[str, Any]] = field(default_factory=list)
    dropped_modules: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

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
        out.update(macs_before=self.macs_before, macs_after=self.macs_after, flops_ratio=self.flops_ratio)
        return out

    def table(self, *, changed_only: bool = True) -> str:
        """A readable summary: totals, then one line per group."""
        lines = [
            f"FLOPs   {self.flops_before / 1e9:9.3f} G -> {self.flops_after / 1e9:9.3f} G "
            f"({100 * self.flops_ratio:.1f}%, budget {self.budget_flops / 1e9:.3f} G)",
            f"MACs    {self.macs_before / 1e9:9.3f} G -> {self.macs_after / 1e9:9.3f} G",
            f"params  {self.params_before / 1e6:9.3f} M -> {self.params_after / 1e6:9.3f} M",
            f"time    {self.seconds:.2f} s ({', '.join(p['pass'] for p in self.passes)})",
        ]
        if "rounding" in self.settings:
            lines.append(f"widths  {self.settings['rounding']}")
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
        lines.append(f"{len(self.groups)} groups: {changed} changed, {pinned} pinned")
        return "\n".join(lines)
