"""Tracing: metadata on every node, leaf modules, unreached modules, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxmorph
from tests.zoo import build, example_input


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a tensor value cannot be traced
            return y
        return -y


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.inner = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.stem(x)))


def test_every_tensor_node_has_shape_and_dtype() -> None:
    model, x = build("resnet18"), example_input("resnet18")
    gm = fxmorph.trace(model, (x,))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_module", "call_function", "get_attr"):
            meta = node.meta["tensor_meta"]
            assert meta.dtype == torch.float32 and len(meta.shape) >= 1
    assert gm.meta["fxmorph.flops"] == fxmorph.count_flops(model, (x,))


def test_fake_propagation_gives_the_same_shapes() -> None:
    model, x = build("mobilenet_v3_small"), example_input("mobilenet_v3_small")
    real, fake = fxmorph.trace(model, (x,)), fxmorph.trace(model, (x,), fake=True)
    shapes = [(n.name, tuple(n.meta["tensor_meta"].shape)) for n in real.graph.nodes if "tensor_meta" in n.meta]
    fake_shapes = [(n.name, tuple(n.meta["tensor_meta"].shape)) for n in fake.graph.nodes if "tensor_meta" in n.meta]
    assert shapes == fake_shapes
    assert real.meta["fxmorph.flops"] == fake.meta["fxmorph.flops"]


def test_untraceable_model_names_the_line_and_the_fix() -> None:
    with pytest.raises(fxmorph.TraceError, match=r"test_trace.py:\d+.*if y.sum\(\) > 0") as info:
        fxmorph.trace(Wrapper(), (torch.randn(1, 3, 4, 4),), capture="fx")
    assert "leaf_modules" in str(info.value) and "concrete_args" not in str(info.value)  # no entry point takes it


def test_regions_of_lone_layers_are_captured_only_when_asked_for() -> None:
    """Every region of Wrapper is one layer, so every channel would be pinned: ``"auto"`` raises the capture errors
    (which name the line) rather than return a model with nothing free; ``"regions"`` captures them."""
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(fxmorph.TraceError, match=r"(?s)if y.sum\(\) > 0.*in regions.*holds one layer"):
        fxmorph.trace(Wrapper(), (x,))
    gm = fxmorph.trace(Wrapper(), (x,), capture="regions")
    record = gm.meta["fxmorph.regions"]
    assert [r.path for r in record.regions] == ["stem", "inner.conv", "head"]
    assert [o.path for o in record.opaque] == ["", "inner"]
    assert "test_trace.py" in record.opaque[0].reason  # fx's failure names the user's line


def test_user_leaf_modules_make_it_traceable_and_pin() -> None:
    x = torch.randn(1, 3, 4, 4)
    for leaf in (DataDependent, "inner"):
        cg = fxmorph.analyze(Wrapper(), (x,), leaf_modules=[leaf])
        group = next(g for g in cg.groups if any(p.name == "stem.weight" for p in g.params))
        assert group.pinned is not None and "DataDependent" in group.pinned
        assert not any(p.name.startswith("inner.") for g in cg.groups for p in g.params)


def test_unreached_train_only_modules_are_recorded() -> None:
    googlenet = build("googlenet")
    googlenet.aux_logits = True
    from torchvision.models.googlenet import InceptionAux

    googlenet.aux1, googlenet.aux2 = InceptionAux(512, 1000), InceptionAux(528, 1000)
    gm = fxmorph.trace(googlenet, (example_input("googlenet"),))
    assert gm.meta["fxmorph.unreached"] == ("aux1", "aux2")
    assert googlenet.training is False


def test_training_flags_are_restored() -> None:
    model = build("resnet18").train()
    model.layer1.eval()
    running = model.bn1.running_mean.clone()
    fxmorph.trace(model, (example_input("resnet18"),))
    assert model.training and not model.layer1.training and model.layer2.training
    assert torch.equal(model.bn1.running_mean, running), "tracing must not update BatchNorm statistics"


@pytest.mark.parametrize(
    ("model", "inputs", "match"),
    [
        ("not a model", (torch.randn(1),), "torch.nn.Module"),
        (nn.Linear(3, 2), "tensor please", "example_inputs"),
        (nn.Linear(3, 2), (), "empty"),
        (nn.Linear(3, 2), (torch.randn(2, 5),), "example inputs do not run"),
        (nn.Linear(3, 2).to(torch.complex64), (torch.randn(2, 3),), "dtype"),
    ],
)
def test_bad_inputs_raise_fxmorph_errors(model: object, inputs: object, match: str) -> None:
    with pytest.raises(fxmorph.FxmorphError, match=match):
        fxmorph.analyze(model, inputs)  # type: ignore[arg-type]


def test_meta_device_model_is_refused() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(fxmorph.InputError, match="meta device"):
        fxmorph.trace(model, (torch.randn(2, 3),))


def test_trace_returns_graph_module_with_same_outputs() -> None:
    model, x = build("densenet121"), example_input("densenet121")
    gm = fxmorph.trace(model, (x,))
    assert isinstance(gm, fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_functional_layers_with_parameters_used_directly() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
            self.w2 = nn.Parameter(torch.randn(5, 8))
            self.b2 = nn.Parameter(torch.randn(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(F.conv2d(x, self.w1, padding=1)).mean((2, 3))
            return F.linear(y, self.w2, self.b2)

    cg = fxmorph.analyze(Functional(), (torch.randn(2, 3, 6, 6),))
    group = next(g for g in cg.groups if any(p.name == "w1" and p.dim == 0 for p in g.params))
    assert not group.pins and {p.name for p in group.params} == {"w1", "w2"}


def test_return_types_keep_their_fields_through_shape_propagation() -> None:
    """``h.max(dim=1).values``, ``topk(...).values`` and ``sort(...).values`` trace (fixed: shape propagation
    turned torch.return_types into plain tuples, and every entry point raised a TraceError blaming the inputs).
    Channels that topk and sort reorder are pinned with the reason; the rest still prunes."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c, self.b = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c(torch.relu(self.a(x)))
            v = h.topk(2, dim=0).values.sum(0, keepdim=True) + h.sort(dim=1).values
            return self.b(torch.relu(v + h.max(dim=1, keepdim=True).values))

    model, x = Net().eval(), torch.randn(3, 8)
    cg = fxmorph.analyze(model, (x,))
    assert any("'topk'" in str(g.pinned) for g in cg.groups)
    small = fxmorph.shrink(model, 0.5, (x,), round_to=1)
    assert small(x).shape == (3, 4) and fxmorph.count_flops(small, (x,)) <= fxmorph.count_flops(model, (x,)) // 2


class _LatentPool(nn.Module):
    """timm's attention pooling in small: a learned query (a parameter) expanded over the batch into a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, 1, 8))
        self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(self.latent.expand(x.shape[0], -1, -1))
        return (q @ self.kv(x).transpose(1, 2)).softmax(-1) @ x


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_parameter_expanded_into_a_layer_propagates_and_counts_its_flops(capture: str) -> None:
    # FLOPs counting used to hook every module call and fail on the no_grad view of the parameter
    # ("Expected gradient function to be set": SigLIP and PE ViTs of timm)
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _LatentPool().eval(), torch.randn(2, 5, 8)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    model.requires_grad_(False)  # torch's own counter fails on the view otherwise
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert cg.gm.meta["fxmorph.flops"] == counter.get_total_flops() > 0
