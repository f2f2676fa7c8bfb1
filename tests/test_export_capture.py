"""capture="export": torch.export's graph, its ATen ops read as the torch calls the op table knows, feeds the same
analysis, surgery, checker and write-back as symbolic tracing; "auto" falls back to it where tracing fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.ops import FUNCTION_OPS, METHOD_OPS
from fxmorph.capture.aten import ALIASES
from fxmorph.meta import CAPTURE_KEY
from fxmorph.passes.base import PassContext
from fxmorph.passes.prune import PrunePass
from fxmorph.testing import random_plan
from tests.conftest import check_prune
from tests.zoo import build, example_input

# depthwise (mobilenet) and residual (resnet) by default; grouped (regnet) and channel shuffle (shufflenet) under slow
SAMPLE = ["resnet18", "mobilenet_v3_small"]
SEEDS = (0, 1, 2)
MORE = ["shufflenet_v2_x0_5", "regnet_x_400mf", "convnext_tiny", "efficientnet_b0", "densenet121", "squeezenet1_0"]


def test_every_alias_names_a_call_the_op_table_knows() -> None:
    missing = [
        str(overload)
        for overload, alias in ALIASES.items()
        if (alias.target not in METHOD_OPS if isinstance(alias.target, str) else alias.target not in FUNCTION_OPS)
    ]
    assert not missing, missing


@pytest.mark.parametrize("name", [*SAMPLE, *(pytest.param(n, marks=pytest.mark.slow) for n in MORE)])
def test_exported_models_free_what_symbolic_tracing_frees_and_obey_the_mask_oracle(name: str) -> None:
    model, x = build(name), example_input(name)
    cg = fxmorph.analyze(model, (x,), capture="export")
    assert cg.gm.meta[CAPTURE_KEY] == "export"
    traced = fxmorph.analyze(model, (x,), capture="fx")
    # the same channels are free: every free group of the trace (by the parameters it indexes) is free here
    free = {frozenset((m.name, m.dim) for m in g.params) for g in cg.free_groups}
    missed = [g for g in traced.free_groups if frozenset((m.name, m.dim) for m in g.params) not in free]
    assert not missed, f"free under symbolic tracing only: {[g.params[:2] for g in missed]}"
    budget = CostModel(cg).flops() // 2
    result = PrunePass(budget, round_to=1)(cg.gm, PassContext((x,)))
    check_prune(cg, result.plan, x)  # the mask oracle, and the result written back into the model's class


class KeywordNet(nn.Module):
    """A forward taking ``**kwargs``, which symbolic tracing cannot enter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        for value in kwargs.values():
            x = x + value
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_auto_falls_back_to_export_and_gives_the_class_back() -> None:
    torch.manual_seed(0)
    model, x = KeywordNet().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(fxmorph.TraceError):
        fxmorph.trace(model, (x,), capture="fx")
    small, report = fxmorph.shrink(model, "50%", (x,), round_to=1, return_report=True)
    assert report.capture == "export" and "torch.export" in report.table()
    assert type(small) is KeywordNet and small.conv.out_channels < 16
    assert small(x).shape == (2, 4)
    small.train()(x).sum().backward()  # the class trains (BatchNorm in train mode), as the original


def test_a_model_neither_capture_takes_names_both_reasons() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0] if x.sum() > 0 else x

    with pytest.raises(fxmorph.TraceError, match=r"torch\.fx(.|\n)*torch\.export(.|\n)*in regions"):
        fxmorph.trace(DataDependent(), (torch.randn(4),))


def test_unknown_capture_is_an_input_error() -> None:
    with pytest.raises(fxmorph.InputError, match="unknown capture 'jit'"):
        fxmorph.shrink(KeywordNet(), "50%", (torch.randn(1, 3, 8, 8),), capture="jit")  # type: ignore[arg-type]


class Broadcast(nn.Module):
    """A hidden width written as a number in ``expand`` (every size is a number in an exported graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.mean(dim=1, keepdim=True)))  # (n, 1, 24)
        return self.b(h.expand(x.shape[0], 6, 24)) + x


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_sizes_written_as_numbers_follow_the_channels(capture: str) -> None:
    torch.manual_seed(0)
    model, x = Broadcast().eval(), torch.randn(2, 6, 16)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    assert any(g.size == 24 and not g.pins for g in cg.groups)
    result = PrunePass(CostModel(cg).flops() * 6 // 10, round_to=1)(cg.gm, PassContext((x,)))
    check_prune(cg, result.plan, x)


def test_a_hugging_face_encoder_shrinks_through_export_and_comes_back_as_its_class() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    model, ids = transformers.BertForSequenceClassification(config).eval(), torch.randint(0, 128, (1, 16))
    small, report = fxmorph.shrink(model, "50%", (ids,), round_to=1, return_report=True)
    assert report.capture == "export"  # transformers' forwards take **kwargs: symbolic tracing cannot enter them
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    assert small.bert.encoder.layer[0].intermediate.dense.out_features < 128
    with torch.no_grad():
        assert small(ids).logits.shape == model(ids).logits.shape


def test_a_view_of_an_expanded_tensor_runs_once_contiguous_is_dropped() -> None:
    """``expand`` then ``contiguous().view`` (timm's BAT attention): canonicalize drops ``contiguous``, so the view
    becomes a reshape, which copies where the strides need it (it used to fail: "view size is not compatible with
    input tensor's size and stride")."""

    class Expand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).unsqueeze(2).expand(-1, -1, 2, -1, -1)
            return y.contiguous().view(y.shape[0], -1, y.shape[-1]).sum(1)

    x = torch.randn(2, 3, 4, 4)
    cg = fxmorph.analyze(Expand(), (x,), capture="export")
    assert torch.equal(cg.gm(x), Expand.forward(cg.source, x))


class BilinearAttn(nn.Module):
    """timm's ``BilinearAttnTransform`` on one block (``t == 1``): the rows of ``conv_p``'s output and the columns of
    ``conv_q``'s are viewed as a ``bs x bs`` matrix that ``p @ x @ q`` multiplies into the spatial dims, which a
    convolution then reads as positions."""

    def __init__(self, c: int = 16, groups: int = 2, bs: int = 4) -> None:
        super().__init__()
        self.stem, self.conv1 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, groups, 1)
        self.conv_p = nn.Conv2d(groups, bs * bs * groups, (bs, 1))
        self.conv_q = nn.Conv2d(groups, bs * bs * groups, (1, bs))
        self.conv2, self.head1, self.head2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, 8, 1), nn.Conv2d(8, 4, 1)
        self.bs, self.groups = bs, groups

    def _spread(self, m: torch.Tensor, b: int, c: int) -> torch.Tensor:
        """One ``bs x bs`` matrix per group, repeated for each of the group's ``c // groups`` channels."""
        m = m.view(b, self.groups, 1, self.bs, self.bs)
        return m.expand(b, self.groups, c // self.groups, self.bs, self.bs).contiguous().view(b, c, self.bs, self.bs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        b, c = x.shape[0], x.shape[1]
        y = self.conv1(x)
        p = self.conv_p(F.adaptive_max_pool2d(y, (self.bs, 1))).view(b, self.groups, self.bs, self.bs).sigmoid()
        q = self.conv_q(F.adaptive_max_pool2d(y, (1, self.bs))).view(b, self.groups, self.bs, self.bs).sigmoid()
        p, q = self._spread(p / p.sum(dim=3, keepdim=True), b, c), self._spread(q / q.sum(dim=2, keepdim=True), b, c)
        return self.head2(self.head1(self.conv2(p.matmul(x).matmul(q)) + x).relu())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_channels_multiplied_into_a_spatial_dim_are_pinned_at_the_convolution(capture: str) -> None:
    """timm's bat_resnext26ts: a plan that shrank ``conv_p``'s rows shrank the image ``conv2`` reads, and the add
    after it failed ("size of tensor a (3) must match b (8) at dim 3"): the convolution rules dropped the channels
    on their input's spatial dims instead of pinning them."""
    torch.manual_seed(0)
    model, x = BilinearAttn().eval(), torch.randn(2, 3, 4, 4)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    # the groups on the spatial dims of p @ x @ q: the rows of conv_p's output, the columns of conv_q's
    spatial = [g for g in cg.groups if any(t.name.startswith("matmul") and t.dim >= 2 for t in g.tensors)]
    assert spatial and all(g.pins for g in spatial)
    assert any("spatial dim as positions" in str(p) for g in spatial for p in g.pins)
    free = {frozenset(p.name for p in g.params) for g in cg.free_groups}
    assert frozenset({"head1.weight", "head1.bias", "head2.weight"}) in free
    if capture == "fx":  # export pins conv1's channels at aten.adaptive_max_pool2d, which has no alias
        assert frozenset({"conv1.weight", "conv1.bias", "conv_p.weight", "conv_q.weight"}) in free
    for seed in SEEDS:
        check_prune(cg, random_plan(cg, seed=seed), x)


class _Float32Attention(nn.Module):
    """EfficientViT's linear attention in small: a region run with autocast off, which export wraps in a
    higher-order op calling a subgraph."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).relu().chunk(3, dim=-1)
        with torch.autocast(device_type="cpu", enabled=False):
            context = k.float().transpose(-1, -2) @ v.float()
            out = (q.float() @ context).to(x.dtype)
        return self.proj(out)


def test_a_region_with_autocast_off_is_inlined_and_its_channels_are_free() -> None:
    torch.manual_seed(0)
    model, x = _Float32Attention().eval(), torch.randn(2, 5, 8)
    cg = fxmorph.analyze(model, (x,), capture="export")
    assert not any("autocast" in str(n.target) for n in cg.gm.graph.nodes)  # the subgraph's ops are in the graph
    qkv = next(g for g in cg.groups if any(m.name == "qkv.weight" and m.dim == 0 for m in g.params))
    assert not qkv.pins
    # (no float64 mask oracle: export wrote the cast back to the input's dtype as float32)
    small, report = fxmorph.shrink(model, "50%", (x,), capture="export", round_to=1, return_report=True)
    assert type(small) is _Float32Attention and small.qkv.out_features < 24, report.delivery  # proven equal
    assert report.flops_after <= report.budget_flops
