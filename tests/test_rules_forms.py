"""Every form of an op has the rule of its module form (issue 18, item 3).

A layer reaches the graph as a module (``nn.BatchNorm2d``), as a function with its parameters passed
in (``F.batch_norm``, as timm's norm-activation layers call it), as a ``torch.*`` alias with another
argument order (``torch.batch_norm``) or as a Tensor method. Each form must free the same channels and
obey the mask oracle. ``nn.Transformer*`` layers, torch.nn leaves without a rule, are traced through
along their plain path and must shrink like any other model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph.analysis import ChannelGraph, Group
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.testing import masked_reference, random_plan
from tests.conftest import assert_close_trees, check_grow, check_prune

SEEDS = (0, 1, 2)


def _free_share(cg: ChannelGraph) -> float:
    return fxmorph.CostModel(cg).prunable_share()


def _param_groups(cg: ChannelGraph, prefix: str) -> list[Group]:
    return [g for g in cg.groups if any(p.name.startswith(prefix) for p in g.params)]


def _group_of(cg: ChannelGraph, name: str, dim: int) -> Group:
    (group,) = [g for g in cg.groups if any(p.name == name and p.dim == dim for p in g.params)]
    return group


class FunctionalNorms(nn.Module):
    """A conv net whose norms, embedding and PReLU are functional calls on the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(24, 32, 1), nn.Conv2d(32, 32, 1)
        self.bn_w, self.bn_b = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.register_buffer("bn_mean", torch.randn(16))
        self.register_buffer("bn_var", torch.rand(16) + 0.5)
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(24) + 0.5), nn.Parameter(torch.randn(24))
        self.in_w, self.in_b = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32))
        self.slope = nn.Parameter(torch.rand(24) * 0.3)
        self.tbn_w, self.tbn_b = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32))
        self.register_buffer("tbn_mean", torch.randn(32))
        self.register_buffer("tbn_var", torch.rand(32) + 0.5)
        self.ln_w, self.ln_b = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32))
        self.rms_w = nn.Parameter(torch.rand(32) + 0.5)
        self.table = nn.Parameter(torch.randn(10, 32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = F.batch_norm(self.conv1(x), self.bn_mean, self.bn_var, self.bn_w, self.bn_b, False, 0.1, 1e-5)
        h = F.group_norm(self.conv2(F.relu(h)), 4, self.gn_w, self.gn_b)
        h = F.prelu(h, self.slope)
        h = F.instance_norm(self.conv3(h), weight=self.in_w, bias=self.in_b)
        h = torch.batch_norm(self.conv4(F.selu(h)), self.tbn_w, self.tbn_b, self.tbn_mean, self.tbn_var,
                             False, 0.1, 1e-5, False)  # fmt: skip
        t = h.mean((2, 3))[:, None, :] + F.embedding(tokens, self.table)  # (N, L, 32)
        t = F.layer_norm(t, (32,), self.ln_w, self.ln_b)
        t = F.rms_norm(F.celu(t), [32], self.rms_w, 1e-6)
        return self.fc(F.logsigmoid(t).mean(1))


def _functional_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2, 5), generator=g)


def test_functional_norms_free_their_channels_and_obey_the_mask_oracle() -> None:
    torch.manual_seed(0)
    model = FunctionalNorms().eval()
    x, tokens = _functional_inputs()
    cg = fxmorph.analyze(model, (x, tokens))
    assert _free_share(cg) == 1.0, cg.explain()
    for prefix in ("bn_", "gn_", "slope", "in_", "tbn_", "ln_", "rms_w"):
        groups = _param_groups(cg, prefix)
        assert groups and all(not g.pins for g in groups), f"{prefix}: {cg.explain()}"
    assert _group_of(cg, "table", 0).pins, "embedding rows are chosen by index values: they must keep their count"
    for seed in SEEDS:
        plan = random_plan(cg, seed=seed)
        small = fxmorph.resize(cg, plan)
        fxmorph.check(small, (x, tokens))
        expected = masked_reference(cg, plan, x, tokens)
        with torch.no_grad():
            actual = small.double().eval()(x.double(), tokens)
        assert_close_trees(actual, expected, what="mask oracle")
    assert small.get_parameter("bn_w").shape[0] < 16 and small.get_buffer("tbn_var").shape[0] < 32


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward, as timm's ``BatchNormAct2d``: traced through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn_training = self.training or self.running_mean is None
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training,
                           self.momentum or 0.0, self.eps)  # fmt: skip
        return F.hardswish(out)


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), BatchNormAct(16)
        self.dw, self.n2 = nn.Conv2d(16, 32, 3, padding=1, groups=16), BatchNormAct(32)  # channel multiplier 2
        self.pw, self.n3 = nn.Conv2d(16, 32, 1), BatchNormAct(32)
        self.head = nn.Linear(32, 4)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(self.c1(x))
        h = self.n2(self.dw(h)) + self.n3(self.pw(h))  # a depthwise-multiplier branch added to a plain one
        return self.head(h.mean((2, 3)))


def test_norm_act_subclass_and_depthwise_multiplier_are_free() -> None:
    torch.manual_seed(0)
    model, x = NormActNet().eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,))
    assert _free_share(cg) == 1.0, cg.explain()
    for seed in SEEDS:
        check_prune(cg, random_plan(cg, seed=seed), x)
    growable = [g for g in cg.groups if g.growable]
    assert growable
    plan = WidthPlan({g.id: GroupPlan(tuple(range(g.size)), new=2) for g in growable})
    check_grow(cg, plan, x)
    small = fxmorph.shrink(model, 0.5, (x,), round_to=1)
    assert fxmorph.metadata(small)["fxmorph.report"].flops_ratio <= 0.5


class WeightStandardised(nn.Module):
    """A conv whose weight is standardised over its input channels with batch statistics (NF-Nets):
    removing an input channel would change every weight, so those channels are pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, 16, -1), None, None, training=True, momentum=0.0, eps=1e-5)
        h = F.conv2d(F.relu(self.c1(x)), w.reshape_as(self.weight), padding=1)
        return self.fc(F.relu(h).mean((2, 3)))


def test_statistics_over_channels_pin_them() -> None:
    torch.manual_seed(0)
    model, x = WeightStandardised().eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,))
    assert _group_of(cg, "c1.weight", 0).pins, cg.explain()
    assert not _group_of(cg, "weight", 0).pins, cg.explain()  # the output channels are standardised one by one: free
    kernel = [g for g in cg.groups if any(p.name == "weight" and p.dim >= 2 for p in g.params)]
    assert kernel and all(g.pins for g in kernel), "kernel positions of a weight used directly are not channels"
    check_prune(cg, random_plan(cg, seed=0), x)


class WeightStandardisedGrouped(nn.Module):
    """NF-Net's grouped convolution (timm's ScaledStdConv2d with ``groups=2``): its standardised weight has a
    fixed fan-in, so the channels it reads are pinned, and its output channels are free."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 4, 3, 3))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, self.weight.shape[0], -1)  # timm reads the width from an attribute
        w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        h = F.conv2d(F.relu(self.c1(x)), w, padding=1, groups=2)
        return self.fc(F.relu(h).mean((2, 3)))


def test_a_grouped_conv_with_a_standardised_weight_pins_the_channels_it_reads() -> None:
    """Regression: the grouped form left its input's channels free where the weight's fan-in had a fixed width, so
    timm's NF-Nets (nfnet_l0, dm_nfnet_f0) failed shape replay in shrink (weight [14, 64, 3, 3] given 18 channels)."""
    torch.manual_seed(0)
    model, x = WeightStandardisedGrouped().eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,))
    assert _group_of(cg, "c1.weight", 0).pins, cg.explain()
    assert any(not g.pins for g in cg.groups if any(p.name == "weight" and p.dim == 0 for p in g.params))
    check_prune(cg, random_plan(cg, seed=0), x)
    small = fxmorph.shrink(model, "80%", (x,), round_to=1)
    assert type(small) is WeightStandardisedGrouped and small.c1.out_channels == 8 and small(x).shape == (2, 3)


class Gated(nn.Module):
    """GLU, a module softmax over tokens, log_softmax, normalize, clamp and addcmul."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.score = nn.Linear(8, 32), nn.Linear(16, 16), nn.Linear(16, 1)
        self.alpha, self.beta = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))
        self.tokens = nn.Softmax(dim=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 8)
        h = F.glu(self.fc1(x), dim=-1)  # 32 -> 16
        h = torch.addcmul(self.beta, self.alpha, h).clamp(-3.0, 3.0)
        h = self.fc2(h) * self.tokens(self.score(h))  # attention pooling weights over the tokens
        h = F.normalize(h, dim=-1) + F.log_softmax(h, dim=1)
        return self.head(h.mean(1))


def test_glu_softmax_module_normalize_addcmul_are_free() -> None:
    torch.manual_seed(0)
    model, x = Gated().eval(), torch.randn(2, 6, 8)
    cg = fxmorph.analyze(model, (x,))
    assert _free_share(cg) == 1.0, cg.explain()
    for seed in SEEDS:
        check_prune(cg, random_plan(cg, seed=seed), x)


class Shuffles(nn.Module):
    """Pixel and channel shuffles, adaptive max pooling and upsampling in their functional forms."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(32, 8, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.channel_shuffle(self.c2(F.pixel_shuffle(self.c1(x), 2)), 2)
        h = F.adaptive_max_pool2d(self.c3(F.pixel_unshuffle(h, 2)), 2)
        return self.fc(F.interpolate(h, scale_factor=2.0).mean((2, 3)))


def test_functional_shuffles_are_free() -> None:
    torch.manual_seed(0)
    model, x = Shuffles().eval(), torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(model, (x,))
    assert _free_share(cg) == 1.0, cg.explain()
    for seed in SEEDS:
        check_prune(cg, random_plan(cg, seed=seed), x)


# -- nn.Transformer* ---------------------------------------------------------------------------------


class EncoderNet(nn.Module):
    def __init__(self, norm_first: bool, batch_first: bool, activation: object) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(12, 48)
        layer = nn.TransformerEncoderLayer(48, 4, 96, dropout=0.1, activation=activation,  # type: ignore[arg-type]
                                           batch_first=batch_first, norm_first=norm_first)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 12)
        h = self.embed(x)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "module": nn.GELU(), "callable": lambda t: F.silu(t) * 0.5}
# Every value of each option by default (pairwise); the whole grid under `-m slow`.
_PAIRWISE = {(False, True, "relu"), (True, False, "gelu"), (False, False, "module"), (True, True, "callable")}
_GRID = [
    pytest.param(nf, bf, act, marks=() if (nf, bf, act) in _PAIRWISE else pytest.mark.slow)
    for nf in (False, True) for bf in (True, False) for act in _ACTIVATIONS
]  # fmt: skip


@pytest.mark.parametrize(("norm_first", "batch_first", "activation"), _GRID)
def test_transformer_encoder_layer_shrinks(norm_first: bool, batch_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    model, x = EncoderNet(norm_first, batch_first, _ACTIVATIONS[activation]).eval(), torch.randn(2, 7, 12)
    cg = fxmorph.analyze(model, (x,))
    with torch.no_grad():  # the traced plain path computes what the layer computes
        assert_close_trees(cg.gm(x), model(x), rtol=1e-5, what="traced encoder")
    assert _free_share(cg) == 1.0, cg.explain()
    check_prune(cg, random_plan(cg, seed=1), x)
    small = fxmorph.shrink(model, 0.5, (x,))
    assert fxmorph.metadata(small)["fxmorph.report"].flops_ratio <= 0.5
    fxmorph.check(small, (x,))


class Seq2Seq(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.src, self.tgt = nn.Linear(6, 32), nn.Linear(6, 32)
        self.core = nn.Transformer(32, 4, 2, 2, 64, batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(32, 3)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.core(self.src(s), self.tgt(t)))


@pytest.mark.parametrize(
    ("batch_first", "norm_first"),
    [(True, False), (False, True), pytest.param(True, True, marks=pytest.mark.slow),
     pytest.param(False, False, marks=pytest.mark.slow)],
)  # fmt: skip
def test_transformer_encoder_decoder_obeys_mask_oracle(batch_first: bool, norm_first: bool) -> None:
    torch.manual_seed(0)
    model = Seq2Seq(batch_first, norm_first).eval()
    s, t = torch.randn(2, 7, 6), torch.randn(2, 5, 6)
    if not batch_first:
        s, t = s.transpose(0, 1).contiguous(), t.transpose(0, 1).contiguous()
    cg = fxmorph.analyze(model, (s, t))
    with torch.no_grad():
        assert_close_trees(cg.gm(s, t), model(s, t), rtol=1e-5, what="traced transformer")
    assert _free_share(cg) == 1.0, cg.explain()
    plan = random_plan(cg, seed=4)
    small = fxmorph.resize(cg, plan)
    fxmorph.check(small, (s, t))
    with torch.no_grad():
        actual = small.double().eval()(s.double(), t.double())
    assert_close_trees(actual, masked_reference(cg, plan, s, t), what="mask oracle")


def test_transformer_layers_as_the_model_itself() -> None:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                    enable_nested_tensor=False).eval()  # fmt: skip
    x = torch.randn(2, 7, 32)
    cg = fxmorph.analyze(encoder, (x,))
    assert any(n.op == "call_module" and n.target == "layers.0.linear1" for n in cg.gm.graph.nodes)
    assert {g.size for g in cg.free_groups} == {64}, cg.explain()  # the stream is the input: only the FFNs
    check_prune(cg, random_plan(cg, seed=0), x)
    decoder = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True).eval()
    memory = torch.randn(2, 5, 32)
    cg = fxmorph.analyze(decoder, (x, memory))
    with torch.no_grad():
        assert_close_trees(cg.gm(x, memory), decoder(x, memory), rtol=1e-5, what="traced decoder layer")


def test_encoder_with_padding_mask_stays_whole() -> None:
    """With a key padding mask, nn.TransformerEncoder may run on nested tensors, which zero the padded
    positions; the plain path would not, so the call stays a leaf and its channels are pinned."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 32)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(x), src_key_padding_mask=pad))

    torch.manual_seed(0)
    model, x = Padded().eval(), torch.randn(2, 7, 6)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    cg = fxmorph.analyze(model, (x, pad))
    assert any(n.op == "call_module" and n.target == "encoder" for n in cg.gm.graph.nodes)
    stream = _group_of(cg, "embed.weight", 0)
    assert stream.pinned and "no channel rule" in stream.pinned
    with torch.no_grad():
        assert_close_trees(cg.gm(x, pad), model(x, pad), what="leaf encoder")


# -- smaller regressions ------------------------------------------------------------------------------


def test_batched_matmul_with_a_fixed_width_dim_pins_the_channels() -> None:
    """Talking-heads attention (CaiT) mixes heads with a Linear, then multiplies by values whose head
    count is fixed: the Linear's output channels may not change, while the head dim stays free."""

    class TalkingHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.mix, self.proj = nn.Linear(16, 48), nn.Linear(2, 2), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
            attn = self.mix((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.head = nn.Linear(4, 16), TalkingHeads(), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head((h + self.attn(h)).mean(1))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 4)
    cg = fxmorph.analyze(model, (x,))
    assert _group_of(cg, "attn.mix.weight", 0).pins, cg.explain()
    assert not _group_of(cg, "attn.qkv.weight", 0).pins, cg.explain()
    check_prune(cg, random_plan(cg, seed=0), x)


def test_functional_linear_with_keyword_parameters_is_free() -> None:
    """``F.linear(x, weight=..., bias=...)`` (timm's BEiT and SwinV2 pass their qkv bias so) used to crash the
    rule with an IndexError; the arguments are bound by name."""

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8))
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.linear(x, weight=self.weight, bias=self.bias).relu())

    x = torch.randn(3, 4)
    cg = fxmorph.analyze(Keywords(), (x,))
    assert [g.size for g in cg.free_groups] == [8]
    check_prune(cg, random_plan(cg, seed=0), x)


class _ChannelTokens(nn.Module):
    """Indices that carry channels: the argmax over positions of each conv channel, looked up in a table."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.table, self.head = nn.Conv1d(3, 8, 1), nn.Embedding(5, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (self.conv(x) > 0).long().sum(-1).clamp(max=4)  # (N, 8): a token per channel
        return self.head(self.table(tokens)).sum(1)  # the channels summed: the conv's may go


def test_an_embedding_keeps_the_channels_its_indices_carry() -> None:
    model, x = _ChannelTokens().eval(), torch.randn(2, 3, 6)
    cg = fxmorph.analyze(model, (x,))
    conv = next(g for g in cg.groups if any(m.name == "conv.weight" and m.dim == 0 for m in g.params))
    assert not conv.pins  # carried through the lookup to the sum, not dropped
    for seed in range(3):
        check_prune(cg, random_plan(cg, seed=seed), x)
