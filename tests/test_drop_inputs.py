"""The drop-inputs pass: constant input features folded away, least important ones dropped, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxmorph
from fxmorph.analysis import build_channel_graph
from fxmorph.meta import DROP_KEY
from fxmorph.passes import PASSES, DropInputsPass, GrowPass, PassContext, Pipeline, PrunePass, RemoveDeadPass
from fxmorph.testing import random_plan
from tests.conftest import check_prune, require_mnist


class LeNet(nn.Module):
    """LeNet-300-100 (optionally without fc1's bias)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300, bias=bias), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))


class ViewNet(nn.Module):
    """Input reshaped with a size query and an identity module on the way to the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.id, self.fc1, self.fc2 = nn.Identity(), nn.Linear(48, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.id(x.view(x.size(0), -1)))))


def _model(cls: type[nn.Module] = LeNet, **kwargs: bool) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kwargs).double().eval()


def _run(model: nn.Module, x: torch.Tensor, data: list | None, *passes: fxmorph.passes.Pass) -> fx.GraphModule:
    gm = fxmorph.trace(model, (x,))
    return Pipeline(list(passes))(gm, PassContext((x,), data=data)).gm


def _synthetic(n: int = 256, border: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Images whose 2-pixel border is ``border`` on every sample (MNIST-like), interior random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 28, 28), border, dtype=torch.float64)
    x[:, :, 2:-2, 2:-2] = torch.rand(n, 1, 24, 24, generator=g, dtype=torch.float64)
    return x


def _batches(x: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], torch.zeros(len(x[i : i + size]), dtype=torch.long)) for i in range(0, len(x), size)]


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    require_mnist()
    from fxmorph.io.data import load_mnist

    return load_mnist("train")[0].double()


def test_registered() -> None:
    assert PASSES["drop-inputs"] is DropInputsPass and DropInputsPass.__doc__


def test_mnist_constant_pixels_exact_cheaper_checked(mnist: torch.Tensor, tmp_path: Path) -> None:
    model, x = _model(), mnist[:1]
    before = copy.deepcopy(model.state_dict())
    flat = mnist.reshape(len(mnist), -1)
    constant = flat.amax(0) == flat.amin(0)
    assert int(constant.sum()) == 67  # border pixels that are 0 on all 50,000 training images
    gm = _run(model, x, _batches(mnist, 5000), DropInputsPass())
    info = gm.meta[DROP_KEY]
    assert info["constant"] == torch.nonzero(constant).flatten().tolist() and not info["unimportant"]
    assert gm.fc1.in_features == 784 - 67 and gm.fc1.weight.shape == (300, 717)
    sample = mnist[::25]  # 2,000 calibration images
    assert (_forward(gm, sample) - _forward(model, sample)).abs().max() <= 1e-6
    assert fxmorph.count_flops(model, (x,)) - fxmorph.count_flops(gm, (x,)) == 2 * 67 * 300
    assert fxmorph.count_flops(gm, (sample,)) == 2 * len(sample) * (717 * 300 + 300 * 100 + 100 * 10)
    fxmorph.check(gm, (x,), expected_interface=fxmorph.trace(model, (x,)).meta["fxmorph.interface"])
    assert _forward(gm, mnist[:7]).shape == (7, 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model
    result = fxmorph.export_onnx(gm.float(), (x.float(),), tmp_path / "dropped.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def test_nonzero_constants_fold_into_a_new_bias() -> None:
    model, data = _model(bias=False), _synthetic(border=0.5)
    gm = _run(model, data[:1], _batches(data), DropInputsPass())
    assert gm.fc1.in_features == 24 * 24 and gm.fc1.bias is not None
    assert (_forward(gm, data) - _forward(model, data)).abs().max() <= 1e-6
    other = _synthetic(8, border=0.9, seed=1)  # dropped features off their calibration value
    assert (_forward(gm, other) - _forward(model, other)).abs().max() > 1e-3
    assert torch.allclose(_forward(gm, other), _forward(model, torch.where(data[:1] == 0.5, 0.5, other)))


def test_tolerance_drops_near_constant_features_with_their_mean() -> None:
    model, data = _model(), _synthetic(border=0.5)
    data[:, :, :2, :] += 1e-3 * torch.rand(len(data), 1, 2, 28, dtype=torch.float64)  # top rows jitter
    exact = _run(model, data[:1], _batches(data), DropInputsPass())
    loose = _run(model, data[:1], _batches(data), DropInputsPass(tolerance=2e-3))
    assert exact.fc1.in_features == 784 - 2 * 26 * 2 - 2 * 24 and loose.fc1.in_features == 24 * 24
    mean = data.mean(0, keepdim=True)
    filled = torch.where((data.amax(0) - data.amin(0) > 2e-3), data, mean)
    assert torch.allclose(_forward(loose, data), _forward(model, filled), atol=1e-9)


def _importance_oracle(model: LeNet, data: torch.Tensor | None) -> torch.Tensor:
    score = model.fc1.weight.detach().norm(dim=0)
    return score if data is None else score * data.reshape(len(data), -1).std(0, unbiased=False)


@pytest.mark.parametrize("with_data", [True, False])
def test_keep_drops_exactly_the_least_important(with_data: bool) -> None:
    model, data = _model(), _synthetic(border=0.25)
    calibration = _batches(data) if with_data else None
    gm = _run(model, data[:1], calibration, DropInputsPass(keep=0.5))
    info = gm.meta[DROP_KEY]
    assert gm.fc1.in_features == 392 == len(info["kept"])
    constant = set(info["constant"])
    assert len(constant) == (784 - 576 if with_data else 0)
    score = _importance_oracle(model, data if with_data else None)
    score[list(constant)] = float("inf")
    assert sorted(info["unimportant"]) == sorted(torch.argsort(score)[: 392 - len(constant)].tolist())
    # mask oracle: the original with the importance-dropped features zeroed (constants keep their value)
    probe = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    masked = probe.reshape(16, -1).clone()
    masked[:, info["unimportant"]] = 0.0
    masked[:, info["constant"]] = 0.25
    assert (_forward(gm, probe) - _forward(model, masked.reshape(probe.shape))).abs().max() <= 1e-9


def test_budget_features_and_fold_mean() -> None:
    model, data = _model(), _synthetic(border=0.0)
    gm = _run(model, data[:1], _batches(data), DropInputsPass(budget_features=100, fold_mean=True))
    info = gm.meta[DROP_KEY]
    assert gm.fc1.in_features == 100 and len(info["unimportant"]) == 576 - 100
    filled = data.reshape(len(data), -1).clone()
    filled[:, info["unimportant"]] = data.reshape(len(data), -1)[:, info["unimportant"]].mean(0)
    assert torch.allclose(_forward(gm, data), _forward(model, filled.reshape(data.shape)), atol=1e-9)


def test_later_passes_resize_the_hidden_layers_and_the_kept_features(mnist: torch.Tensor) -> None:
    """After drop-inputs the kept features are a channel group of their own: pruning ranks them
    against the hidden neurons (removing one = zeroing it, the mask oracle), growth leaves them be."""
    model, x = _model(), mnist[:1]
    data = _batches(mnist[:2000], 1000)
    dropped = _run(model, x, data, DropInputsPass())
    cg = build_channel_graph(dropped)
    free = {g.producers[0].name for g in cg.free_groups}
    assert {"fc1.weight", "fc2.weight", "fxmorph_kept_inputs"} <= free
    check_prune(cg, random_plan(cg, seed=0), x)
    budget = fxmorph.count_flops(dropped, (x,)) // 4
    pruned = _run(model, x, data, DropInputsPass(), RemoveDeadPass(calibrate=True), PrunePass(budget, round_to=1))
    kept = dropped.fc1.in_features  # pixels not constant on these 2,000 images
    assert len(pruned.fxmorph_kept_inputs) == pruned.fc1.in_features <= kept < 784
    assert pruned.fc1.out_features < 300 and pruned.fc2.out_features < 100
    assert fxmorph.count_flops(pruned, (x,)) <= budget
    small = fxmorph.shrink(dropped, 0.5, (x,), round_to=1)
    assert small.fc1.in_features <= kept and small.fc1.out_features < 300
    fxmorph.check(small, (x,))
    big = Pipeline([GrowPass(int(1.5 * fxmorph.count_flops(dropped, (x,))))])(dropped, PassContext((x,))).gm
    assert big.fc1.in_features == kept and big.fc1.out_features > 300
    assert (_forward(big, mnist[:64]) - _forward(model, mnist[:64])).abs().max() <= 1e-6  # calibration images


def test_model_with_pruned_features_saves_loads_and_exports(tmp_path: Path) -> None:
    """A shrink that removed kept features round-trips through save/load (the index buffer rebuilt from
    the plan) and matches torch in onnxruntime (a Gather of the shorter index)."""
    x = _synthetic(64)
    dropped = _run(_model().float(), x[:1].float(), _batches(x.float()), DropInputsPass())
    small = fxmorph.shrink(dropped, 0.3, (x[:1].float(),), round_to=1)
    assert len(small.fxmorph_kept_inputs) == small.fc1.in_features < dropped.fc1.in_features
    fxmorph.save(small, tmp_path / "small.pt")
    again = fxmorph.load(tmp_path / "small.pt", dropped)
    assert torch.equal(again.fxmorph_kept_inputs, small.fxmorph_kept_inputs)
    assert torch.equal(_forward(again, x.float()), _forward(small, x.float()))
    fxmorph.export_onnx(small, (x[:2].float(),), tmp_path / "small.onnx")  # raises on a mismatch


def test_reshape_with_size_query_and_identity() -> None:
    torch.manual_seed(0)
    model, data = ViewNet().double().eval(), torch.rand(64, 3, 4, 4, dtype=torch.float64)
    data[:, 0] = 1.0  # the first 16 features are constant
    gm = _run(model, data[:1], _batches(data), DropInputsPass())
    assert gm.fc1.in_features == 32
    assert (_forward(gm, data) - _forward(model, data)).abs().max() <= 1e-6


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


class InputTwice(LeNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.mean()


class FeaturesTwice(LeNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h))))) + h.sum(1, keepdim=True)


@pytest.mark.parametrize(
    ("cls", "why"),
    [(ConvNet, "not a Linear"), (InputTwice, "used by 2 ops"), (FeaturesTwice, "used by 2 ops")],
)
def test_refuses_when_dropping_would_change_other_readers(cls: type[nn.Module], why: str) -> None:
    model, data = _model(cls), _synthetic(32)
    gm = fxmorph.trace(model, (data[:1],))
    result = DropInputsPass(keep=0.5)(gm, PassContext((data[:1],), data=_batches(data)))
    assert not result.modified and result.gm is gm and why in result.note


def test_nothing_to_decide_without_data_or_target() -> None:
    model, x = _model(), _synthetic(1)
    result = DropInputsPass()(fxmorph.trace(model, (x,)), PassContext((x,)))
    assert not result.modified and "no data" in result.note


@pytest.mark.parametrize("options", [{"keep": 0.0}, {"keep": 1.5}, {"budget_features": 0}, {"tolerance": -1.0},
                                     {"keep": 0.5, "budget_features": 10}])  # fmt: skip
def test_bad_options_raise_fxmorph_errors(options: dict) -> None:
    with pytest.raises(fxmorph.InputError):
        DropInputsPass(**options)


def test_budget_above_the_feature_count_is_an_error() -> None:
    model, x = _model(), _synthetic(1)
    with pytest.raises(fxmorph.PassError, match="budget_features=1000 exceeds the 784"):
        _run(model, x, None, DropInputsPass(budget_features=1000))
