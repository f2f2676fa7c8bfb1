"""Norm statistics for new channels: the running mean and variance of some BatchNorm channels, measured
on the norm's own inputs and written into its buffers.

Which channels to measure (the new channels of growing groups) is decided by
:mod:`fxmorph.passes.grow_stats`; this module writes the statistics, in place, into a model that surgery
built (never the user's model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxmorph.validate import frozen_mode

__all__ = ["write_norm_stats"]

_MIN_VAR = 1e-8
"""Below this a measured variance is a constant channel (or too few samples): its variance is set to 1."""


class _Stats:
    """Forward pre-hook: running mean and variance of some channels of a BatchNorm's input, written
    into its statistics as they are measured (so norms further down see the new channels normalised)."""

    def __init__(self, positions: list[int]) -> None:
        self.pos = torch.as_tensor(positions, dtype=torch.long)
        self.n = 0
        self.total = torch.zeros(len(positions), dtype=torch.float64)
        self.squares = torch.zeros(len(positions), dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # Sums in float64 on the CPU: millions of activations summed in float32 lose the small variances.
        x = args[0].detach().index_select(1, self.pos.to(args[0].device)).movedim(1, 0).cpu().double()
        x = x.reshape(len(self.pos), -1)
        self.n += x.shape[1]
        self.total = self.total + x.sum(1)
        self.squares = self.squares + x.square().sum(1)
        mean = self.total / self.n
        # Unbiased, as BatchNorm keeps its running variance.
        # E[x^2] - E[x]^2 can come out a hair below 0 by cancellation, hence the clamp.
        var = (self.squares / self.n - mean.square()).clamp_min(0) * (self.n / max(self.n - 1, 1))
        var = torch.where(var > _MIN_VAR, var, torch.ones_like(var))
        with torch.no_grad():
            pos = self.pos.to(module.running_mean.device)
            module.running_mean[pos] = mean.to(module.running_mean)
            module.running_var[pos] = var.to(module.running_var)


def write_norm_stats(model: nn.Module, positions: Mapping[str, list[int]], inputs: Sequence[tuple[Any, ...]]) -> None:
    """Run ``model`` on ``inputs`` (eval mode, no gradients) and set, for each BatchNorm path in
    ``positions``, the running mean and variance of those channel positions to the statistics of its
    input over all the batches (a variance of 0 becomes 1). Writes into ``model`` in place."""
    hooks = [model.get_submodule(owner).register_forward_pre_hook(_Stats(pos)) for owner, pos in positions.items()]
    try:
        # Eval mode: each norm normalises with the statistics written so far and does not update them with its
        # momentum, which would overwrite the measured values.
        with frozen_mode(model), torch.no_grad():
            for args in inputs:
                model(*args)
    finally:
        for h in hooks:
            h.remove()
