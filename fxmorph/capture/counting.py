"""Counting FLOPs and parameters with PyTorch's own counter.

FLOPs are 2 x multiply-accumulates, as counted by :class:`torch.utils.flop_counter.FlopCounterMode`:
matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``), convolutions (plain and transposed) and
scaled-dot-product attention. Biases, normalisations, activations, pooling and elementwise ops are
not counted, exactly as in PyTorch, so a user can check every figure fxmorph prints with PyTorch.

What fxmorph counts beyond PyTorch on the CPU: ``scaled_dot_product_attention`` (PyTorch counts it
only for its CUDA kernels; fxmorph applies PyTorch's own formula, 4 x B x H x L x S x E), and
``nn.MultiheadAttention`` in eval mode, whose fused fast path PyTorch does not count (fxmorph counts
its projections and attention as the unfused path runs them). See :mod:`fxmorph.capture.flops`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxmorph.capture.flops import flop_counter
from fxmorph.capture.trace import FAKE_THRESHOLD_BYTES, as_inputs
from fxmorph.validate import frozen_mode

__all__ = ["count_flops", "count_macs", "count_params"]


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass of ``model`` (eval mode) on ``example_inputs``.

    Large models (over 1 GiB of weights) are counted on fake tensors, so no compute is spent.
    """
    from fxmorph.capture.trace import _check_model

    _check_model(model)
    inputs = as_inputs(example_inputs)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > FAKE_THRESHOLD_BYTES
    with frozen_mode(model), torch.no_grad():
        if big:
            from torch._subclasses.fake_tensor import FakeTensorMode

            # allow_non_fake_inputs: the model's real weights meet the fake inputs, and the ops still run
            # on fake tensors (shapes only), so no compute or activation memory is spent
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
                with flop_counter() as counter:
                    model(*fake)
        else:
            with flop_counter() as counter:
                model(*inputs)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates: half of :func:`count_flops`."""
    return count_flops(model, example_inputs) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
