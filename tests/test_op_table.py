"""One op table (issue 14, item 3): rules, remove-dead, growth and surgery's defaults read the same facts.

The table used to be four lists that disagreed. Surgery matched norms by class-name prefix, so a
subclass of ``nn.BatchNorm2d`` (``class MyBN(nn.BatchNorm2d)``, timm's ``BatchNormAct2d``) grew
channels with scale 0 where a stock BatchNorm gets 1: channels that can never train. remove-dead knew a
dozen activations fewer than the rules. Here: new channels of norm subclasses start as the stock
class's do; every form of an op (module, ``F.*``, ``torch.*``, Tensor method) has the same facts; the
facts agree with what PyTorch computes; remove-dead sees through an activation its old list missed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxmorph
from fxmorph.analysis.ops import FUNCTION_OPS, MODULE_OPS, OpKind, module_facts, node_facts
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.passes.base import PassContext
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.surgery.defaults import new_channel_default
from tests.conftest import assert_close_trees

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 3  # channels each test grows by


class MyBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass that keeps the inherited forward: a leaf with the BatchNorm rule."""


class NormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in miniature: its own forward, traced through to ``F.batch_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class MyInstanceNorm(nn.InstanceNorm2d):
    """An InstanceNorm2d subclass (affine, with running statistics)."""


class MyLN(nn.LayerNorm):
    """A LayerNorm subclass."""


class ConvNorm(nn.Module):
    """conv - norm - ReLU - conv: the norm's channels form one growable group."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.conv(x))))


def _randomise(norm: nn.Module) -> None:
    """Existing channels far from the defaults, so a default copied from them would show."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(norm, name).uniform_(2.0, 3.0)
        norm.running_var.uniform_(4.0, 5.0)


def _norm_group(cg: fxmorph.ChannelGraph) -> int:
    (group,) = [g for g in cg.groups if any(p.name == "norm.weight" for p in g.params)]
    return group.id


NORMS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(8),
    "MyBN": lambda: MyBN(8),
    "NormAct": lambda: NormAct(8),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
    "MyInstanceNorm": lambda: MyInstanceNorm(8, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_grown_norm_channels_start_as_the_stock_class(kind: str) -> None:
    """New channels of a norm get weight 1, bias 0, running statistics (0, 1), subclass or not."""
    torch.manual_seed(0)
    model = ConvNorm(NORMS[kind]()).eval()
    _randomise(model.norm)
    x = torch.randn(2, 3, 6, 6)
    cg = fxmorph.analyze(model, (x,))
    gid = _norm_group(cg)
    assert cg.groups[gid].growable
    big = fxmorph.resize(cg, WidthPlan({gid: GroupPlan(tuple(range(8)), NEW)}))
    expected = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    for name, value in expected.items():
        tensor = big.get_submodule("norm").get_parameter(name) if name in ("weight", "bias") else None
        tensor = tensor if tensor is not None else big.get_buffer(f"norm.{name}")
        assert tensor.shape == (8 + NEW,)
        assert torch.equal(tensor[8:], torch.full((NEW,), value)), f"{kind}.{name}: {tensor[8:].tolist()}"
        assert torch.equal(tensor[:8], getattr(model.norm, name))  # the old channels are untouched
    with torch.no_grad():
        assert_close_trees(big(x), model(x), rtol=1e-6, what="growth keeps the function")


def test_grow_gives_a_batchnorm_subclass_trainable_channels() -> None:
    """``fxmorph.grow`` (zero init: growth's own norm constants, matched by isinstance)."""
    torch.manual_seed(0)
    model = ConvNorm(MyBN(8)).eval()
    x = torch.randn(2, 3, 6, 6)
    big = fxmorph.grow(model, (x,), channels=NEW, init="zero")
    weight = big.get_parameter("norm.weight")
    assert weight.shape[0] > 8
    assert torch.equal(weight[8:], torch.ones(weight.shape[0] - 8))


@pytest.mark.parametrize("cls", [nn.LayerNorm, MyLN, nn.GroupNorm])
def test_layer_and_group_norm_subclasses_have_the_stock_defaults(cls: type[nn.Module]) -> None:
    """LayerNorm and GroupNorm groups may not grow (new channels would change the statistics), so
    their defaults are checked where surgery reads them."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
            self.norm = cls(2, 8) if cls is nn.GroupNorm else cls(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.norm(self.fc1(x)))

    gm = fxmorph.trace(Net(), (torch.randn(3, 4),))
    assert new_channel_default(gm, "norm.weight") == 1.0
    assert new_channel_default(gm, "norm.bias") == 0.0
    assert new_channel_default(gm, "fc1.weight") is None  # drawn as PyTorch draws Linear weights
    assert module_facts(cls) is not None and module_facts(cls).kind is OpKind.NORM


def test_functional_norm_parameters_get_the_defaults_of_their_argument() -> None:
    """A norm called as ``F.batch_norm`` on parameters the model holds directly (not norm modules)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.gamma, self.beta = nn.Parameter(torch.rand(8) + 2), nn.Parameter(torch.rand(8) + 2)
            self.register_buffer("mean", torch.rand(8) + 2)
            self.register_buffer("var", torch.rand(8) + 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.0, 1e-5)
            return self.head(F.relu(h))

    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    cg = fxmorph.analyze(model, (x,))
    (gid,) = [g.id for g in cg.groups if any(p.name == "gamma" for p in g.params)]
    big = fxmorph.resize(cg, WidthPlan({gid: GroupPlan(tuple(range(8)), NEW)}))
    for name, value in {"gamma": 1.0, "beta": 0.0, "mean": 0.0, "var": 1.0}.items():
        tensor = getattr(big, name)
        assert torch.equal(tensor[8:], torch.full((NEW,), value)), f"{name}: {tensor[8:].tolist()}"
    with torch.no_grad():
        assert_close_trees(big(x), model(x), rtol=1e-6, what="growth keeps the function")


# -- every form of an op has the same facts ------------------------------------------------------------
class Forms(nn.Module):
    """One activation called as a module, ``F.*``, ``torch.*`` and a Tensor method."""

    def __init__(self, module: nn.Module, functional: object, torch_fn: object, method: str | None) -> None:
        super().__init__()
        self.act, self.functional, self.torch_fn, self.method = module, functional, torch_fn, method

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [self.act(x), self.functional(x), self.torch_fn(x)]  # type: ignore[operator]
        return (*out, getattr(x, self.method)()) if self.method else tuple(out)


FORMS = {
    "relu": (nn.ReLU(), F.relu, torch.relu, "relu"),
    "tanh": (nn.Tanh(), F.tanh, torch.tanh, "tanh"),
    "sigmoid": (nn.Sigmoid(), F.sigmoid, torch.sigmoid, "sigmoid"),
    "selu": (nn.SELU(), F.selu, torch.selu, None),
    "celu": (nn.CELU(), F.celu, torch.celu, None),
    "hardshrink": (nn.Hardshrink(), F.hardshrink, F.hardshrink, "hardshrink"),
    "leaky_relu": (nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, negative_slope=0.2),
                   None),
    "hardtanh": (nn.Hardtanh(0.0, 2.0), lambda x: F.hardtanh(x, 0.0, 2.0), lambda x: F.hardtanh(x, 0.0, 2.0), None),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FORMS))
def test_module_function_and_method_forms_have_the_same_facts(name: str) -> None:
    gm = fx.symbolic_trace(Forms(*FORMS[name]))
    calls = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    facts = [node_facts(n, gm) for n in calls]
    assert len(facts) >= 3
    seen = {(f.kind, f.zero_preserving, f.slope_at_zero, f.pointwise) for f in facts}
    assert len(seen) == 1, f"{name}: {[(n.format_node(), s) for n, s in zip(calls, facts, strict=True)]}"
    assert facts[0].kind is OpKind.ACTIVATION


def test_norm_forms_agree_on_new_channel_defaults() -> None:
    module = module_facts(nn.BatchNorm2d)
    assert module is not None
    for fn in (F.batch_norm, torch.batch_norm):
        assert FUNCTION_OPS[fn].kind is module.kind is OpKind.BATCH_NORM
        assert dict(FUNCTION_OPS[fn].new_channel) == dict(module.new_channel)
    assert dict(FUNCTION_OPS[F.layer_norm].new_channel) == dict(MODULE_OPS[nn.LayerNorm].new_channel)


def test_a_subclass_with_its_own_forward_keeps_only_its_parameters_meaning() -> None:
    assert module_facts(MyBN) is MODULE_OPS[nn.BatchNorm2d]
    own = module_facts(NormAct)
    assert own is not None and own.kind is OpKind.OTHER and own.default("weight") == 1.0

    class Doubled(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x + 1

    assert not module_facts(Doubled).zero_preserving  # type: ignore[union-attr]


# -- the facts agree with what PyTorch computes --------------------------------------------------------
def _activation_modules() -> list[tuple[str, nn.Module]]:
    args = {nn.Threshold: (-0.1, 0.5), nn.PReLU: ()}
    out = []
    for cls, facts in MODULE_OPS.items():
        if facts.pointwise:
            out.append((cls.__name__, cls(*args.get(cls, ()))))
    return out


@pytest.mark.parametrize(("name", "module"), _activation_modules(), ids=[n for n, _ in _activation_modules()])
def test_zero_and_slope_facts_match_autograd(name: str, module: nn.Module) -> None:
    """``f(0) = 0`` and ``f'(0)`` (as autograd computes it) are what the table says, in eval mode."""
    gm = fx.symbolic_trace(nn.Sequential(module))
    facts = node_facts(next(n for n in gm.graph.nodes if n.op == "call_module"), gm)
    shape = {nn.Dropout1d: (2, 3, 4), nn.Dropout3d: (1, 2, 2, 2, 2)}.get(type(module), (1, 2, 2, 2))
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    y = module.double().eval()(x)
    assert bool((y == 0).all()) == facts.zero_preserving, f"{name}(0) = {y.tolist()}"
    if facts.slope_at_zero is not None:
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.allclose(grad, torch.full_like(grad, facts.slope_at_zero), atol=1e-6), grad.tolist()


# -- remove-dead sees through an activation its old list missed ----------------------------------------
@pytest.mark.parametrize("act", [nn.Mish, nn.Hardshrink, nn.SELU])
def test_remove_dead_sees_through_activations_the_old_list_missed(act: type[nn.Module]) -> None:
    """``gamma = 0`` channels behind Mish/Hardshrink/SELU (not in the old ``_POINTWISE`` list) are
    constant: they go, their value folded into the 1x1 reader's bias, the function unchanged."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act()
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.bn(self.conv(x))))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.3, 0.3)
        model.bn.weight[[1, 4, 6]] = 0.0
    x = torch.randn(2, 3, 6, 6)
    gm = fxmorph.trace(model, (x,))
    result = RemoveDeadPass().call(gm, PassContext(example_inputs=(x,)))
    assert result.modified
    assert result.gm.get_submodule("bn").num_features == 5
    with torch.no_grad():
        assert_close_trees(result.gm(x), model(x), rtol=1e-5, what="remove-dead equivalence")
