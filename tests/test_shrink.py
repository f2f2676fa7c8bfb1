"""fxmorph.shrink: budgets met, models that still train, the mask oracle for prune decisions,
exact removal of dead channels, determinism, and clear errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import fxmorph
from fxmorph.passes.base import PassContext
from fxmorph.passes.importance import importance
from fxmorph.passes.prune import PrunePass
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.passes.rounding import BLOCK
from fxmorph.passes.select import greedy_widths, smallest_widths
from fxmorph.passes.width import WidthPass
from fxmorph.testing import run_double
from tests.conftest import assert_close_trees, check_prune
from tests.zoo import CLASSIFICATION, build, example_input

SAMPLE = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "vit_b_16", "convnext_tiny",
          "regnet_x_400mf", "efficientnet_b0", "googlenet", "squeezenet1_0"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 2])
def test_magnitudes_made_a_slab_at_a_time_equal_the_whole_tensor_sums(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, p: int
) -> None:
    """Scores summed over slabs of positions (in reused buffers, so that scoring a large model does not grow the
    process) equal ``|w|^p`` summed at once, ``|w|^p`` in the parameter's dtype, for every dim of 1-D, 2-D and
    4-D parameters, with slabs that do not divide the dim: up to float64 rounding (a float64 slab may be summed in
    another order)."""
    from fxmorph.passes import importance as module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 10, 3), nn.BatchNorm2d(10), nn.Flatten(), nn.Linear(10, 7)).to(dtype)
    gm = torch.fx.symbolic_trace(model)
    monkeypatch.setattr(module, "_SLAB", 23)  # a 10x6x3x3 weight: 2 of 10 positions, 3 of 6, ... per slab
    magnitudes = module._Magnitudes(gm, p)
    for name, param in model.named_parameters():
        powered = param.detach().abs() if p == 1 else param.detach().abs().square()
        for dim in range(param.dim()):
            others = [d for d in range(param.dim()) if d != dim]
            expected = powered.sum(others, dtype=torch.float64) if others else powered.double()
            actual = magnitudes(name, dim)
            np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-14, atol=0, err_msg=f"{name} dim {dim}")


def _trains(model: nn.Module, x: torch.Tensor) -> None:
    """Train-mode forward and backward run and give every parameter a gradient (a loss on every output, so
    GoogLeNet's aux heads, which run in train mode, are trained too)."""
    model = copy.deepcopy(model).train()
    outputs = [t for t in tree_leaves(model(torch.cat([x, x]))) if isinstance(t, torch.Tensor)]
    sum(t.float().square().mean() for t in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


_TRAIN_SIDE = {"inception_v3": 299}
"""Input sides that a model's train-mode forward needs beyond its zoo input: inception_v3's auxiliary head, which
runs only in train mode, pools 5x5 windows of Mixed_6e and convolves the result with a 5x5 kernel (17x17 at 299)."""


def _train_input(name: str, x: torch.Tensor) -> torch.Tensor:
    """An input the model ``name`` trains on: ``x``, or one of the side :data:`_TRAIN_SIDE` gives."""
    side = _TRAIN_SIDE.get(name)
    return x if side is None else torch.randn(*x.shape[:2], side, side)


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((k, float(v.double().sum())) for k, v in model.state_dict().items()), model.training


# Landing on a budget is the cost model's and the greedy selection's business: the zoo test proves the cost
# model on one model per family, the fuzz tests the selection on random architectures. So the default run
# checks budgets on the sample above, whose groups span concatenations, shuffles, depthwise and grouped
# convolutions, squeeze-excite gates, attention and LayerNorm; the whole classification zoo runs under
# ``-m slow``.
@pytest.mark.parametrize(
    "name", [n if n in SAMPLE else pytest.param(n, marks=pytest.mark.slow) for n in CLASSIFICATION]
)
def test_zoo_budgets_met(name: str) -> None:
    """Budgets of 25, 50 and 75% land within 1% (``round_to=1``); one full shrink per model checks it.

    The widths the prune pass picks are evaluated with the cost model for the three budgets (the zoo
    test proves the cost model equals the counted FLOPs after surgery); one whole ``shrink`` per
    model, at a budget that rotates through the three over the zoo, then runs end to end: its result
    is checked (shape replay, unchanged interface), its FLOPs counted, and it trains.
    """
    model, x = build(name), example_input(name)
    before = _fingerprint(model)
    cg = fxmorph.analyze(model, (x,))
    cost = fxmorph.CostModel(cg)
    scores = importance(cg, "l1")
    scores = {g.id: scores[g.id] for g in cg.free_groups}
    smallest = cost.flops(smallest_widths(cost, list(scores), 1, 1, 0.9))
    for share in (0.25, 0.5, 0.75):
        budget = math.floor(share * cost.flops())
        if budget < smallest:  # the pinned part may forbid 25%: shrink must then say so
            assert share == 0.25, f"{name}: {share} unreachable"
            with pytest.raises(fxmorph.BudgetError, match="smallest is"):
                fxmorph.shrink(model, share, (x,), round_to=1, max_prune=0.9)
            continue
        achieved = cost.flops(greedy_widths(cost, scores, budget, 1, 1))
        assert 0.99 * budget <= achieved <= budget, f"{name} at {share}: {achieved} for budget {budget}"
    share = (0.5, 0.75, 0.25)[CLASSIFICATION.index(name) % 3]
    share = 0.5 if math.floor(share * cost.flops()) < smallest else share
    small, report = fxmorph.shrink(model, share, (x,), round_to=1, return_report=True)
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    _trains(small, _train_input(name, x))
    assert _fingerprint(model) == before, "the user's model changed"


@pytest.mark.parametrize("name", SAMPLE)
def test_default_round_to_within_one_step(name: str) -> None:
    model, x = build(name), example_input(name)
    small, report = fxmorph.shrink(model, "50%", (x,), return_report=True)
    assert report.flops_after <= report.budget_flops
    # Half the FLOPs is within reach of multiples of 16 on every model of the sample: "auto" keeps them.
    assert report.settings["rounding"].startswith(f"multiples of {BLOCK} (")
    # A group an axis holds several times (a ViT's embedding, once per head) fills blocks with fewer elements.
    copies = {g.id: g.copies for g in fxmorph.analyze(model, (x,)).groups}
    assert all(r.after * copies[r.id] % BLOCK == 0 or r.after == r.before for r in report.groups)
    cost = fxmorph.CostModel(fxmorph.analyze(small, (x,)))
    # The budget is missed by less than one rounding step of the costliest group.
    step = max(cost.flops({g.id: g.size + BLOCK}) - cost.flops() for g in cost.cg.free_groups)
    assert report.budget_flops - report.flops_after <= step


@pytest.mark.parametrize("name", SAMPLE)
def test_prune_decisions_obey_mask_oracle(name: str) -> None:
    model, x = build(name), example_input(name)
    cg = fxmorph.analyze(model, (x,))
    budget = fxmorph.CostModel(cg).flops() // 2
    result = PrunePass(budget, round_to=1)(cg.gm, PassContext((x,)))
    assert result.plan
    check_prune(cg, result.plan, x)
    width = WidthPass(budget, round_to=1)(cg.gm, PassContext((x,)))
    check_prune(cg, width.plan, x)


def test_same_call_twice_gives_same_model() -> None:
    model, x = build("resnet18"), example_input("resnet18")
    a = fxmorph.shrink(model, 0.5, (x,), criterion="random", seed=3)
    b = fxmorph.shrink(model, 0.5, (x,), criterion="random", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_remove_dead_batchnorm_channels_is_exact() -> None:
    model, x = build("resnet50"), example_input("resnet50")
    with torch.no_grad():
        # layer1.0.bn2 feeds a 1x1 conv (no padding): its dead channels fold into conv3's bias.
        model.layer1[0].bn2.weight[[1, 5, 9, 20]] = 0.0
        # layer1.0.bn1 feeds a padded 3x3 conv: folding would be inexact, so those channels stay.
        model.layer1[0].bn1.weight[[2, 3]] = 0.0
        # zero fan-out: nobody reads layer2.0.conv1's channels 4 and 7.
        model.layer2[0].conv2.weight[:, [4, 7]] = 0.0
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        # ...with a positive beta, so relu(beta) > 0 (a zero constant would go: padding adds zeros to zeros)
        model.layer1[0].bn1.bias[[2, 3]] = 0.25
    cg = fxmorph.analyze(model, (x,))
    result = RemoveDeadPass()(cg.gm, PassContext((x,)))
    small = result.gm
    assert small.get_submodule("layer1.0.conv2").out_channels == 60
    assert small.get_submodule("layer1.0.conv1").out_channels == 64
    assert small.get_submodule("layer2.0.conv1").out_channels == 126
    assert small.get_submodule("layer1.0.conv3").bias is not None
    fxmorph.check(small, (x,))
    assert_close_trees(run_double(small, x), run_double(model, x), rtol=1e-9, what="remove-dead")
    assert fxmorph.count_flops(small, (x,)) < fxmorph.count_flops(model, (x,))


def test_budget_already_met_returns_equivalent_copy() -> None:
    model, x = build("mobilenet_v3_small"), example_input("mobilenet_v3_small")
    small = fxmorph.shrink(model, 1.0, (x,))
    assert small is not model
    assert_close_trees(run_double(small, x), run_double(model, x), rtol=1e-9)
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not any(t.untyped_storage().data_ptr() in theirs for t in (*small.parameters(), *small.buffers()))


@pytest.mark.parametrize("calibrate", [False, True])
def test_shrink_of_a_model_in_train_mode_shares_and_writes_nothing(calibrate: bool) -> None:
    """Regression: calibration batches ran the model in its own mode, so a model in train mode had its
    BatchNorm statistics rewritten (and judged) from batch statistics; and the result must never share
    storage with the user's model (shrink copies nothing up front)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).train()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    before = copy.deepcopy(model.state_dict())
    data = [(torch.rand(4, 3, 8, 8), None) for _ in range(3)]
    small = fxmorph.shrink(model, 0.5, (data[0][0],), data=data, calibrate=calibrate, round_to=1)
    assert small.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    kept = small.get_submodule("1")
    assert kept.num_batches_tracked.item() == 0  # no calibration batch updated the running statistics
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not any(t.untyped_storage().data_ptr() in theirs for t in (*small.parameters(), *small.buffers()))


def test_report_lists_widths_pins_and_dropped_aux_heads() -> None:
    from torchvision.models.googlenet import InceptionAux

    model, x = build("googlenet"), example_input("googlenet")
    model.aux_logits = True
    model.aux1, model.aux2 = InceptionAux(512, 1000), InceptionAux(528, 1000)
    small, report = fxmorph.shrink(model, 0.5, (x,), return_report=True)
    assert report.dropped_modules == ("aux1", "aux2")
    assert "aux1, aux2" in report.table()
    _trains(small, x)
    assert fxmorph.metadata(small)["fxmorph.report"] is report
    assert report.flops_after <= report.budget_flops
    assert any(r.after < r.before for r in report.groups)
    assert any(r.pinned and "model output" in r.pinned for r in report.groups)
    text = report.table()
    assert "FLOPs" in text and "params" in text
    assert report.to_dict()["flops_ratio"] == pytest.approx(report.flops_after / report.flops_before)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("budget", [0, -1, float("nan"), "abc", "150%", True, None])
def test_bad_budgets(budget: object) -> None:
    model, x = build("resnet18"), example_input("resnet18")
    with pytest.raises(fxmorph.BudgetError, match="budget"):
        fxmorph.shrink(model, budget, (x,))


def test_unreachable_budget_states_smallest() -> None:
    model, x = build("resnet18"), example_input("resnet18")
    with pytest.raises(fxmorph.BudgetError, match="smallest is"):
        fxmorph.shrink(model, 1000, (x,))


def test_nothing_to_prune() -> None:
    with pytest.raises(fxmorph.BudgetError, match="smallest is"):
        fxmorph.shrink(_Tiny(), 0.5, (torch.randn(2, 10),))


def test_inputs_that_do_not_fit() -> None:
    with pytest.raises(fxmorph.TraceError, match="example inputs"):
        fxmorph.shrink(build("resnet18"), 0.5, (torch.randn(1, 5, 32, 32),))


def test_taylor_needs_data() -> None:
    with pytest.raises(fxmorph.InputError, match="taylor"):
        fxmorph.shrink(build("resnet18"), 0.5, (example_input("resnet18"),), criterion="taylor")


def test_unknown_criterion_and_strategy() -> None:
    x = example_input("resnet18")
    with pytest.raises(fxmorph.InputError, match="criterion"):
        fxmorph.shrink(build("resnet18"), 0.5, (x,), criterion="magic")
    with pytest.raises(fxmorph.InputError, match="strategy"):
        fxmorph.shrink(build("resnet18"), 0.5, (x,), strategy="magic")


def test_loss_must_be_scalar() -> None:
    x = example_input("resnet18", batch=2)
    data = [(x, torch.tensor([1, 2]))]
    with pytest.raises(fxmorph.InputError, match="scalar"):  # as grow and morph say it
        fxmorph.shrink(build("resnet18"), 0.5, (x,), criterion="taylor", data=data,
                       loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))  # fmt: skip


class _Silent(nn.Module):
    """Channels 1 and 6 of ``a`` never fire on non-negative inputs (negative weights and bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.weight[[1, 6]] = -self.a.weight[[1, 6]].abs()
            self.a.bias[[1, 6]] = -0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def test_remove_dead_with_calibration_removes_silent_relu_channels() -> None:
    torch.manual_seed(0)
    model = _Silent().eval()
    data = [(torch.rand(4, 3, 8, 8), None) for _ in range(3)]
    x = data[0][0]
    cg = fxmorph.analyze(model, (x,))
    assert not RemoveDeadPass()(cg.gm, PassContext((x,), data=data)).modified
    result = RemoveDeadPass(calibrate=True)(cg.gm, PassContext((x,), data=data))
    assert result.gm.get_submodule("a").out_channels == 6
    for batch, _ in data:
        assert_close_trees(run_double(result.gm, batch), run_double(model, batch), rtol=1e-9)
    small = fxmorph.shrink(model, 1.0, (x,), data=data, calibrate=True)
    assert small.get_submodule("a").out_channels == 6


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "regnet_x_400mf"])
def test_remove_dead_on_zoo_models_with_zeroed_batchnorms(name: str) -> None:
    """A quarter of every BatchNorm's scales set to zero by hand: removal keeps the function (float64, up
    to the float32 rounding of folded biases) and lowers the FLOPs. Channels whose constant is exactly 0
    where they are read go even through padded or concatenated paths (relu of a negative beta), and
    folded biases are created and sliced where the reading layer had none (MobileNetV3's 1x1 convs)."""
    model = build(name)
    x = example_input(name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                dead = torch.randperm(bn.num_features, generator=generator)[: bn.num_features // 4]
                bn.weight[dead] = 0.0
                bn.bias.uniform_(-0.5, 0.5, generator=generator)
                bn.running_var.uniform_(0.5, 1.5, generator=generator)
    cg = fxmorph.analyze(model, (x,))
    result = RemoveDeadPass()(cg.gm, PassContext((x,)))
    assert result.modified
    fxmorph.check(result.gm, (x,))
    assert_close_trees(run_double(result.gm, x), run_double(model, x), rtol=1e-7, what="remove-dead")
    assert fxmorph.count_flops(result.gm, (x,)) < fxmorph.count_flops(model, (x,))


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "vit_b_16", "mobilenet_v3_small"])
def test_cost_of_single_steps_equals_cost_of_whole_vectors(name: str) -> None:
    """``flops_steps``/``params_steps`` (which read only the changed groups' columns) give exactly the
    FLOPs and parameters of the width vector with that one group changed, from any starting widths."""
    cost = fxmorph.CostModel(fxmorph.analyze(build(name), (example_input(name),)))
    rng = np.random.default_rng(0)
    free = [g.id for g in cost.cg.free_groups]
    for _ in range(3):
        w = cost.widths({g: int(rng.integers(1, cost.sizes[g] + 1)) for g in free})
        steps = [(g, int(rng.integers(1, 2 * cost.sizes[g] + 1))) for g in rng.choice(free, 20)]
        for (g, width), flops, params in zip(steps, cost.flops_steps(w, steps), cost.params_steps(w, steps),
                                             strict=True):  # fmt: skip
            moved = w.copy()
            moved[g] = width
            assert (int(flops), int(params)) == (cost.flops(moved), cost.params(moved))


def test_protect_matches_whole_path_components() -> None:
    """``protect=["fc1"]`` keeps fc1's group whole and leaves ``fc10`` free (a prefix ends at a ``.``)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc10, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc10(torch.relu(self.fc1(x)))))

    x = torch.randn(2, 8)
    small = fxmorph.shrink(Net(), 0.5, (x,), protect=["fc1"], round_to=1)
    assert small.get_submodule("fc1").out_features == 32
    assert small.get_submodule("fc10").out_features < 32
