"""Which widths a group may take: the rounding grid, and the ``"auto"`` policy that chooses one.

onnxruntime's CPU convolutions work on blocks of 16 channels on AVX-512 machines (8 on AVX2), so a
width off that grid pays for a whole block anyway and for layout changes: rounding to 16 is what makes
a FLOPs cut show up as latency (see :data:`BLOCK`). But a block is larger than the layers of small
models: LeNet-5's 20-channel convolution could only stay at 20 or go to 16, so 25x fewer FLOPs was out
of reach. ``round_to="auto"`` (the default) therefore tries grids from the fastest to the finest and
takes the first one under which the budget can be reached (:data:`AUTO_GRIDS`):

1. multiples of 16 for every group (groups narrower than 16 keep their width);
2. multiples of 16 for groups of at least 64 channels, where blocks pay; narrower groups take steps
   of a power of two, a quarter of their width or less (20 channels: steps of 4; 50: steps of 8);
3. any width.

A step counts the channels of the axis that holds a group (:meth:`Grid.step`): a group of whole attention heads
steps by heads, and a group one axis holds several times (torchvision's ViT holds its embedding group once per
head in the residual stream: ``Group.copies``) by the fewest elements that fill whole steps there.

An integer ``round_to`` is one fixed grid (1 lands within 1% of any budget). The report says which
grid was used (:meth:`Grid.describe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["AUTO", "AUTO_GRIDS", "BLOCK", "Grid", "RoundTo", "as_grid", "check_round_to"]

AUTO: Literal["auto"] = "auto"
RoundTo = int | Literal["auto"]
"""What users pass as ``round_to``: a width multiple, or ``"auto"``."""

BLOCK = 16
"""onnxruntime's CPU channel block. On the project's AVX-512 machine, rounding to 8 instead of 16 left
regnet_x_400mf at 0.98 of its latency at half the FLOPs (0.69 with 16) and mobilenet_v2 at 0.90
(0.66); ``benchmarks/RESULTS.md`` holds the figures."""

WIDE = 4 * BLOCK
"""Groups at least this wide keep blocks of 16 on the second auto grid: below four blocks, one block
is a quarter of the group or more, too coarse a step for a small model's budget."""


@dataclass(frozen=True)
class Grid:
    """Allowed width steps: ``block`` for groups of at least ``fine_below`` channels, finer below.

    With ``fine_below = 0`` every group steps by ``block`` and a group narrower than ``block`` keeps
    its width. A group narrower than ``fine_below`` steps by the largest power of two that is at most a
    quarter of its width (and at most ``block``), so it can still shrink in at least four steps.
    """

    block: int
    fine_below: int = 0

    def step(self, size: int, span: int = 1, copies: int = 1) -> int:
        """The width step of a group of ``size`` elements of ``span`` channels each (whole attention heads are
        elements of their head width), held ``copies`` times by one axis: the grid's step in channels, as a whole
        number of elements."""
        channels = size * span * copies
        if channels >= self.fine_below:
            step = self.block
        else:
            quarter = channels // 4
            # The largest power of two <= channels // 4 (1 for groups of fewer than 8 channels).
            step = min(self.block, 1 << (quarter.bit_length() - 1)) if quarter else 1
        if copies > 1:
            # An element is span * copies channels of the axis that holds the copies (a residual stream of
            # 12 heads: 12 channels), so the fewest elements whose channels fill whole steps: 4 for 12 and 16.
            return step // math.gcd(step, span * copies)
        return -(-step // span)  # whole elements: a head of 16 channels or more is a step of its own

    def describe(self) -> str:
        """How widths were rounded, for reports."""
        if self.block == 1:
            return "any width (round_to=1)"
        if not self.fine_below:
            return f"multiples of {self.block} (narrower groups keep their width)"
        return (
            f"multiples of {self.block} for groups of {self.fine_below}+ channels; narrower groups in steps of a "
            "power of two, at most a quarter of their width"
        )


AUTO_GRIDS: tuple[Grid, ...] = (Grid(BLOCK), Grid(BLOCK, WIDE), Grid(1))
"""The grids ``round_to="auto"`` tries, fastest first; the first that reaches the budget is used."""


def as_grid(round_to: RoundTo | Grid) -> Grid:
    """The grid of a ``round_to`` value; ``"auto"`` alone (no budget to reach) is the fastest grid."""
    if isinstance(round_to, Grid):
        return round_to
    return AUTO_GRIDS[0] if round_to == AUTO else Grid(int(round_to))


def check_round_to(value: object) -> bool:
    """Whether ``value`` is a valid ``round_to``: ``"auto"`` or a positive int (not a bool)."""
    if isinstance(value, str):
        return value == AUTO
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
