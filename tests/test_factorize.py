"""The factorize pass: exact low-rank splits of Linear and convolution layers, and shrink(factorize=...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import fxmorph
from fxmorph.meta import FACTORS_KEY
from fxmorph.passes import FactorizePass, MergeFactorsPass, PassContext, Pipeline
from fxmorph.passes.factorize import factorizable
from fxmorph.testing import masked_reference, random_plan
from tests.conftest import MLP


def _mlp(low_rank: bool = False) -> nn.Module:
    """A small MLP; ``low_rank``: its first layer's weight has rank 4 plus a little noise, as trained
    layers' weights are often close to low rank (then a split pays)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10))
    if low_rank:
        with torch.no_grad():
            model[1].weight.copy_(torch.randn(40, 4) @ torch.randn(4, 64) / 8 + 1e-3 * torch.randn(40, 64))
    return model


def _pairs_pay(gm: nn.Module) -> bool:
    """Every factorized pair left costs less than the single layer it stands for."""
    for path in fxmorph.metadata(gm).get(FACTORS_KEY, {}):
        first, second = gm.get_submodule(f"{path}.0").weight, gm.get_submodule(f"{path}.1").weight
        rank, fan_in, out = first.shape[0], first[0].numel(), second.shape[0]
        if rank * (fan_in + out) >= fan_in * out:
            return False
    return True


class ConvZoo(nn.Module):
    """Every convolution kind the pass splits, with the options the first factor must keep."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(3, 12, (3, 5), stride=(1, 2), padding=(1, 2), padding_mode="circular", bias=False)
        self.c3 = nn.Conv3d(2, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.c2(b)).mean((2, 3)).sum(1)
        return self.c1(a).mean((1, 2)) + y + self.c3(c).mean((1, 2, 3, 4))


def _factorize(model: nn.Module, inputs: tuple[torch.Tensor, ...], **options: object) -> torch.fx.GraphModule:
    return Pipeline([FactorizePass(**options)])(fxmorph.trace(model, inputs), PassContext(inputs)).gm  # type: ignore[arg-type]


def test_mlp_split_is_exact_and_costs_rank_times_in_plus_out() -> None:
    model, x = _mlp().double(), torch.randn(8, 1, 8, 8, dtype=torch.float64)
    gm = _factorize(model, (x,))
    assert (gm(x) - model(x)).abs().max() <= 1e-12
    assert gm.meta[FACTORS_KEY] == {"1": {"rank": 40, "full_rank": 40}, "3": {"rank": 24, "full_rank": 24},
                                    "5": {"rank": 10, "full_rank": 10}}  # fmt: skip
    assert gm.get_submodule("1.0").bias is None and gm.get_submodule("1.1").in_features == 40
    macs = 40 * (64 + 40) + 24 * (40 + 24) + 10 * (24 + 10)
    assert fxmorph.count_flops(gm, (x[:1],)) == 2 * macs


def test_convolutions_of_every_dimension_keep_their_options() -> None:
    torch.manual_seed(0)
    model = ConvZoo().double().eval()
    inputs = (torch.randn(2, 3, 20, dtype=torch.float64), torch.randn(2, 3, 9, 10, dtype=torch.float64),
              torch.randn(2, 2, 4, 5, 6, dtype=torch.float64))  # fmt: skip
    gm = _factorize(model, inputs)
    assert set(gm.meta[FACTORS_KEY]) == {"c1", "c2", "c3"}  # the depthwise convolution is skipped
    assert gm.get_submodule("c1.0").padding_mode == "reflect" and gm.get_submodule("c1.0").dilation == (2,)
    assert gm.get_submodule("c2.1").kernel_size == (1, 1) and gm.get_submodule("c2.1").bias is None
    assert gm.get_submodule("c3.1").bias is not None
    assert (gm(*inputs) - model(*inputs)).abs().max() <= 1e-10


def _vit_ti_16() -> nn.Module:
    """ViT-B/16's architecture at a quarter of its width (ViT-Ti/16: 12 blocks of 3 heads, 192 channels)."""
    return VisionTransformer(64, 16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=10)


# ViT-B/16's 768-wide layers make it this file's slowest case (a minute of SVDs, float32 and float64): by
# default the same architecture runs at a quarter of the width, ViT-B/16 itself under ``-m slow``.
@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "vit_ti_16", pytest.param("vit_b_16", marks=pytest.mark.slow)]
)
def test_zoo_split_preserves_the_function(name: str) -> None:
    """Exact in float64; in float32 the factors' rounding stays within 1e-5 of the output's scale."""
    torch.manual_seed(0)
    if name == "vit_ti_16":
        model = _vit_ti_16().eval()
    else:
        size = {"image_size": 64} if name.startswith("vit") else {}
        model = getattr(torchvision.models, name)(weights=None, num_classes=10, **size).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for p in model.parameters():  # no all-zero head (vit_b_16's), so the outputs have a scale
            p.add_(1e-3 * torch.randn_like(p))
        gm = _factorize(model, (x,))
        assert len(gm.meta[FACTORS_KEY]) >= 20
        reference = model(x)
        assert (gm(x) - reference).abs().max() <= 1e-5 * reference.abs().max()
        exact = _factorize(model.double(), (x.double(),))
        assert (exact(x.double()) - model(x.double())).abs().max() <= 1e-10 * reference.abs().max()


def test_random_plans_on_a_factorized_model_match_the_mask_oracle() -> None:
    model, x = _mlp().double(), torch.randn(8, 1, 8, 8, dtype=torch.float64)
    gm = _factorize(model, (x,))
    cg = fxmorph.analyze(gm)
    assert len(cg.free_groups) == 5  # two rank groups, two hidden layers, the last layer's rank
    for seed in range(5):
        plan = random_plan(cg, seed=seed)
        small = fxmorph.resize(cg, plan)
        assert (small(x) - masked_reference(cg, plan, x)).abs().max() <= 1e-10


def test_energy_keeps_the_rank_of_a_low_rank_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64))
    x = torch.randn(5, 30)
    gm = _factorize(model, (x.double(),), energy=0.999999)
    assert gm.meta[FACTORS_KEY]["0"]["rank"] == 3 and gm.get_submodule("0.0").out_features == 3
    assert (gm(x.double()) - model(x.double())).abs().max() <= 1e-9
    assert _factorize(model.float(), (x,), energy=0.5).meta[FACTORS_KEY]["0"]["rank"] <= 2


def test_targets_skips_and_a_second_run() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(self.a(x)) + self.b(x))

    model, x = Shared(), torch.randn(2, 6)
    traced = fxmorph.trace(model, (x,))
    reasons = factorizable(traced)
    assert "called 2 times" in str(reasons["a"]) and "shared" in str(reasons["b"]) and reasons["c"] is None
    gm = Pipeline([FactorizePass()])(fxmorph.trace(model, (x,)), PassContext((x,))).gm
    assert set(gm.meta[FACTORS_KEY]) == {"c"}
    again = Pipeline([FactorizePass()])(gm, PassContext((x,)))
    assert not again.records[0]["modified"] and set(again.gm.meta[FACTORS_KEY]) == {"c"}
    assert "already factorized" in str(factorizable(gm)["c.0"])
    assert not Pipeline([FactorizePass(("c",))])(gm, PassContext((x,))).records[0]["modified"]
    with pytest.raises(fxmorph.PassError, match="'a' cannot be factorized: a is called 2 times"):
        Pipeline([FactorizePass(("a",))])(fxmorph.trace(model, (x,)), PassContext((x,)))
    with pytest.raises(fxmorph.InputError, match="'a' cannot be factorized: a is called 2 times, not once"):
        fxmorph.shrink(model, 0.5, (x,), factorize=["a"])
    with pytest.raises(fxmorph.PassError, match="no Linear or convolution at or under 'fc'; the model's are: a, b, c"):
        _factorize(model, (x,), targets=("fc",))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"energy": 0.0}, "energy must lie in"),
        ({"energy": True}, "energy must lie in"),
        ({"targets": "fc1"}, "targets must be a tuple of module paths"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(fxmorph.InputError, match=message):
        FactorizePass(**options)  # type: ignore[arg-type]


def test_shrink_with_factorize_meets_the_budget_round_trips_and_exports(tmp_path: Path) -> None:
    model, x = _mlp(low_rank=True), torch.randn(4, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = fxmorph.shrink(model, 0.2, (x,), round_to=1, factorize=["1"], return_report=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model
    assert isinstance(small.get_submodule("1"), nn.Sequential) and isinstance(small.get_submodule("3"), nn.Linear)
    assert small.get_submodule("1.0").out_features < 40
    assert report.flops_before == fxmorph.count_flops(model, (x,))
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops == int(0.2 * report.flops_before)
    assert _pairs_pay(small)
    assert report.settings["factorize"] == ["1"] and report.passes[0]["pass"] == "factorize"
    assert small(x).shape == model(x).shape
    fxmorph.check(small, (x,))
    fxmorph.save(small, tmp_path / "small.pt")
    again = fxmorph.load(tmp_path / "small.pt", model)
    assert torch.equal(again(x), small(x))
    fxmorph.save(small, tmp_path / "with_original.pt", original=model, example_inputs=(x,))
    assert torch.equal(fxmorph.load(tmp_path / "with_original.pt", model)(x), small(x))
    fxmorph.export_onnx(small, (x,), tmp_path / "small.onnx")  # raises on a mismatch with torch


def _low_rank_convs(model: nn.Module, rank: int) -> nn.Module:
    """Every 3x3 convolution of ``model`` cut to rank ``rank`` (its weight as an out x in*9 matrix), so
    that splitting it pays and the pairs survive pruning."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                u, s, vh = torch.linalg.svd(m.weight.flatten(1), full_matrices=False)
                m.weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(m.weight.shape))
    return model


def test_shrink_factorize_on_a_cnn_and_its_bad_input() -> None:
    """On a ResNet whose layer4 is low rank, the pairs factorize keeps are all under the named prefix
    (and there are some), each costs less than its product, and the budget is met."""
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None, num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    _low_rank_convs(model.layer4, 16)
    small, report = fxmorph.shrink(model, 0.3, (x,), factorize=["layer4"], round_to=8, return_report=True)
    factors = fxmorph.metadata(small).get(FACTORS_KEY, {})
    assert factors and all(path.startswith("layer4.") for path in factors)  # only what was named
    assert 0.97 * report.budget_flops <= report.flops_after <= report.budget_flops and _pairs_pay(small)
    assert small(x).shape == (1, 10)
    with pytest.raises(fxmorph.InputError, match="factorize must be a list of module path prefixes"):
        fxmorph.shrink(model, 0.5, (x,), factorize="layer4")  # type: ignore[arg-type]
    with pytest.raises(fxmorph.InputError, match="no Linear or convolution at or under 'head'"):
        fxmorph.shrink(model, 0.5, (x,), factorize=["head"])
    batches = iter([(x, torch.tensor([1]))])  # a one-shot iterator cannot feed a pruning that may run again
    with pytest.raises(fxmorph.InputError, match="one-shot iterator, but it is read 3 times here"):
        fxmorph.shrink(model, 0.5, (x,), factorize=["fc"], data=batches, loss_fn=nn.functional.cross_entropy,
                       criterion="taylor")  # fmt: skip


def test_load_refuses_an_original_that_cannot_be_factorized_the_same_way(tmp_path: Path) -> None:
    model, x = _mlp(low_rank=True), torch.randn(4, 1, 8, 8)
    small = fxmorph.shrink(model, 0.3, (x,), round_to=1, factorize=True)
    assert fxmorph.metadata(small)[FACTORS_KEY]
    fxmorph.save(small, tmp_path / "small.pt")
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(fxmorph.SerializationError, match="were factorized, and the original model cannot"):
        fxmorph.load(tmp_path / "small.pt", other)


def test_merge_factors_joins_full_rank_pairs_exactly() -> None:
    model = ConvZoo().double().eval()
    inputs = (torch.randn(2, 3, 20, dtype=torch.float64), torch.randn(2, 3, 9, 10, dtype=torch.float64),
              torch.randn(2, 2, 4, 5, 6, dtype=torch.float64))  # fmt: skip
    split = _factorize(model, inputs)
    joined = Pipeline([MergeFactorsPass()])(split, PassContext(inputs)).gm
    assert fxmorph.metadata(joined)[FACTORS_KEY] == {}
    assert {n: tuple(p.shape) for n, p in joined.named_parameters()} == {
        n: tuple(p.shape) for n, p in model.named_parameters()
    }
    assert (joined(*inputs) - model(*inputs)).abs().max() <= 1e-10
    assert not Pipeline([MergeFactorsPass()])(joined, PassContext(inputs)).records[0]["modified"]


@pytest.mark.parametrize("budget", [0.9, 0.5, 0.1])
def test_shrink_factorize_meets_the_budget_and_keeps_only_pairs_that_pay(budget: float) -> None:
    """A mild budget leaves ranks above the break-even: those layers are pruned again whole, so the
    FLOPs still land on the budget (not under it) and no pair costs more than its product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))  # fmt: skip
    x = torch.randn(4, 1, 28, 28)
    small, report = fxmorph.shrink(model, budget, (x,), round_to=1, factorize=True, return_report=True)
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert _pairs_pay(small)
    factors = fxmorph.metadata(small).get(FACTORS_KEY) or {}
    if budget == 0.9:  # no pair pays at so mild a cut: the last round pruned every layer whole
        assert not factors and "factorize" not in [p["pass"] for p in report.passes]
    else:
        assert factors


def test_factorize_falls_back_to_whole_layers_when_the_split_cannot_reach_the_budget() -> None:
    """With ``round_to=16`` the split model's rank groups cannot thin to half of an 8-32-32-4 MLP: shrink
    prunes the layers whole, as without ``factorize`` (fixed: a BudgetError quoting the split model's
    FLOPs); a budget the model itself cannot reach names the model's own FLOPs."""
    model, x = MLP(), torch.randn(2, 8)
    plain = fxmorph.shrink(model, 0.5, (x,), round_to=16, return_report=True)[1]
    small, report = fxmorph.shrink(model, 0.5, (x,), round_to=16, factorize=True, return_report=True)
    assert report.flops_after == plain.flops_after <= report.budget_flops
    assert not fxmorph.metadata(small).get(FACTORS_KEY) and "factorize" not in [p["pass"] for p in report.passes]
    with pytest.raises(fxmorph.BudgetError, match=r"of 5,632\)"):
        fxmorph.shrink(model, 0.05, (x,), round_to=16, factorize=True)
