"""Region capture on small models no capture takes whole: the largest submodules that capture are bundled into
one graph whose inputs and outputs (the channels crossing into opaque code) are pinned; the result goes back into
the user's model region by region; the budget counts the whole forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmorph
from fxmorph.meta import REGIONS_KEY
from fxmorph.testing import masked_reference, random_plan, run_double
from tests.conftest import assert_close_trees


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Head(nn.Module):
    """Called on a list of feature maps, as a detector's head is: symbolic tracing cannot iterate the list, export
    takes it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = _conv(width, width)
        self.logits = nn.Conv2d(width, 3, 1)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.logits(self.conv(f)) for f in features]


class Detector(nn.Module):
    """A backbone (traces), a head on a list (exports), and Python on tensor values around them (neither):
    a count of positive scores decides how many scores are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_conv(3, 16), _conv(16, 32), _conv(32, 24))
        self.head = Head(24)
        self.temperature = nn.Parameter(torch.ones(1))  # read by the opaque code itself
        self.mix = nn.Parameter(torch.randn(3, 3))  # a product in the opaque code: FLOPs no width changes
        self.unused = nn.Linear(4, 4)  # never called

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        feature = self.backbone(torch.stack(images))
        scores = [torch.einsum("nchw,cd->ndhw", s, self.mix) for s in self.head([feature, feature[..., ::2, ::2]])]
        kept = int((scores[0] > 0).sum().clamp(min=1))  # data-dependent: no capture takes the whole forward
        return [s.flatten(1)[:, :kept] * self.temperature for s in scores]


@pytest.fixture(scope="module")
def detector() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Detector().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity, so the oracle sees them
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, [torch.randn(3, 16, 16), torch.randn(3, 16, 16)]


def test_regions_are_the_largest_submodules_that_capture(detector: tuple[nn.Module, list[torch.Tensor]]) -> None:
    model, images = detector
    cg = fxmorph.analyze(model, (images,))  # auto: fx fails, export fails, regions
    record = cg.gm.meta[REGIONS_KEY]
    assert [(r.path, r.capture) for r in record.regions] == [("backbone", "fx"), ("head", "export")]
    opaque = {o.path: o.reason for o in record.opaque}
    assert set(opaque) == {"", "unused"}
    assert "fx:" in opaque[""] and "export:" in opaque[""] and opaque["unused"] == "never called on the example"
    # the backbone's output crosses into opaque code (torch.stack's result feeds it, the head reads it): pinned
    assert {g.size for g in cg.free_groups} == {16, 32, 24}  # backbone's first two layers, the head's conv
    text = cg.explain()
    assert "captured by regions" in text and "region head (export)" in text and "opaque unused" in text


def test_regions_obey_the_mask_oracle(detector: tuple[nn.Module, list[torch.Tensor]]) -> None:
    model, images = detector
    cg = fxmorph.analyze(model, (images,), capture="regions")
    inputs = cg.gm.meta[REGIONS_KEY].inputs
    plan = random_plan(cg, seed=1)
    small = fxmorph.resize(cg, plan, keep_class=False)
    fxmorph.check(small, inputs)
    assert small.meta["fxmorph.flops"] == fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    assert_close_trees(run_double(small, *inputs), masked_reference(cg, plan, *inputs), 1e-7, what="mask oracle")


def test_regions_shrink_to_a_budget_of_the_whole_forward_as_the_users_class(
    detector: tuple[nn.Module, list[torch.Tensor]],
) -> None:
    model, images = detector
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = fxmorph.shrink(model, 0.5, (images,), round_to=1, return_report=True, keep_class=True)
    assert type(small) is Detector and report.capture == "regions"
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    # the opaque code's FLOPs (its product with ``mix``) are in both totals, a fixed cost
    record = fxmorph.metadata(small)[REGIONS_KEY]
    assert report.flops_before == record.total_flops and record.opaque_flops > 0
    assert report.flops_after == fxmorph.metadata(small)["fxmorph.flops"] + record.opaque_flops
    assert small.backbone[0][0].out_channels < 16 and small.head.conv[0].out_channels < 24
    assert small.backbone[2][0].out_channels == 24  # crosses into the head and the opaque code: pinned
    with torch.no_grad():
        out, ref = small(images), model(images)
    assert [o.shape[0] for o in out] == [r.shape[0] for r in ref]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(line.startswith("opaque unused") for line in report.regions)
    assert "capture regions" in report.table()
    # the recorded interface is the regions' arguments: analysing the result again needs the model's inputs
    with pytest.raises(fxmorph.InputError, match="example_inputs is required"):
        fxmorph.analyze(small)


def test_a_budget_below_the_opaque_code_is_a_budget_error(detector: tuple[nn.Module, list[torch.Tensor]]) -> None:
    model, images = detector
    record = fxmorph.trace(model, (images,)).meta[REGIONS_KEY]
    with pytest.raises(fxmorph.BudgetError, match="outside the captured regions"):
        fxmorph.shrink(model, record.opaque_flops - 1, (images,))


def test_region_capture_refuses_data_and_training_entry_points(
    detector: tuple[nn.Module, list[torch.Tensor]],
) -> None:
    model, images = detector
    with pytest.raises(fxmorph.InputError, match="captured in regions"):
        fxmorph.shrink(model, 0.5, (images,), data=[(images, torch.zeros(2))], loss_fn=lambda o, y: o[0].sum())
    with pytest.raises(fxmorph.InputError, match="grow trains the captured graph"):
        fxmorph.grow(model, (images,), budget_flops="120%")


def test_a_region_sharing_a_tensor_with_opaque_code_stays_opaque() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
            self.alias = self.body[0]  # the same layer, under a second path
            self.tail = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            x = torch.stack(images)
            n = int((x > 0).sum()) % 2  # data-dependent
            return self.tail(self.body(x)) + n

    cg = fxmorph.analyze(Tied().eval(), ([torch.randn(3, 4, 4)],), capture="regions")
    record = cg.gm.meta[REGIONS_KEY]
    assert [r.path for r in record.regions] == ["tail"]
    assert "holds tensor 'body.0.weight'" in {o.path: o.reason for o in record.opaque}["body"]
    assert [g.size for g in cg.free_groups] == [8]


def test_a_model_with_no_region_names_every_capture_in_one_error() -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[: int((x > 0).sum())] * self.weight

    with pytest.raises(fxmorph.TraceError, match=r"(?s)torch\.fx.*torch\.export.*in regions"):
        fxmorph.analyze(Opaque(), (torch.randn(4, 3),))


def test_a_width_the_region_module_states_is_written_back() -> None:
    """A constant in the region module's own forward (a reshape to ``self.width``) comes from its attribute: the
    bundle names the region itself among the modules running there, so write-back finds and sets it."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = 16
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x).relu().reshape(-1, self.width)
            return self.b(h)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = Head()

        def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
            out = self.head(torch.cat(xs))
            return out[: int((out > 0).sum()) + 1]  # data-dependent: regions

    model = Model().eval()
    small, report = fxmorph.shrink(model, 0.5, ([torch.randn(4, 8)],), round_to=1, return_report=True, keep_class=True)
    assert type(small) is Model and report.capture == "regions"
    assert small.head.width == small.head.a.out_features < 16
