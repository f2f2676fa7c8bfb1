"""The exception hierarchy of fxmorph.

Every error a user can meet derives from :class:`FxmorphError`, carries a message that says what was
wrong and what to do, and is raised ``from`` the underlying cause so the full chain stays available.
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "BudgetError",
    "ConsistencyError",
    "FxmorphError",
    "InputError",
    "PassError",
    "PlanError",
    "SurgeryError",
    "TraceError",
    "WriteBackError",
    "WriteBackWarning",
]


class FxmorphError(Exception):
    """Base class of every error fxmorph raises on purpose."""


class InputError(FxmorphError, TypeError):
    """The caller passed something fxmorph cannot work with (wrong type, wrong inputs, bad dtype)."""


class TraceError(FxmorphError):
    """The model could not be traced to a torch.fx graph, or its example inputs do not run."""


class AnalysisError(FxmorphError):
    """The channel analysis met a graph it cannot describe (an internal invariant failed)."""


class PlanError(FxmorphError, ValueError):
    """A WidthPlan does not fit the channel graph it is applied to."""


class SurgeryError(FxmorphError):
    """Applying a WidthPlan failed."""


class ConsistencyError(FxmorphError):
    """The consistency checker found a model whose shapes, attributes or interface disagree."""


class BudgetError(FxmorphError, ValueError):
    """A FLOPs budget cannot be parsed, is out of range, or cannot be reached."""


class PassError(FxmorphError):
    """A pass failed, or left a model that fails the consistency check; names the pass and its predecessors."""


class WriteBackError(FxmorphError):
    """The result cannot be written back into the user's own model class and proven equal to the graph
    (``keep_class=True``); names the node, the source line where one is known, and why."""

    def __init__(self, message: str, *, line: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        """``file:line: `code``` of the user's line the failure points at, or None."""


class WriteBackWarning(UserWarning):
    """The result comes back as a ``torch.fx.GraphModule``, not the user's class; the message says why."""
