"""Pooled and windowed attention (issue 18, item 4): MViT, Video Swin, MaxViT and einsum attention.

Each family is built small from torchvision's own classes (the zoo test covers the full-size models at
their test inputs): at least 95% of its FLOPs are prunable, a random keep-set obeys the mask oracle in
float64 (which also proves the softmax temperature is kept when head dims shrink), growing every
growable group keeps the function, and ``shrink`` to half the FLOPs returns a model with the original
output shapes. Hand-built modules cover einsum
attention with a class token and a positional parameter used directly, ``tensor_split`` and
``repeat_interleave`` along channels, and an einsum the rule does not read (it pins, never guesses).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.maxvit import MaxVit
from torchvision.models.video.mvit import MSBlockConfig, MViT
from torchvision.models.video.swin_transformer import SwinTransformer3d

import fxmorph
from fxmorph.analysis.context import RuleContext, ScaleRows
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.analysis.rules._static import UNKNOWN, static_value
from fxmorph.analysis.rules.einsum import parse_einsum
from fxmorph.testing import random_plan
from tests.conftest import check_grow, check_prune, output_shapes
from tests.zoo import build, example_input


def _ready(model: nn.Module) -> nn.Module:
    """Eval mode, with no all-zero Linear weight (a zero head makes every output comparison vacuous)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02)
    return model.eval()


def _mvit(v2: bool) -> nn.Module:
    """Three MViT blocks: pooled q/k/v, a stride-2 stage change; v2 adds relative positions, the pooled
    residual and the projection after attention, v1 absolute position parameters and a class position."""
    kernel_q = [[3, 3, 3]] * 3 if v2 else [[], [3, 3, 3], []]
    stride_q = [[1, 1, 1], [1, 2, 2], [1, 1, 1]] if v2 else [[], [1, 2, 2], []]
    channels = ([16, 16, 32], [16, 32, 32]) if v2 else ([16, 32, 32], [32, 32, 32])
    blocks = [
        MSBlockConfig(
            num_heads=h,
            input_channels=i,
            output_channels=o,
            kernel_q=kq,
            kernel_kv=[3, 3, 3],
            stride_q=sq,
            stride_kv=skv,
        )
        for h, i, o, kq, sq, skv in zip(
            [1, 2, 2], *channels, kernel_q, stride_q, [[1, 4, 4], [1, 2, 2], [1, 2, 2]], strict=True
        )
    ]
    torch.manual_seed(0)
    model = MViT(
        spatial_size=(32, 32),
        temporal_size=4,
        block_setting=blocks,
        residual_pool=v2,
        residual_with_cls_embed=not v2,
        rel_pos_embed=v2,
        proj_after_attn=v2,
        num_classes=10,
    )
    return _ready(model)


def _swin3d() -> nn.Module:
    """Two Video Swin stages with 2x2x2 windows, so every other block runs the shifted, masked path."""
    torch.manual_seed(0)
    model = SwinTransformer3d(
        patch_size=[2, 4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[2, 2, 2],
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return _ready(model)


def _maxvit() -> nn.Module:
    """Two MaxViT stages (MBConv, window and grid attention written with einsum) on a 32x32 image."""
    torch.manual_seed(0)
    model = MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return _ready(model)


VIDEO = (1, 3, 4, 32, 32)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mvit_v1": (lambda: _mvit(v2=False), VIDEO),
    "mvit_v2": (lambda: _mvit(v2=True), VIDEO),
    "swin3d": (_swin3d, VIDEO),
    "maxvit": (_maxvit, (1, 3, 32, 32)),
}


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _assert_shrinks_to_half(model: nn.Module, x: torch.Tensor) -> None:
    cg = fxmorph.analyze(model, (x,))
    share = fxmorph.CostModel(cg).prunable_share()
    assert share >= 0.95, f"only {share:.1%} of the FLOPs are prunable:\n{cg.explain()}"
    small, report = fxmorph.shrink(model, 0.5, (x,), round_to=1, return_report=True)
    assert 0.98 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert output_shapes(small, x) == output_shapes(model, x)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_family_prunes_exactly_and_shrinks_to_half(family: str) -> None:
    build_model, shape = FAMILIES[family]
    model, x = build_model(), _input(shape)
    cg = fxmorph.analyze(model, (x,))
    check_prune(cg, random_plan(cg, seed=0), x)  # every free group loses 30 to 70% of its channels
    growable = [g for g in cg.groups if g.growable]
    assert growable, "no group can grow"
    check_grow(cg, WidthPlan({g.id: GroupPlan(tuple(range(g.size)), new=2) for g in growable}), x)
    _assert_shrinks_to_half(model, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b", "maxvit_t"])
def test_zoo_attention_model_shrinks_to_half(name: str) -> None:
    _assert_shrinks_to_half(build(name), example_input(name))


def _group(cg: fxmorph.ChannelGraph, target: str, dim: int) -> fxmorph.analysis.Group:
    (gid, _), *_ = cg.layout_groups(cg.bindings[(target, dim)].layout)
    return cg.groups[gid]


def test_mvit_binds_class_token_and_relative_positions_to_channels() -> None:
    """The class token follows the stream's channels; the relative position tables' columns follow
    the head dim while their rows (distances) keep their count."""
    v1, v2, x = _mvit(v2=False), _mvit(v2=True), _input(VIDEO)
    cg1, cg2 = fxmorph.analyze(v1, (x,)), fxmorph.analyze(v2, (x,))
    for cg in (cg1, cg2):
        assert not _group(cg, "pos_encoding.class_token", 0).pins
    assert not _group(cg1, "pos_encoding.class_pos", 0).pins
    assert not _group(cg1, "pos_encoding.spatial_pos", 1).pins
    assert _group(cg1, "pos_encoding.spatial_pos", 0).pins  # positions, not channels
    head = _group(cg2, "blocks.0.attn.rel_pos_h", 1)
    assert not head.pins and _group(cg2, "blocks.0.attn.rel_pos_h", 0).pins
    assert head is _group(cg2, "blocks.0.attn.rel_pos_t", 1)


def test_swin3d_keeps_heads_and_the_softmax_temperature() -> None:
    model, x = _swin3d(), _input(VIDEO)
    cg = fxmorph.analyze(model, (x,))
    assert _group(cg, "features.0.0.attn.relative_position_bias_table", 1).pins  # one column per head
    assert any(isinstance(rw.location, ScaleRows) for rw in cg.rewrites)
    assert fxmorph.CostModel(cg).prunable_share() == 1.0


class EinsumAttention(nn.Module):
    """A one-block transformer written with einsum: a class token concatenated in front, a positional
    parameter added directly, multi-head attention with a constant softmax scale, a classifier weight
    used directly through einsum on the class token (sliced back off) plus the mean of the others."""

    def __init__(self, dim: int = 24, heads: int = 3, tokens: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.embed = nn.Linear(6, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.w_out = nn.Parameter(torch.randn(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1] + 1
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], dim=1) + self.pos
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1) for t in (q, k, v))
        attn = (torch.einsum("b q h d, b k h d -> b h q k", q, k) * self.scale).softmax(dim=-1)
        h = h + self.proj(torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, -1))
        h = h + self.mlp(h)
        return torch.einsum("bc,ck->bk", h[:, 0] + h[:, 1:].mean(1), self.w_out)


class SplitRepeat(nn.Module):
    """``tensor_split`` of a conv's channels at a fixed point, and ``repeat_interleave`` along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.conv_a, self.conv_b = nn.Conv2d(5, 6, 1), nn.Conv2d(7, 6, 1)
        self.conv_r = nn.Conv2d(24, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.tensor_split(F.relu(self.conv(x)), (5,), dim=1)
        h = torch.cat([self.conv_a(a), self.conv_b(b)], dim=1).repeat_interleave(2, dim=1)
        return self.fc(F.relu(self.conv_r(h)).mean((2, 3)))


@pytest.mark.parametrize(
    ("make", "shape"), [(EinsumAttention, (2, 5, 6)), (SplitRepeat, (2, 3, 8, 8))], ids=["einsum", "split"]
)
def test_hand_built_attention_and_data_movement_obey_the_mask_oracle(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model, x = make().eval(), _input(shape)
    cg = fxmorph.analyze(model, (x,))
    assert fxmorph.CostModel(cg).prunable_share() == 1.0, cg.explain()
    for seed in range(4):
        check_prune(cg, random_plan(cg, seed=seed), x)
    small = fxmorph.shrink(model, 0.5, (x,), round_to=1)
    assert output_shapes(small, x) == output_shapes(model, x)


def test_einsum_attention_binds_parameters_to_their_channels() -> None:
    model, x = EinsumAttention().eval(), _input((2, 5, 6))
    cg = fxmorph.analyze(model, (x,))
    stream = _group(cg, "embed.weight", 0)
    assert _group(cg, "cls", 2) is stream and _group(cg, "pos", 2) is stream and _group(cg, "w_out", 0) is stream
    assert _group(cg, "pos", 1).pins  # one row per position: fixed
    assert not stream.pins


class Unread(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...c,cd->...d", self.fc(x), self.w)


def test_einsum_the_rule_cannot_read_pins_with_its_name() -> None:
    cg = fxmorph.analyze(Unread(), (torch.randn(2, 4),))
    assert any("einsum" in p.reason for p in _group(cg, "fc.weight", 0).pins)


def test_parse_einsum() -> None:
    assert parse_einsum("B G H I D, B G H J D -> B G H I J", 2) == (["BGHID", "BGHJD"], "BGHIJ")
    assert parse_einsum("ij,jk", 2) == (["ij", "jk"], "ik")  # implicit output: letters seen once, sorted
    assert parse_einsum("...c,cd->...d", 2) is None
    assert parse_einsum("ii->i", 1) is None  # a diagonal
    assert parse_einsum("ij,jk->ik", 3) is None


class Sizes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return h.reshape(h.shape[0], h.shape[1], h.shape[2] * h.size(3))


def test_static_value_knows_spatial_sizes_but_not_channel_widths() -> None:
    """Rules size windows from values computed at run time; a channel width is not one of them (it
    changes with the plan), so a value that depends on one is unknown and the rule pins instead."""
    cg = fxmorph.analyze(Sizes(), (torch.randn(2, 3, 4, 5),))
    ctx = RuleContext(cg.gm)
    ctx.env = {n: cg.spaces[n.name] for n in cg.gm.graph.nodes if n.name in cg.spaces}
    reshape = next(n for n in cg.gm.graph.nodes if n.target == "reshape")
    batch, channels, pixels = reshape.args[1:]
    assert static_value(ctx, batch) == 2 and static_value(ctx, pixels) == 20
    assert static_value(ctx, channels) is UNKNOWN
    assert static_value(ctx, [pixels, channels]) is UNKNOWN
