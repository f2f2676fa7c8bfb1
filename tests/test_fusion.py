"""What a CPU runtime runs a graph's ops as (:mod:`fxmorph.analysis.fusion`), and how the latency model prices it.

A batch norm after a convolution folds into it; a batch norm after a ReLU or a concatenation runs as a depthwise 1x1
kernel of its own, with the ReLU after it fused; without a table for that kernel it is priced by its memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock

import fxmorph
from fxmorph.analysis import build_channel_graph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.fusion import fusion
from fxmorph.analysis.graph import ChannelGraph
from fxmorph.analysis.kernels import KernelKind, norm_kernel
from fxmorph.analysis.latency import LatencyFunction, fused_nodes, kernels_of
from tests.test_latency_budget import FakeRuntime


class PreActivation(nn.Module):
    """A convolution with its norm and ReLU (folded), then a norm and ReLU of its own (a pre-activation block's),
    then a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.conv2(torch.relu(self.bn2(y)))


def _graph(model: nn.Module, x: torch.Tensor) -> ChannelGraph:
    return build_channel_graph(fxmorph.trace(model.eval(), (x,)))


@pytest.fixture(scope="module")
def pre_activation() -> ChannelGraph:
    torch.manual_seed(0)
    return _graph(PreActivation(), torch.randn(1, 3, 12, 12))


def test_a_norm_after_a_convolution_folds_and_one_after_a_relu_runs_as_a_depthwise_kernel(
    pre_activation: ChannelGraph,
) -> None:
    fused, norms = fusion(pre_activation)
    assert {"bn1", "relu"} <= fused  # folded into conv1, and conv1's activation
    assert set(norms) == {"bn2"}
    kernel, _ = norms["bn2"]
    assert kernel == norm_kernel((1, 32, 12, 12))
    assert kernel.kind is KernelKind.DEPTHWISE and kernel.kernel == (1, 1) and kernel.spatial == (12, 12)
    assert "relu_1" in fused  # the ReLU after bn2 runs inside its kernel
    assert kernels_of(pre_activation)[kernel] == (32,)


def test_without_a_table_a_norm_is_priced_by_its_memory_and_nothing_fuses_into_it(
    pre_activation: ChannelGraph,
) -> None:
    fused, norms = fusion(pre_activation, lambda kernel: kernel.kind is not KernelKind.DEPTHWISE)
    assert not norms
    assert "relu_1" not in fused and "bn1" in fused


def test_the_norms_of_a_dense_block_run_as_kernels() -> None:
    """Each dense layer's first norm reads a concatenation (a kernel of its own, its ReLU fused); its second follows
    the 1x1 convolution (folded, as its ReLU)."""
    torch.manual_seed(0)
    cg = _graph(_DenseBlock(3, 16, 2, 8, 0.0), torch.randn(1, 16, 8, 8))
    fused, norms = fusion(cg)
    assert len(norms) == 3 and all("norm1" in name for name in norms)
    assert sum("norm2" in name for name in fused) == 3
    assert fused_nodes(cg) == fused


def test_a_norm_run_as_a_kernel_is_priced_by_its_table(pre_activation: ChannelGraph) -> None:
    """With its table, the norm costs what the table says for its channels (and its ReLU nothing); without it, its
    memory costs and the ReLU's. Both are monotone in the norm's width."""
    cost = CostModel(pre_activation)
    profile = FakeRuntime().profile(kernels_of(pre_activation))
    kernel = norm_kernel((1, 32, 12, 12))
    assert kernel is not None
    tabled = LatencyFunction(cost, profile)
    untabled = LatencyFunction(
        cost, dataclasses.replace(profile, tables={k: t for k, t in profile.tables.items() if k != kernel})
    )
    full = cost.widths()
    norm_us = float(profile.tables[kernel].at(np.array([[32]]))[0])
    memory = profile.memory
    elements = 32 * 12 * 12
    relu_and_norm_us = sum(
        memory[c].fixed_us + memory[c].element_us * elements for c in memory if c.value in ("batch_norm", "activation")
    )
    assert tabled(full) - untabled(full) == pytest.approx(norm_us - relu_and_norm_us)
    group = next(g.id for g in pre_activation.free_groups if g.size == 32)
    thinner = full.copy()
    thinner[group] = 16
    assert tabled(thinner) < tabled(full) and untabled(thinner) < untabled(full)
