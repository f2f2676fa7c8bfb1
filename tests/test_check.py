"""The consistency checker names what is wrong: the module or node, expected against actual."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmorph
from tests.zoo import build, example_input


@pytest.fixture
def traced():
    model, x = build("resnet18"), example_input("resnet18")
    return fxmorph.trace(model, (x,)), x


def test_consistent_model_passes(traced) -> None:
    gm, x = traced
    fxmorph.check(gm, (x,))


def test_module_attributes_disagreeing_with_weights(traced) -> None:
    gm, x = traced
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    conv.out_channels = 32
    gm.get_submodule("layer1.0").conv1 = conv
    with pytest.raises(fxmorph.ConsistencyError, match=r"layer1\.0\.conv1.*out_channels=32.*64"):
        fxmorph.check(gm, (x,))


def test_shape_replay_failure_names_the_node(traced) -> None:
    gm, x = traced
    gm.get_submodule("layer1.0").conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    with pytest.raises(fxmorph.ConsistencyError, match=r"shape replay failed.*layer1_0_conv2"):
        fxmorph.check(gm, (x,))


def test_changed_interface(traced) -> None:
    gm, x = traced
    expected = gm.meta["fxmorph.interface"]
    gm.fc = nn.Linear(512, 10)
    with pytest.raises(fxmorph.ConsistencyError, match=r"outputs changed.*1000.*10"):
        fxmorph.check(gm, (x,), expected_interface=expected)


def test_broken_graph_fails_lint(traced) -> None:
    gm, x = traced
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    user = next(iter(node.users))
    node.prepend(user)  # a user before its argument: the graph is no longer topologically ordered
    with pytest.raises(fxmorph.ConsistencyError, match="lint"):
        fxmorph.check(gm, (x,))


def test_plain_modules_are_traced_and_checked() -> None:
    model, x = build("mobilenet_v3_small"), example_input("mobilenet_v3_small")
    fxmorph.check(model, (x,))
    with pytest.raises(fxmorph.ConsistencyError):
        fxmorph.check(model, (torch.randn(1, 4, 64, 64),))
