"""Turn chosen widths and channel scores into a WidthPlan (keep the best-scored channels)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.plan import GroupPlan, WidthPlan

__all__ = ["keep_best"]


def keep_best(cg: ChannelGraph, widths: np.ndarray, scores: Mapping[int, np.ndarray]) -> WidthPlan:
    """Per group whose width drops, keep its ``widths[g]`` highest-scored channels (in original order)."""
    plans = {}
    for g, score in scores.items():
        width = int(widths[g])
        if width < cg.groups[g].size:
            top = np.argsort(-score, kind="stable")[:width]
            plans[g] = GroupPlan(tuple(sorted(int(i) for i in top)))
    return WidthPlan(plans)
