"""Parametrized weights (issue 16): a layer with ``torch.nn.utils.parametrizations.weight_norm`` (Wav2Vec2's
positional convolution) shrinks with its parametrization kept. The graph shows ``torch._weight_norm(v, g, dim)``
under symbolic tracing and ``aten._weight_norm`` under ``torch.export``; ``g`` (``original0``) and ``v``
(``original1``) are sliced with the channels of the weight they make; the result is the user's class, whose
layer still derives its weight from the sliced ``g`` and ``v``, equal to the graph result, with the mask oracle
holding. Other parametrizations are refused (``tests/test_bad_model.py``)."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

import fxmorph
from fxmorph import CostModel
from fxmorph.passes.base import PassContext
from fxmorph.passes.prune import PrunePass
from fxmorph.testing import random_plan
from tests.conftest import MLP, assert_same_outputs, check_prune
from tests.test_bad_input import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTURES = ["fx", "export"]


class WeightNormNet(nn.Module):
    """conv, a weight-normed conv, global mean, linear: the weight-normed conv reads one group and makes another."""

    def __init__(self, dim: int | None = 0, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = weight_norm(nn.Conv2d(16, 16, 3, padding=1, bias=bias), dim=dim)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(F.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


class PositionalConv(nn.Module):
    """Wav2Vec2's positional convolution as transformers 5 writes it (``Wav2Vec2PositionalConvEmbedding``): a
    grouped Conv1d over time with ``weight_norm(name="weight", dim=2)`` (g per kernel position, shape (1, 1, K)),
    the extra step of an even kernel cut off, GELU. (The test of transformers' own class is under ``-m slow``:
    importing transformers takes longer than these tests.)"""

    def __init__(self, hidden: int = 64, kernel: int = 8, groups: int = 4) -> None:
        super().__init__()
        conv = nn.Conv1d(hidden, hidden, kernel_size=kernel, padding=kernel // 2, groups=groups)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.num_pad_remove = 1 if kernel % 2 == 0 else 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv(hidden_states.transpose(1, 2))
        if self.num_pad_remove > 0:
            hidden_states = hidden_states[:, :, : -self.num_pad_remove]
        return F.gelu(hidden_states).transpose(1, 2)


class PosConvNet(nn.Module):
    """A projection, the positional convolution added to it (as Wav2Vec2's encoder does), a LayerNorm, a head."""

    def __init__(self, pos: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 64)
        self.pos = pos if pos is not None else PositionalConv()
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head(self.norm(h + self.pos(h)))


def _weight_norm_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``g``, ``v`` and ``dim`` of a layer's weight_norm, asserting it is still registered, alone."""
    assert parametrize.is_parametrized(layer, "weight"), "the parametrization is gone"
    chain = layer.parametrizations.weight
    assert len(chain) == 1 and isinstance(chain[0], _WeightNorm)
    assert "weight" not in layer._parameters  # derived on access, as before
    g, v = chain.original0, chain.original1
    assert isinstance(g, nn.Parameter) and isinstance(v, nn.Parameter)
    assert torch.equal(layer.weight, torch._weight_norm(v, g, chain[0].dim))
    return g, v, chain[0].dim


def _prune_plan(cg: fxmorph.ChannelGraph, x: torch.Tensor, share: float = 0.5) -> fxmorph.WidthPlan:
    """The plan the prune pass makes for ``share`` of the model's FLOPs (any width)."""
    return PrunePass(int(CostModel(cg).flops() * share), round_to=1)(cg.gm, PassContext((x,))).plan


@pytest.mark.parametrize("capture", CAPTURES)
def test_shrink_slices_g_and_v_and_keeps_the_weight_norm(capture: str) -> None:
    torch.manual_seed(0)
    model, x = WeightNormNet().eval(), torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    small, report = fxmorph.shrink(model, 0.5, (x,), round_to=1, return_report=True, capture=capture)
    assert report.capture == capture
    assert 0.9 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    g, v, dim = _weight_norm_of(small.conv)
    out, cin = small.conv.out_channels, small.conv.in_channels
    assert out < 16 and cin < 16 and dim == 0
    assert g.shape == (out, 1, 1, 1) and v.shape == (out, cin, 3, 3)
    assert small.conv1.out_channels == cin and small.fc.in_features == out
    # the class result computes what the graph result does, bit for bit
    graph = fxmorph.shrink(model, 0.5, (x,), round_to=1, capture=capture, keep_class=False)
    assert isinstance(graph, torch.fx.GraphModule)
    with torch.no_grad():
        assert_same_outputs(small(x), graph(x), "class vs graph")
    # the user's model is untouched, its parametrization too
    assert_unchanged(model, before)
    assert _weight_norm_of(model.conv)[0].shape == (16, 1, 1, 1)
    # and the prune pass's plan for the same budget passes the mask oracle
    cg = fxmorph.analyze(model, (x,), capture=capture)
    check_prune(cg, _prune_plan(cg, x), x)


@pytest.mark.parametrize(
    ("dim", "bias", "capture"),
    [(0, False, "fx"), (1, False, "fx"), (2, True, "fx"), (None, True, "fx"),
     (1, False, "export"), (None, True, "export")],
)  # fmt: skip
def test_every_weight_norm_dim_passes_the_mask_oracle(dim: int | None, bias: bool, capture: str) -> None:
    """``dim=0`` (per output channel), ``dim=1`` (per input channel), ``dim=2`` (per kernel row: g holds no
    channels) and ``dim=None`` (one norm: g is a scalar): removed channels are renormalised over the kept ones,
    as the mask oracle means it; g keeps its layout (size one but along ``dim``)."""
    torch.manual_seed(0)
    model, x = WeightNormNet(dim, bias).eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    small = check_prune(cg, random_plan(cg, seed=1), x)
    v = small.get_parameter("conv.parametrizations.weight.original1")
    g = small.get_parameter("conv.parametrizations.weight.original0")
    out, cin = v.shape[:2]
    assert out < 16 and cin < 16
    expected = {0: (out, 1, 1, 1), 1: (1, cin, 1, 1), 2: (1, 1, 3, 1), None: ()}[dim]
    assert g.shape == expected


@pytest.mark.parametrize("capture", CAPTURES)
def test_wav2vec2_positional_conv_shrinks_with_its_weight_norm(capture: str) -> None:
    """Wav2Vec2's positional convolution: grouped (4 groups), ``weight_norm(dim=2)`` (g per kernel position,
    shape (1, 1, K)), added to the stream it reads: the stream shrinks alike in every group."""
    torch.manual_seed(0)
    model, x = PosConvNet().eval(), torch.randn(2, 10, 6)
    before = snapshot(model)
    small, report = fxmorph.shrink(model, 0.5, (x,), round_to=1, return_report=True, capture=capture)
    assert report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    conv = small.pos.conv
    g, v, dim = _weight_norm_of(conv)
    width = small.proj.out_features
    assert width < 64 and width % 4 == 0 and dim == 2
    assert (conv.in_channels, conv.out_channels, conv.groups) == (width, width, 4)
    assert g.shape == (1, 1, 8) and v.shape == (width, width // 4, 8)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert_unchanged(model, before)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    check_prune(cg, _prune_plan(cg, x), x)


def _weight_normed_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    model.fc1 = weight_norm(model.fc1)
    return model


def test_every_entry_point_takes_a_weight_normed_model(tmp_path: pathlib.Path) -> None:
    """grow, morph, FlopsRegularizer, save and load go through the same capture: each takes the model, and each
    model it gives back keeps the weight_norm, its g and v at the result's widths."""
    x = torch.randn(2, 8)
    grown = fxmorph.grow(_weight_normed_mlp(), (x,), budget_flops="120%")
    assert type(grown) is MLP and _weight_norm_of(grown.fc1)[1].shape == (32, 8)  # its channels may not grow
    batches = [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    morphed, _ = fxmorph.morph(_weight_normed_mlp(), 0.5, (x,), batches, F.cross_entropy, epochs=1, progress=False)
    assert type(morphed) is MLP and _weight_norm_of(morphed.fc1)[1].shape[0] < 32
    penalty = fxmorph.FlopsRegularizer(_weight_normed_mlp(), (x,))()
    assert penalty.requires_grad and float(penalty.detach()) > 0
    small = fxmorph.shrink(_weight_normed_mlp(), 0.5, (x,))
    fxmorph.save(small, tmp_path / "small.pt")
    loaded = fxmorph.load(tmp_path / "small.pt", _weight_normed_mlp(), (x,))
    _, v, _ = _weight_norm_of(loaded.fc1)
    assert v.shape == _weight_norm_of(small.fc1)[1].shape and v.shape[0] < 32
    with torch.no_grad():
        assert_same_outputs(loaded(x), small(x), "loaded vs shrunk")


def test_weight_normed_channels_shrink_but_do_not_grow() -> None:
    """New channels would change the norm (or have none: ``0 / 0``): the groups a weight_norm indexes may only
    shrink, and say why."""
    torch.manual_seed(0)
    model, x = WeightNormNet().eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,))
    touched = [g for g in cg.groups if any(m.name.startswith("conv.parametrizations") for m in g.params)]
    free = [g for g in touched if not g.pins]
    assert len(free) == 2  # the conv's input and output channels
    for group in free:
        assert not group.growable
        assert any("weight_norm" in p.reason for p in group.grow_pins), group.grow_pins


def test_a_weight_normed_layer_kept_whole_is_pinned_not_broken() -> None:
    """Named in ``leaf_modules``, the layer derives its weight inside one call, where no binding reaches g and v:
    its channels keep their width, and the reason says how to free them."""
    torch.manual_seed(0)
    model, x = WeightNormNet().eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,), leaf_modules=["conv"])
    reasons = " ".join(str(p) for g in cg.groups for p in g.pins)
    assert "layer 'conv' derives its weight from a parametrization" in reasons and "leaf_modules" in reasons
    assert not cg.free_groups


@pytest.mark.slow
def test_transformers_wav2vec2_keeps_its_positional_weight_norm() -> None:
    """transformers' own classes: its ``Wav2Vec2PositionalConvEmbedding`` in the test model (symbolic tracing),
    and a whole ``Wav2Vec2ForSequenceClassification`` (``torch.export``: its forward takes ``**kwargs``), whose
    hidden width runs through the positional convolution."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2PositionalConvEmbedding

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        num_labels=3,
        classifier_proj_size=8,
        mask_time_prob=0.0,
    )  # fmt: skip  (no SpecAugment: its masked_spec_embed, read only in training, would pin the hidden width)
    model, x = PosConvNet(Wav2Vec2PositionalConvEmbedding(config)).eval(), torch.randn(2, 10, 6)
    small = fxmorph.shrink(model, 0.5, (x,), round_to=1, capture="fx")
    g, v, _ = _weight_norm_of(small.pos.conv)
    assert g.shape == (1, 1, 8) and v.shape[0] < 64
    cg = fxmorph.analyze(model, (x,))
    check_prune(cg, _prune_plan(cg, x), x)

    model, audio = transformers.Wav2Vec2ForSequenceClassification(config).eval(), torch.randn(1, 400)
    before = snapshot(model)
    small, report = fxmorph.shrink(model, 0.5, (audio,), round_to=1, return_report=True)
    assert report.capture == "export"
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    conv = small.wav2vec2.encoder.pos_conv_embed.conv
    g, v, _ = _weight_norm_of(conv)
    assert g.shape == (1, 1, 8) and v.shape == (conv.out_channels, conv.in_channels // 4, 8)
    assert conv.out_channels < 64
    with torch.no_grad():
        assert small(audio).logits.shape == model(audio).logits.shape
    assert_unchanged(model, before)
