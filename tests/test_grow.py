"""fxmorph.grow, the grow pass and the growing side of the width pass: the function is kept at the
moment of growth for every init, new weights get a gradient, budgets are met, errors are clear."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph.passes import PASSES
from fxmorph.passes.base import PassContext
from fxmorph.passes.grow import GrowPass
from fxmorph.passes.grow_probe import bridges
from fxmorph.passes.grow_select import extend_spectrum, greedy_grow_widths, growth_options, uniform_grow_widths
from fxmorph.passes.width import WidthPass
from fxmorph.validate import frozen_mode
from tests.zoo import build, example_input

INITS = ["auto", "gradmax", "dual", "net2net", "zero"]
ZOO = ["resnet18", "mobilenet_v2", "densenet121", "vit_b_16"]
MAX_DIFF: dict[str, float] = {}
"""Measured max |output difference| per case (printed at the end of the module with ``-s``)."""


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs(one_thread: None) -> Any:
    """Runs the module on one thread (see conftest) and prints the measured differences at the end."""
    yield
    for case, diff in sorted(MAX_DIFF.items()):
        print(f"max |diff| {case}: {diff:.2e}")


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((k, float(v.double().sum())) for k, v in model.state_dict().items()), model.training


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with frozen_mode(model), torch.no_grad():
        return model(x)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((_eval(a, x) - _eval(b, x)).abs().max())


def _trains(model: nn.Module, x: torch.Tensor) -> None:
    """Train-mode forward and backward run and give every parameter a finite gradient (uses ``model``)."""
    model.train()
    model(torch.cat([x, x])).float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _mlp(act: type[nn.Module], bn: bool = False, widths: tuple[int, ...] = (10, 16, 12, 3)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b), act()] if bn else [act()]
    return nn.Sequential(*layers)


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))  # fmt: skip


def _trained_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give the BatchNorms non-trivial running statistics (as a trained model has), return eval model."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _realistic(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Outputs of order one, as a trained model gives: BatchNorm statistics from a train-mode pass over
    random inputs, and random weights in Linears that ``weights=None`` leaves at zero (ViT's head)."""
    generator = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02, generator=generator)
    with torch.no_grad():
        model.train()(torch.randn((4, *x.shape[1:]), generator=generator))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


def _data(x: torch.Tensor, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(x, torch.randint(0, classes, (x.shape[0],), generator=generator))]


def _spread(cg: fxmorph.ChannelGraph) -> dict[int, int]:
    """Six growable groups spread over the model: its first three, one in the middle, its last two."""
    ids = [g.id for g in cg.groups if g.growable]
    picked = ids[:3] + ids[len(ids) // 2 : len(ids) // 2 + 1] + ids[-2:]
    return dict.fromkeys(sorted(set(picked)), 3)


# -- the zoo: function kept for every init, results consistent and trainable ------------------------


@pytest.fixture(scope="module")
def zoo_cases() -> Iterator[Callable[[str], tuple[nn.Module, torch.Tensor, fxmorph.ChannelGraph]]]:
    """Each zoo model built, given realistic statistics and analysed once for the module (five inits share
    it); the tests grow deep copies, and the channel graph is only read (groups and the cost model, which
    do not depend on the dtype the net2net cases convert to)."""
    cases: dict[str, tuple[nn.Module, torch.Tensor, fxmorph.ChannelGraph]] = {}

    def case(name: str) -> tuple[nn.Module, torch.Tensor, fxmorph.ChannelGraph]:
        if name not in cases:
            cases.clear()  # the tests run model by model: keep one (ViT-B/16 alone holds 350 MB)
            x = example_input(name, 2)
            model = _realistic(build(name), x)
            cases[name] = model, x, fxmorph.analyze(model, (x,))
        model, x, cg = cases[name]
        return copy.deepcopy(model), x, cg

    yield case
    cases.clear()


# the heavier models run every init under ``-m slow`` only; by default the automatic choice and the dual init
_HEAVY = ("densenet121", "vit_b_16")
_CASES = [
    (name, init) if name not in _HEAVY or init in ("auto", "dual") else pytest.param(name, init, marks=pytest.mark.slow)
    for name in ZOO
    for init in INITS
]


@pytest.mark.parametrize(("name", "init"), _CASES)
def test_zoo_growth_preserves_function(
    name: str, init: str, zoo_cases: Callable[[str], tuple[nn.Module, torch.Tensor, fxmorph.ChannelGraph]]
) -> None:
    """Six groups (residual, depthwise, concat segments, MLP hidden dims among them) grow by 3 channels:
    output change at most 1e-5 (float32, eval; outputs of order one; Net2Net on the CNNs in float64, at
    most 1e-10),
    ``check`` passes, the counted FLOPs equal the cost model's, the user's model is untouched, and the
    result trains."""
    model, x, cg = zoo_cases(name)
    bound = 1e-5
    if init == "net2net" and name != "vit_b_16":  # exact, but float32 rounds the split sums differently:
        model, x, bound = model.double(), x.double(), 1e-10  # up to 1.1e-5 on mobilenet_v2 (ViT: 1.8e-6)
    before = _fingerprint(model)
    channels = _spread(cg)
    data = _data(x, 1000) if init in ("auto", "gradmax", "dual") else None
    big, report = fxmorph.grow(model, (x,), channels=channels, data=data, loss_fn=F.cross_entropy, init=init,
                               rank=4, batches=1, return_report=True)  # fmt: skip
    assert _fingerprint(model) == before
    diff = _max_diff(model, big, x)
    MAX_DIFF[f"{name}/{init}"] = diff
    assert float(_eval(model, x).abs().max()) > 0.1  # a test that can fail
    assert diff <= bound
    fxmorph.check(big, (x,))
    widths = {g: cg.groups[g].size + k for g, k in channels.items()}
    recorded = fxmorph.metadata(big)["fxmorph.flops"]
    assert recorded == fxmorph.CostModel(cg).flops(widths) == fxmorph.count_flops(big, (x,))
    assert {r["id"]: r["after"] for r in report.groups} == widths
    if init in ("gradmax", "dual", "net2net", "zero"):
        assert all(r["init"] == init or r["note"].startswith(f"{init} -> ") for r in report.groups)
    _trains(big, x)


def test_vit_skips_residual_stream_with_reason() -> None:
    """ViT's residual stream is read by LayerNorms: it is skipped, the reason recorded; MLPs grow."""
    model, x = build("vit_b_16"), example_input("vit_b_16")
    big, report = fxmorph.grow(model, (x,), channels=8, init="zero", return_report=True)
    assert any("LayerNorm" in reason for reason in report.skipped.values())
    assert report.groups and all("mlp" in r["made_by"] for r in report.groups)
    assert _max_diff(model, big, x) <= 1e-5


# -- gradients of new weights, behind ReLU and behind BatchNorm ------------------------------------

ARCHS = {
    "mlp-relu": lambda: _mlp(nn.ReLU),
    "mlp-gelu": lambda: _mlp(nn.GELU),
    "mlp-bn-relu": lambda: _mlp(nn.ReLU, bn=True),
    "cnn-bn-relu": _cnn,
}


def _arch_input(arch: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn((32, 3, 8, 8) if arch.startswith("cnn") else (64, 10), generator=generator)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_new_weights_get_gradient(arch: str, init: str) -> None:
    """After growth, one train-mode backward gives the new channels' weights a nonzero gradient (fan-in
    for gradmax, fan-out for dual and zero, both for net2net), finite and no larger than 10x the old
    weights' largest (no 1/sqrt(eps) blow-up behind BatchNorm); the function is kept (float64)."""
    torch.manual_seed(0)
    x = _arch_input(arch)
    model = _trained_stats(ARCHS[arch]().double(), x.double())
    x = x.double()
    data = _data(x, 3 if arch.startswith("mlp") else 5) if init in ("auto", "gradmax", "dual") else None
    big, report = fxmorph.grow(model, (x,), channels=4, data=data, loss_fn=F.cross_entropy, init=init,
                               return_report=True)  # fmt: skip
    diff = _max_diff(model, big, x)
    MAX_DIFF[f"{arch}/{init}"] = diff
    assert diff <= 1e-12
    big.train()
    F.cross_entropy(big(x), _data(x, 3 if arch.startswith("mlp") else 5)[0][1]).backward()
    old, new = _layers(model), _layers(big)
    assert len(report.groups) == len(old) - 1  # every hidden group grew
    assert all(bool(torch.isfinite(m.weight.grad).all()) for m in new)
    # the largest gradient on the weights every layer had before growth (old rows and old columns only)
    kept = [n.weight.grad[: o.weight.shape[0], : o.weight.shape[1]] for o, n in zip(old, new, strict=True)]
    old_max = max(float(g.abs().max()) for g in kept)
    assert old_max > 0
    for k, row in enumerate(report.groups):  # group k: made by layer k, read by layer k + 1
        c = old[k].weight.shape[0]
        fan_in, fan_out = new[k].weight.grad[c:], new[k + 1].weight.grad[:, c:]
        used = row["init"]
        assert row["after"] == c + 4
        got = {"in": float(fan_in.abs().sum()), "out": float(fan_out.abs().sum())}
        expect = {"gradmax": ["in"], "dual": ["out"], "zero": ["out"], "net2net": ["in", "out"]}[used]
        assert all(got[side] > 0 for side in expect), (row, got)
        assert max(float(fan_in.abs().max()), float(fan_out.abs().max())) <= 10 * old_max
    if arch == "mlp-relu" and init == "gradmax":
        assert all(r["init"] == "dual" and "zero slope" in r["note"] for r in report.groups)
    if arch.endswith("bn-relu") and init == "gradmax":
        assert all(r["init"] == "dual" for r in report.groups)
    if arch == "mlp-gelu" and init in ("auto", "gradmax"):
        assert all(r["init"] == "gradmax" for r in report.groups)


@pytest.mark.parametrize("arch", ["mlp-relu", "mlp-bn-relu", "cnn-bn-relu"])
def test_dual_gives_new_channels_more_gradient_than_random(arch: str) -> None:
    """Fan-ins from the bridging operator (with the sign the activation prefers) give the new channels'
    fan-outs a larger first gradient than random fan-ins of the same width."""
    torch.manual_seed(0)
    x = _arch_input(arch)
    model = _trained_stats(ARCHS[arch](), x)
    data = _data(x, 3 if arch.startswith("mlp") else 5)
    norms = {}
    for init in ("dual", "zero"):
        big = fxmorph.grow(model, (x,), channels=4, data=data, loss_fn=F.cross_entropy, init=init)
        F.cross_entropy(big.train()(x), data[0][1]).backward()
        old, new = _layers(model), _layers(big)
        norms[init] = sum(float(new[k + 1].weight.grad[:, m.weight.shape[0] :].norm()) for k, m in enumerate(old[:-1]))
    assert norms["dual"] > 1.15 * norms["zero"], norms


@pytest.mark.parametrize("init", ["dual", "zero", "net2net"])
def test_batchnorm_statistics_of_new_channels(init: str) -> None:
    """New BatchNorm channels: running mean and variance equal their inputs' statistics on the data
    (dual, zero), or copy the split channel's (net2net)."""
    torch.manual_seed(0)
    x = _arch_input("cnn")
    model = _trained_stats(_cnn(), x)
    data = _data(x, 5) if init == "dual" else None
    big = fxmorph.grow(model, (x,), channels=4, data=data, loss_fn=F.cross_entropy, init=init)
    norms = [m for m in big.modules() if isinstance(m, nn.BatchNorm2d)]
    olds = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: list[torch.Tensor] = []
    handles = [bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for bn in norms]
    with torch.no_grad():
        big.eval()(x)
    for h in handles:
        h.remove()
    for bn, old, inp in zip(norms, olds, seen, strict=True):
        c = old.num_features
        mean, var = bn.running_mean[c:], bn.running_var[c:]
        if init == "net2net":
            pairs = set(zip(old.running_mean.tolist(), old.running_var.tolist(), strict=True))
            assert all(pair in pairs for pair in zip(mean.tolist(), var.tolist(), strict=True))
        else:
            values = inp[:, c:].transpose(0, 1).reshape(4, -1)
            assert torch.allclose(mean, values.mean(1), rtol=1e-4, atol=1e-5)
            assert torch.allclose(var, values.var(1), rtol=1e-3, atol=1e-5)


def test_bridging_operator_matches_exact_svd() -> None:
    """The probed singular values equal those of the exact bridging matrix ``sum_n g_out h_in^T``."""
    torch.manual_seed(0)
    model = _mlp(nn.GELU).double()
    x = torch.randn(32, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    cg = fxmorph.analyze(model, (x,))
    found = bridges(cg, [0, 1], [(x, y)], F.cross_entropy, rank=3, seed=0)
    z1 = model[0](x)
    z2 = model[2](model[1](z1))
    z2.retain_grad()
    z3 = model[4](model[3](z2))
    z3.retain_grad()
    F.cross_entropy(z3, y).backward()
    exact = {0: z2.grad.T @ x, 1: z3.grad.T @ model[1](z1)}
    for g in (0, 1):
        top = torch.linalg.svdvals(exact[g].detach())[:2].numpy()
        assert np.allclose(found[g].s[:2], top, rtol=1e-2), (found[g].s, top)  # measured: 2.2e-3


# -- budgets ----------------------------------------------------------------------------------------


def _next_step_flops(model: nn.Module, x: torch.Tensor, round_to: int) -> int:
    """The smallest FLOPs increase of one more growth step in any growable group of ``model``."""
    cg = fxmorph.analyze(model, (x,))
    cost = fxmorph.CostModel(cg)
    steps = []
    for g in cg.groups:
        if g.growable:
            steps.append(cost.flops({g.id: int(growth_options(g.size, round_to, 2.0)[1])}) - cost.flops())
    return min(steps)


def test_budget_met_with_data() -> None:
    """With data, growth lands at most at the budget and less than one step (``round_to`` channels of
    the cheapest group) below it; the function is kept."""
    torch.manual_seed(0)
    model = _mlp(nn.GELU, widths=(20, 32, 32, 10))
    x = torch.randn(64, 20)
    flops = fxmorph.count_flops(model, (x,))
    big, report = fxmorph.grow(model, (x,), budget_flops=int(1.6 * flops), data=_data(x, 10), loss_fn=F.cross_entropy,
                               round_to=4, return_report=True)  # fmt: skip
    assert report.flops_after == fxmorph.count_flops(big, (x,)) <= report.budget_flops
    assert report.budget_flops - report.flops_after < _next_step_flops(big, x, 4)
    assert _max_diff(model, big, x) <= 1e-5


def test_budget_met_without_data_uniform() -> None:
    """Without data, every growable group is scaled by one multiplier (rounded per group), the budget
    is met within one step, and the function is kept."""
    x = example_input("resnet18")
    model = _realistic(build("resnet18"), x)
    big, report = fxmorph.grow(model, (x,), budget_flops="140%", round_to=8, return_report=True)
    assert report.flops_after <= report.budget_flops == int(1.4 * report.flops_before)
    assert report.budget_flops - report.flops_after < _next_step_flops(big, x, 8)
    ratios = [r["after"] / r["before"] for r in report.groups]
    assert len(ratios) == 12 and max(ratios) - min(ratios) <= 0.2, ratios
    assert all(r["after"] % 8 == 0 for r in report.groups)
    assert _max_diff(model, big, x) <= 1e-5


def test_greedy_allocation_follows_gain_per_flop() -> None:
    """Steps go to the group with the most gain per FLOP added; a flat spectrum spreads them."""
    model = _mlp(nn.GELU, widths=(20, 32, 32, 10))
    x = torch.randn(4, 20)
    cost = fxmorph.CostModel(fxmorph.analyze(model, (x,)))
    budget = int(1.3 * cost.flops())
    favour_first = greedy_grow_widths(cost, [0, 1], budget, 4, 4.0, {0: np.array([1.0]), 1: np.array([1e-6])})
    assert favour_first[0] > 32 and favour_first[1] == 32
    uniform = uniform_grow_widths(cost, [0, 1], budget, 4, 4.0)
    assert uniform[0] > 32 and uniform[1] > 32
    assert cost.flops(favour_first) <= budget and cost.flops(uniform) <= budget


def test_spectrum_extension_diminishes() -> None:
    """Beyond the probed singular values, gains fall at least harmonically, from the last one seen."""
    extended = extend_spectrum(np.array([4.0, 1.0, 0.25]), 8)
    assert np.allclose(extended[:3], [4.0, 1.0, 0.25]) and len(extended) == 8
    assert np.all(np.diff(extended) < 0) and extended[3] <= 0.25 * 3 / 4
    assert np.allclose(extend_spectrum(np.array([1.0]), 3), [1.0, 0.5, 1 / 3])


def test_width_pass_grows_above_the_budget() -> None:
    """``shrink(strategy="width")`` with a budget above the model's FLOPs applies a multiplier w > 1
    by growth: same outputs, within one step of the budget."""
    x = example_input("mobilenet_v2")
    model = _realistic(build("mobilenet_v2"), x).double()  # Net2Net splits: exact, float32 rounds ~1e-5
    x = x.double()
    flops = fxmorph.count_flops(model, (x,))
    budget = int(1.5 * flops)
    big = fxmorph.shrink(model, budget, (x,), strategy="width", round_to=8)
    assert fxmorph.metadata(big)["fxmorph.flops"] <= budget
    assert budget - fxmorph.metadata(big)["fxmorph.flops"] < _next_step_flops(big, x, 8)
    assert _max_diff(model, big, x) <= 1e-10
    gm = fxmorph.trace(model, (x,))
    result = WidthPass(budget)(copy.deepcopy(gm), PassContext((x,)))
    assert result.modified and all(after >= before for before, after in result.changes.values())


def test_grow_pass_direct_and_deterministic() -> None:
    """The pass is registered and runs on its own; the same seed gives the same weights."""
    assert PASSES["grow"] is GrowPass and "preserves the function" in (GrowPass.__doc__ or "").lower()
    torch.manual_seed(0)
    model = _mlp(nn.ReLU)
    x = torch.randn(16, 10)
    gm = fxmorph.trace(model, (x,))
    ctx = PassContext((x,), data=_data(x, 3), loss_fn=F.cross_entropy, seed=3)
    first = GrowPass(channels=((0, 5),), init="dual")(copy.deepcopy(gm), ctx)
    second = GrowPass(channels=((0, 5),), init="dual")(copy.deepcopy(gm), ctx)
    assert first.modified and first.changes == {0: (16, 21)} and GrowPass.preserves_function
    for (k, a), (_, b) in zip(first.gm.state_dict().items(), second.gm.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert set(first.plan[0].init) >= {"0.weight", "0.bias", "2.weight"}


def test_channels_by_module_path_and_skips() -> None:
    """``channels`` names groups by module path. An int grows every group that can, and the report says
    why the others were skipped; a mapping that names a group that cannot grow is refused, with the reason
    (it used to be skipped silently, the model returned as it was)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 6)
    big, report = fxmorph.grow(model, (x,), channels={"2": 3}, init="zero", return_report=True)
    assert [(r["before"], r["after"]) for r in report.groups] == [(4, 7)]
    assert _max_diff(model, big, x) <= 1e-6
    _, report = fxmorph.grow(model, (x,), channels=3, init="zero", return_report=True)
    assert [(r["before"], r["after"]) for r in report.groups] == [(4, 7)]
    assert any("LayerNorm" in reason for reason in report.skipped.values())
    with pytest.raises(fxmorph.InputError, match=r"channels asks group 0 to grow, but it cannot: .*LayerNorm"):
        fxmorph.grow(model, (x,), channels={"0": 2, "2": 3}, init="zero")
    with pytest.raises(fxmorph.InputError, match="channels asks group 2 to grow, but it cannot: model output"):
        fxmorph.grow(model, (x,), channels={"4": 2}, init="zero")
    with pytest.raises(fxmorph.InputError, match=r"channels must be a non-negative int .* got -16"):
        fxmorph.grow(model, (x,), channels=-16, init="zero")


# -- bad input --------------------------------------------------------------------------------------


def test_errors() -> None:
    model = _mlp(nn.ReLU)
    x = torch.randn(8, 10)
    data = _data(x, 3)
    flops = fxmorph.count_flops(model, (x,))
    with pytest.raises(fxmorph.InputError, match="needs data"):
        fxmorph.grow(model, (x,), channels=2, init="gradmax")
    with pytest.raises(fxmorph.InputError, match="needs data"):
        fxmorph.grow(model, (x,), channels=2, init="dual")
    with pytest.raises(fxmorph.InputError, match="unknown init"):
        fxmorph.grow(model, (x,), channels=2, init="kaiming")
    with pytest.raises(fxmorph.InputError, match="scalar"):
        fxmorph.grow(model, (x,), channels=2, data=data, init="dual",
                     loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))  # fmt: skip
    with pytest.raises(fxmorph.InputError, match="loss_fn"):
        fxmorph.grow(model, (x,), channels=2, data=data)
    with pytest.raises(fxmorph.InputError, match="exactly one"):
        fxmorph.grow(model, (x,))
    with pytest.raises(fxmorph.InputError, match="module"):
        fxmorph.grow(model, (x,), channels={"nope": 2})
    with pytest.raises(fxmorph.BudgetError, match="above the model's current"):
        fxmorph.grow(model, (x,), budget_flops=0.5)
    with pytest.raises(fxmorph.BudgetError, match="above the model's current"):
        fxmorph.grow(model, (x,), budget_flops=flops - 1)
    with pytest.raises(fxmorph.BudgetError, match="max_factor"):
        fxmorph.grow(model, (x,), budget_flops=100 * flops)
    with pytest.raises(fxmorph.BudgetError):
        fxmorph.grow(model, (x,), budget_flops="lots")
