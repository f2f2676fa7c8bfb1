"""Hand a result back as the user's own class where it is proven equal to the graph surgery made.

Every entry point computes its result as a ``torch.fx.GraphModule`` (where fxmorph reasons and checks) and
ends here: :func:`deliver` writes it back into a copy of the user's model
(:func:`~fxmorph.surgery.write_back.write_back`, which proves the copy's graph is the result's) and returns
that copy, carrying the result's metadata under :data:`~fxmorph.meta.META_ATTR`. ``keep_class`` decides what
happens when the proof fails: ``None`` returns the GraphModule with a :class:`~fxmorph.errors.WriteBackWarning`
that names the line, ``True`` raises the :class:`~fxmorph.errors.WriteBackError`, ``False`` never tries.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import fx, nn

from fxmorph.capture.export import probe_inputs
from fxmorph.errors import WriteBackError, WriteBackWarning
from fxmorph.meta import CONFIG_SIZES_KEY, META_ATTR
from fxmorph.surgery.config import restate_config
from fxmorph.surgery.write_back import write_back

__all__ = ["Delivery", "deliver"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """How a result came back: as the user's class or a GraphModule, why, and what write-back set."""

    kept_class: bool
    class_name: str
    """The class of the returned model (the user's, or ``GraphModule``)."""
    reason: str | None = None
    """Why the result is a GraphModule (``None`` when it is the user's class)."""
    attributes: tuple[str, ...] = ()
    """Integer attributes of the user's modules set to the new widths (``path.name: old -> new``)."""
    seconds: float = 0.0
    config: tuple[str, ...] = ()
    """Fields of the model's ``config`` set to the new widths (``name: old -> new``)."""
    config_note: str | None = None
    """Why a model with a ``config`` kept it as it was: the class built from no config holds the result."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    def describe(self) -> str:
        """One line for reports."""
        if self.kept_class:
            shown = ", ".join(self.attributes[:3])  # the rest are in ``attributes`` (a ViT sets one, a Swin dozens)
            more = f" and {len(self.attributes) - 3} more" if len(self.attributes) > 3 else ""
            extra = f"; set {shown}{more}" if self.attributes else ""
            config = f"; config {', '.join(self.config)}" if self.config else ""
            stale = f"; config left as it was: {self.config_note}" if self.config_note else ""
            return f"returned as {self.class_name} (proven equal to the graph{extra}{config}{stale})"
        return f"returned as a torch.fx.GraphModule: {self.reason}"


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _user_level() -> int:
    """The ``stacklevel`` that points a warning raised in :func:`deliver` at the user's line: the first frame
    outside the fxmorph package (entry points reach ``deliver`` through one or two of their own frames)."""
    frame, level = sys._getframe(1), 1  # the frame of deliver, which calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def deliver(
    model: nn.Module,
    result: fx.GraphModule,
    *,
    keep_class: bool | None,
    leaf_modules: Iterable[type | str] = (),
    entry: str = "shrink",
) -> tuple[nn.Module, Delivery]:
    """``result`` as a copy of ``model``'s class when write-back proves the two equal (see the module doc)."""
    if keep_class is False:
        return result, Delivery(False, type(result).__name__, "keep_class=False")
    start = time.perf_counter()
    try:
        written = write_back(model, result, leaf_modules)
    except WriteBackError as exc:
        if keep_class:
            raise
        warnings.warn(
            f"{entry}: {exc} Returning a torch.fx.GraphModule instead.", WriteBackWarning, stacklevel=_user_level()
        )
        return result, Delivery(False, type(result).__name__, str(exc), seconds=time.perf_counter() - start)
    # the metadata a GraphModule result holds in ``meta``: the same dict object, so a report filled in later
    # shows in both
    setattr(written.model, META_ATTR, result.meta)
    update = restate_config(written.model, model, probe_inputs(result), result.meta.get(CONFIG_SIZES_KEY))
    if update is not None and update.reason is not None:
        # the class is right, but its config would rebuild the old widths: save_pretrained would not load back
        warnings.warn(f"{entry}: config left as it was: {update.reason}", WriteBackWarning, stacklevel=_user_level())
    delivery = Delivery(
        True,
        type(model).__name__,
        attributes=tuple(change.describe() for change in written.attributes),
        seconds=time.perf_counter() - start,
        config=update.changes if update else (),
        config_note=update.reason if update else None,
    )
    logger.info("%s: %s in %.2f s", entry, delivery.describe(), delivery.seconds)
    return written.model, delivery
