"""Bad models at every entry point that traces: hooks torch.fx would drop, extra example inputs, derived
weights, and DataParallel / DDP / ``torch.compile`` wrappers. One parameter per row of ``docs/bad_input.md``
(test ids ``model::...``); each asserts the fxmorph exception, the words of its message, that fxmorph raised
it, and that the user's model is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import fxmorph
from fxmorph import InputError
from tests.conftest import MLP
from tests.test_bad_input import Untraceable, assert_error, assert_unchanged, snapshot

X = torch.randn(2, 8)


class Block(nn.Module):
    """A user block with its own forward: torch.fx inlines it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class VarArgs(MLP):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(xs[0] + xs[1])


def _hooked(register: Callable[[nn.Module], Any], make: Callable[[], nn.Module] = MLP) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = make()
        register(model)
        return model

    return build


def _scale(module: nn.Module) -> nn.Module:
    class Triple(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 3 * w

    return parametrize.register_parametrization(module, "weight", Triple())


def _with(layer: str, change: Callable[[nn.Module], Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = MLP()
        result = change(getattr(model, layer))
        if isinstance(result, nn.Module):
            setattr(model, layer, result)
        return model

    return build


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-process gloo group, so DistributedDataParallel can be built."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


# name: (model, example inputs, words of the message)
BAD: dict[str, tuple[Callable[[], nn.Module], tuple[torch.Tensor, ...], tuple[str, ...]]] = {
    "forward hook on the model": (
        _hooked(lambda m: m.register_forward_hook(lambda mod, i, o: o - 3)),
        (X,),
        ("the model itself (MLP)", "forward hooks", "handle.remove()"),
    ),
    "forward hook with kwargs on the model": (
        _hooked(lambda m: m.register_forward_hook(lambda mod, a, k, o: o, with_kwargs=True)),
        (X,),
        ("the model itself", "forward hooks"),
    ),
    "forward-pre hook on the model": (
        _hooked(lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0] * 2,))),
        (X,),
        ("the model itself", "forward-pre hooks"),
    ),
    "forward hook on an inlined submodule": (
        _hooked(lambda m: m.block.register_forward_hook(lambda mod, i, o: o + 1), Nested),
        (X,),
        ("submodule 'block'", "forward hooks", "leaf_modules=['block']"),
    ),
    "backward hook on an inlined submodule": (
        _hooked(lambda m: m.block.register_full_backward_hook(lambda mod, gi, go: None), Nested),
        (X,),
        ("submodule 'block'", "backward hooks", "leaf_modules=['block']"),
    ),
    "more example inputs than forward takes": (MLP, (X, X, X), ("got 3 example inputs", "takes 1 (x)")),
    # weight_norm alone is kept (tests/test_parametrized.py); stacked with another parametrization it is not
    "weight_norm with another parametrization": (
        _with("fc2", lambda m: _scale(parametrizations.weight_norm(m))),
        (X,),
        ("layer 'fc2'", "WeightNorm + Triple", "remove_parametrizations(layer, 'weight')"),
    ),
    "spectral_norm parametrization": (
        _with("fc2", parametrizations.spectral_norm),
        (X,),
        ("layer 'fc2'", "SpectralNorm", "remove_parametrizations(layer, 'weight')"),
    ),
    "custom parametrization": (_with("fc1", _scale), (X,), ("layer 'fc1'", "remove_parametrizations")),
    "hook-based weight_norm": (
        _with("fc2", lambda m: torch.nn.utils.weight_norm(m)),
        (X,),
        ("layer 'fc2'", "torch.nn.utils.remove_weight_norm(layer)", "parametrizations.weight_norm instead"),
    ),
    "hook-based spectral_norm": (
        _with("fc2", lambda m: torch.nn.utils.spectral_norm(m)),
        (X,),
        ("layer 'fc2'", "torch.nn.utils.remove_spectral_norm(layer)"),
    ),
    "DataParallel wrapper": (lambda: nn.DataParallel(MLP()), (X,), ("dataparallel", "model.module")),
    "DistributedDataParallel wrapper": (
        lambda: nn.parallel.DistributedDataParallel(MLP()),
        (X,),
        ("distributeddataparallel", "model.module"),
    ),
    "torch.compile wrapper": (lambda: torch.compile(MLP()), (X,), ("torch.compile", "model._orig_mod")),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "small.pt"
    fxmorph.save(fxmorph.shrink(MLP(), 0.5, (X,)), path)
    return path


ENTRY_POINTS: dict[str, Callable[[nn.Module, Any, Path], Any]] = {
    "analyze": lambda m, x, _: fxmorph.analyze(m, x),
    "shrink": lambda m, x, _: fxmorph.shrink(m, 0.5, x),
    "shrink width": lambda m, x, _: fxmorph.shrink(m, 1.0, x, strategy="width"),
    "grow": lambda m, x, _: fxmorph.grow(m, x, budget_flops="150%"),
    "morph": lambda m, x, _: fxmorph.morph(m, 0.5, x, _batches(), F.cross_entropy, epochs=1, progress=False),
    "FlopsRegularizer": lambda m, x, _: fxmorph.FlopsRegularizer(m, x),
    "load": lambda m, x, path: fxmorph.load(path, m, x),
}
UNWRAPPED_BY_REGULARIZER = ("DataParallel wrapper", "DistributedDataParallel wrapper", "torch.compile wrapper")
MATRIX = [(bad, entry) for bad in BAD for entry in ENTRY_POINTS
          if not (entry == "FlopsRegularizer" and bad in UNWRAPPED_BY_REGULARIZER)
          and not (entry == "load" and bad == "more example inputs than forward takes")]  # fmt: skip
# load compares the example inputs with the saved ones first (a SerializationError, in test_bad_input_io.py).


@pytest.mark.parametrize(("bad", "entry"), MATRIX)
def test_every_entry_point_refuses_a_bad_model(bad: str, entry: str, saved: Path, request: pytest.FixtureRequest
                                               ) -> None:  # fmt: skip
    if "Distributed" in bad:
        request.getfixturevalue("process_group")
    make, x, words = BAD[bad]
    torch.manual_seed(0)
    model = make()
    before = snapshot(model)
    assert_error(lambda: ENTRY_POINTS[entry](model, x, saved), InputError, *words)
    assert_unchanged(model, before)


@pytest.mark.parametrize("wrapper", UNWRAPPED_BY_REGULARIZER)
def test_flops_regularizer_unwraps_wrappers(wrapper: str, request: pytest.FixtureRequest) -> None:
    if "Distributed" in wrapper:
        request.getfixturevalue("process_group")
    model = BAD[wrapper][0]()
    reg = fxmorph.FlopsRegularizer(model, (X,))
    assert reg() > 0


def _leaf_hooks(model: nn.Module) -> None:
    model.fc1.register_forward_hook(lambda mod, i, o: o * 2 + 1)
    model.fc3.register_forward_pre_hook(lambda mod, i: (i[0] * 0.5,))


@pytest.mark.parametrize("strategy", ["prune", "width"])
def test_hooks_on_leaves_are_kept_in_the_result(strategy: str) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    _leaf_hooks(model)
    before = snapshot(model)
    same = fxmorph.shrink(model, 1.0, (X,), strategy=strategy)
    assert torch.allclose(same(X), model(X), atol=1e-6)
    small = fxmorph.shrink(model, 0.5, (X,), strategy=strategy)
    assert small.get_submodule("fc1")._forward_hooks and small.get_submodule("fc3")._forward_pre_hooks
    assert_unchanged(model, before)


def test_a_hooked_submodule_named_a_leaf_keeps_its_hook() -> None:
    torch.manual_seed(0)
    model = Nested().eval()
    model.block.register_forward_hook(lambda mod, i, o: o + 1)
    result = fxmorph.shrink(model, 1.0, (X,), leaf_modules=["block"])
    assert torch.allclose(result(X), model(X), atol=1e-6)


def test_varargs_forward_takes_every_example_input() -> None:
    cg = fxmorph.analyze(VarArgs(), (X, X))
    assert cg.groups


def test_untraceable_hint_suggests_only_what_works() -> None:
    exc = assert_error(lambda: fxmorph.shrink(Untraceable(), 0.5, (torch.randn(2, 3, 8, 8),)), fxmorph.TraceError,
                       "leaf_modules", "rewrite the branch")  # fmt: skip
    assert "concrete_args" not in str(exc)
