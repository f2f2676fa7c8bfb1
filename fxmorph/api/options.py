"""The options users name at the API (and the CLI's flags mirror): their types and defaults, in one place.

The passes own what the options mean; this module is where the layers above (``api`` itself, ``io``,
the CLI) read them, so none of them reaches into a pass module for a default.
"""

from __future__ import annotations

from fxmorph.passes.rounding import AUTO, RoundTo
from fxmorph.passes.select import DEFAULT_MAX_PRUNE, DEFAULT_ROUND_TO

__all__ = ["AUTO", "DEFAULT_MAX_PRUNE", "DEFAULT_ROUND_TO", "RoundTo"]
