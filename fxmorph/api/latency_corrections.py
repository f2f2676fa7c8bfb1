"""How the rounds of a latency budget steer: from what the rounds so far predicted and measured, the calibration of
the next cut (:func:`next_scale`), and the round whose single measurement has stalled the rounds (:func:`stalled_end`).

Every function here works in shares of the original's measured time: a round's ``predicted`` share is what the
latency model calibrated on the original predicts for its cut, its ``measured`` share the runtime's ratio of the cut
to the original, and a round's ``scale`` the calibration its cut was selected under (a larger scale predicts every
cut slower, so the cut to the same aim is smaller and measures faster).
"""

from __future__ import annotations

import math

__all__ = ["corrected_aim", "next_scale", "stalled_end"]

GAMMA_MAX = 2.0
"""The largest power :func:`corrected_aim` fits: one round far under its prediction says little more."""


def next_scale(scales: list[float], predicted: list[float], measured: list[float], goal: float) -> float:
    """The calibration of the next cut, so that its measured latency lands on ``goal`` (every time here a share of
    the original's measured time). A larger scale predicts every cut slower, so the cut to the same aim is smaller
    and measures faster: interpolate between the closest rounds on either side of the goal, or, where all rounds
    fell on one side, correct the calibration of the round the goal lies furthest beyond by how far it missed
    (:func:`corrected_aim`).

    That round is the one predicted nearest the goal (the largest prediction where every round measured under it,
    the smallest where every round measured over), not the one measured nearest: the two are the same round wherever
    the measurements keep the model's order, and where they do not, one of them is wrong (a measurement on a busy
    machine, or tables timed through a slow spell), while every round agrees on the direction. Anchored on the round
    measured nearest, efficientnet_b0 at 30% trusted a first round that measured 25.6% of the original at a
    predicted 29.2%, over a second that measured 19.4% at 33.0%, and its last four rounds all measured 18 to 21%."""
    below = [k for k, m in enumerate(measured) if m <= goal]
    above = [k for k, m in enumerate(measured) if m > goal]
    if below and above:  # measured[hi] > goal >= measured[lo]: the two differ
        lo = max(below, key=lambda k: measured[k])
        hi = min(above, key=lambda k: measured[k])
        t = (goal - measured[lo]) / (measured[hi] - measured[lo])
        return scales[lo] + t * (scales[hi] - scales[lo])
    c = max(below, key=lambda k: predicted[k]) if below else min(above, key=lambda k: predicted[k])
    aim = corrected_aim(predicted[c], measured[c], goal)
    if predicted[c] <= 0.0 or aim <= 0.0:  # a model that predicted nothing: only the miss tells
        return scales[c] * measured[c] / goal
    # the round landed at ``predicted[c]`` under ``scales[c]``: aiming the same way at another predicted share takes
    # the calibration that predicts that much less (or more)
    return scales[c] * predicted[c] / aim


def corrected_aim(predicted: float, measured: float, goal: float) -> float:
    """The predicted share of the original a cut should have to measure ``goal``, from one round that was predicted
    at ``predicted`` and measured ``measured``.

    Where the round measured faster than predicted, the model's error grows with the depth of the cut: it is
    calibrated on the original, which every round measures alike, and a cut's tensors and weights fit the caches
    better the smaller it is, which the tables (each op timed alone) do not see (efficientnet_b0 cut to a predicted
    29% measured 20%; ``benchmarks/LATENCY_MODEL.md``). So that error is taken as a power of the predicted share,
    anchored at the original (1 predicts 1): ``measured = predicted ** gamma``, with ``gamma`` from the round, at
    most :data:`GAMMA_MAX`. Replayed over the 31 later rounds of sessions 12 and 13's latency benchmark (each
    round's measured share predicted from its predicted share and the earlier round this function would pick), this
    erred by 3.3% on average and 15% at worst, where scaling by the round's miss (``predicted * goal / measured``,
    alike near the original) erred by 3.9% and 25%; both medians were 1.8%. Where the round measured slower than
    predicted (a fixed cost the model misses), or is not under the original, the miss scales."""
    if 0.0 < measured < predicted < 0.99:
        gamma = min(math.log(measured) / math.log(predicted), GAMMA_MAX)
        return goal ** (1.0 / gamma)
    return predicted * goal / measured if measured > 0.0 else predicted


def stalled_end(measured: list[float], runs: list[int], goal: float) -> int | None:
    """The round to measure again before the next correction, or None: the round nearest the goal on its far side
    from the last two rounds, where both came after it, both landed on the same side of the goal, and it was measured
    once.

    Between rounds on either side of the goal, :func:`next_scale` interpolates; where one end is a measurement a busy
    spell moved toward the goal, the true cut lies outside the two ends and every interpolated round lands on the
    same side again, each a little nearer the wrong end (a first round measured 7 points over its time left a
    runtime whose cuts measure ``predicted ** 1.15`` short of the window after six rounds). Two rounds in a row that
    the end did not pull across the goal are the sign; a second look at that end costs a measurement, not a cut."""
    if len(measured) < 3:
        return None
    over = [m > goal for m in measured]
    if over[-1] != over[-2]:
        return None
    others = [k for k, o in enumerate(over) if o != over[-1]]
    if not others:
        return None
    end = min(others, key=lambda k: abs(measured[k] - goal))
    return end if runs[end] == 1 and end < len(measured) - 2 else None
