"""Bad input at the Python entry points: analyze/trace, shrink, grow, morph and FlopsRegularizer.

One test (or parameter) per row of ``docs/bad_input.md``. Each asserts the specific fxmorph exception, that
its message names the cause and the fix (key words), that fxmorph raised it (not a raw torch error), and
that the user's model is unchanged (tensors, train/eval flags, requires_grad flags, dtypes, devices).
Export, latency and save/load are in ``test_bad_input_io.py``, the command line in ``test_bad_input_cli.py``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import fxmorph
from fxmorph import BudgetError, FxmorphError, InputError, TraceError
from tests.conftest import SmallNet as Net


class Untraceable(Net):
    """Branches on a tensor value, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.relu() if y.sum() > 0 else y


class CudaNet(Net):
    """Written for a GPU: moves its input to CUDA inside forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.cuda())


X = torch.randn(2, 3, 8, 8)


def batches(n: int = 2, channels: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, channels, 8, 8), torch.randint(0, 5, (4,))) for _ in range(n)]


def empty_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=2)


def meta_net() -> nn.Module:
    with torch.device("meta"):
        return Net()


# -- assertions shared by the three files -------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything of ``model`` a bad call must leave alone."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "dtypes_devices": [(t.dtype, t.device) for t in (*model.parameters(), *model.buffers())],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modes"] == before["modes"], "train/eval flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["dtypes_devices"] == before["dtypes_devices"], "dtypes or devices changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        if v.is_meta:
            assert after["tensors"][k].is_meta, k
        else:
            assert torch.equal(after["tensors"][k], v), f"{k} changed"


def assert_error(call: Callable[[], Any], error: type[FxmorphError], *words: str) -> FxmorphError:
    """``call()`` raises exactly ``error``, from fxmorph's code, with every word of ``words`` in its message."""
    with pytest.raises(FxmorphError) as info:
        call()
    exc = info.value
    assert type(exc) is error, f"{type(exc).__name__} instead of {error.__name__}: {exc}"
    message = str(exc).lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in: {exc}"
    raiser = traceback.extract_tb(exc.__traceback__)[-1].filename.replace("\\", "/")
    assert "/fxmorph/" in raiser, f"raised by {raiser}, not by fxmorph"
    return exc


@dataclass(frozen=True)
class Case:
    """A row of the table: ``call(model)`` on ``make()`` raises ``error`` naming ``words``."""

    call: Callable[[nn.Module], Any]
    error: type[FxmorphError]
    words: tuple[str, ...]
    make: Callable[[], nn.Module] = Net


def run_case(case: Case) -> None:
    torch.manual_seed(0)
    model = case.make()
    before = snapshot(model)
    assert_error(lambda: case.call(model), case.error, *case.words)
    assert_unchanged(model, before)


# -- every entry point: the model or the example inputs are wrong ---------------------------------------------
def _load(model: nn.Module, x: Any, tmp: Path) -> Any:
    fxmorph.save(fxmorph.shrink(Net(), 0.5, (X,)), tmp / "small.pt")
    return fxmorph.load(tmp / "small.pt", model, x)


ENTRY_POINTS: dict[str, Callable[[Any, Any, Path], Any]] = {
    "analyze": lambda m, x, _: fxmorph.analyze(m, x),
    "shrink": lambda m, x, _: fxmorph.shrink(m, 0.5, x),
    "grow": lambda m, x, _: fxmorph.grow(m, x, budget_flops="150%"),
    "morph": lambda m, x, _: fxmorph.morph(m, 0.5, x, batches(), F.cross_entropy, epochs=1, progress=False),
    "FlopsRegularizer": lambda m, x, _: fxmorph.FlopsRegularizer(m, x),
    "load": _load,
}
BAD_MODELS: dict[str, tuple[Callable[[], Any], tuple[str, ...], tuple[str, ...]]] = {
    # name: (model, example inputs, words of the message)
    "not a module": (lambda: "resnet18", (X,), ("torch.nn.Module", "pass the model object")),
    "meta device": (meta_net, (X,), ("meta device", "to_empty")),
    "inputs do not fit": (Net, (torch.randn(2, 4, 8, 8),), ("do not run", "expected input[2, 4, 8, 8]", "fix: pass")),
    "untraceable": (Untraceable, (X,), ("cannot trace", "y.sum() > 0", "leaf_modules")),
}
BAD_MODEL_ERRORS = {"not a module": InputError, "meta device": InputError, "inputs do not fit": TraceError,
                    "untraceable": TraceError}  # fmt: skip


# load names the original model (its "not a module" row is in test_bad_input_io.py) and compares the example
# inputs with the saved ones first (test_serialize.py::test_mismatching_shapes).
MATRIX = [(bad, entry) for bad in BAD_MODELS for entry in ENTRY_POINTS
          if not (entry == "load" and bad in ("not a module", "inputs do not fit"))]  # fmt: skip


@pytest.mark.parametrize(("bad", "entry"), MATRIX)
def test_every_entry_point_refuses_a_bad_model_or_inputs(bad: str, entry: str, tmp_path: Path) -> None:
    make, x, words = BAD_MODELS[bad]
    model = make()
    before = snapshot(model) if isinstance(model, nn.Module) else None
    assert_error(lambda: ENTRY_POINTS[entry](model, x, tmp_path), BAD_MODEL_ERRORS[bad], *words)
    if before is not None:
        assert_unchanged(model, before)


# -- analyze / trace ----------------------------------------------------------------------------------------
ANALYZE = {
    "GraphModule without shape metadata": Case(
        lambda m: fxmorph.analyze(fx.symbolic_trace(m)), InputError, ("no shape metadata", "pass example_inputs")
    ),
    "no example inputs": Case(lambda m: fxmorph.analyze(m), InputError, ("example_inputs is required", "pass")),
    "leaf_modules entry not a class or name": Case(
        lambda m: fxmorph.analyze(m, (X,), leaf_modules=[3]), InputError, ("leaf_modules entry 3", "leaf_modules=[")
    ),
    "leaf_modules name misspelt": Case(
        lambda m: fxmorph.analyze(m, (X,), leaf_modules=["conv22"]), InputError, ("no submodule", "did you mean: conv2")
    ),
    "leaf_modules a lone class": Case(
        lambda m: fxmorph.analyze(m, (X,), leaf_modules=nn.Conv2d), InputError, ("leaf_modules=[conv2d]",)
    ),
    "example inputs on the meta device": Case(
        lambda m: fxmorph.analyze(m, (X.to("meta"),)), InputError, ("meta device", "torch.randn(2, 3, 8, 8)")
    ),
    "float16 model, float32 inputs": Case(
        lambda m: fxmorph.analyze(m, (X,)),
        TraceError,
        ("input 0 is float32", "float16", "x.to(torch.float16)"),
        make=lambda: Net().half(),
    ),
    "float64 inputs to a float32 model": Case(
        lambda m: fxmorph.trace(m, (X.double(),)), TraceError, ("float64", "x.to(torch.float32)")
    ),
    "forward moves tensors to CUDA (no CUDA here)": Case(
        lambda m: fxmorph.analyze(m, (X,)), TraceError, ("cuda", "x.device"), make=CudaNet
    ),
}


@pytest.mark.parametrize("case", list(ANALYZE))
def test_analyze(case: str) -> None:
    if "CUDA" in case and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    run_case(ANALYZE[case])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_are_analysed_and_shrunk_in_their_dtype(dtype: torch.dtype) -> None:
    model = Net().to(dtype)
    before = snapshot(model)
    cg = fxmorph.analyze(model, (X.to(dtype),))
    assert [g.size for g in cg.free_groups] == [32, 32]
    small = fxmorph.shrink(model, 0.5, (X.to(dtype),), round_to=4)
    assert {p.dtype for p in small.parameters()} == {dtype}
    assert small(X.to(dtype)).dtype == dtype
    assert_unchanged(model, before)


# -- shrink -------------------------------------------------------------------------------------------------
def _taylor(m: nn.Module, data: Any, loss: Any = F.cross_entropy, **kw: Any) -> Any:
    return fxmorph.shrink(m, 0.5, (X,), criterion="taylor", data=data, loss_fn=loss, **kw)


SHRINK = {
    "width budget beyond what growth reaches": Case(
        lambda m: fxmorph.shrink(m, 1e20, (X,), strategy="width"), BudgetError, ("above what", "lower the budget")
    ),
    "round_to a bool": Case(lambda m: fxmorph.shrink(m, 0.5, (X,), round_to=True), InputError, ("round_to=true",)),
    "max_prune not a number": Case(
        lambda m: fxmorph.shrink(m, 0.5, (X,), max_prune="0.5"), InputError, ("max_prune", "at most 1")
    ),
    "protect a lone string": Case(
        lambda m: fxmorph.shrink(m, 0.5, (X,), protect="conv"), InputError, ("got the string", "protect=['conv']")
    ),
    "protect a misspelt path": Case(
        lambda m: fxmorph.shrink(m, 0.5, (X,), protect=["conv3"]), InputError, ("protect names 'conv3'", "did you mean")
    ),
    "seed not an int": Case(lambda m: fxmorph.shrink(m, 0.5, (X,), seed="a"), InputError, ("seed must be an int",)),
    "seed beyond torch's range": Case(lambda m: fxmorph.shrink(m, 0.5, (X,), seed=2**70), InputError, ("2**63 - 1",)),
    "loss_fn not callable": Case(lambda m: _taylor(m, batches(), "ce"), InputError, ("loss_fn must be callable",)),
    "empty DataLoader": Case(lambda m: _taylor(m, empty_loader()), InputError, ("no batch", "non-empty")),
    "data not iterable": Case(lambda m: _taylor(m, 5), InputError, ("iterable of batches", "got int")),
    "batches not (inputs, targets)": Case(
        lambda m: _taylor(m, [x for x, _ in batches()]), InputError, ("pair (inputs, targets)", "yield such pairs")
    ),
    "batches that do not fit the model": Case(
        lambda m: _taylor(m, batches(channels=5)), InputError, ("first batch", "to have 3 channels", "must be")
    ),
    "calibrate with an empty DataLoader": Case(
        lambda m: fxmorph.shrink(m, 0.5, (X,), calibrate=True, data=empty_loader()), InputError, ("no batch",)
    ),
    "one-shot iterator read twice": Case(
        lambda m: _taylor(m, iter(batches()), calibrate=True), InputError, ("one-shot iterator", "list of batches")
    ),
}


@pytest.mark.parametrize("case", list(SHRINK))
def test_shrink(case: str) -> None:
    run_case(SHRINK[case])


def test_shrink_reads_a_one_shot_iterator_once() -> None:
    """Supported: a one-shot iterator read by one pass gives the model a list gives (the batch fxmorph
    peeked at to check the data is not lost)."""
    model, data = Net(), batches(3)
    from_list = fxmorph.shrink(model, 0.5, (X,), criterion="taylor", data=data, loss_fn=F.cross_entropy)
    from_iterator = fxmorph.shrink(model, 0.5, (X,), criterion="taylor", data=iter(data), loss_fn=F.cross_entropy)
    for a, b in zip(from_list.state_dict().values(), from_iterator.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# -- grow ---------------------------------------------------------------------------------------------------
def _grow_data(m: nn.Module, data: Any, loss: Any = F.cross_entropy) -> Any:
    return fxmorph.grow(m, (X,), budget_flops="150%", data=data, loss_fn=loss)


GROW = {
    "max_factor a string": Case(
        lambda m: fxmorph.grow(m, (X,), budget_flops="150%", max_factor="2"), InputError, ("max_factor", "above 1")
    ),
    "max_factor infinite": Case(
        lambda m: fxmorph.grow(m, (X,), budget_flops="150%", max_factor=float("inf")), InputError, ("finite",)
    ),
    "scale negative": Case(
        lambda m: fxmorph.grow(m, (X,), channels=2, scale=-1.0), InputError, ("scale", "at least 0")
    ),
    "noise NaN": Case(lambda m: fxmorph.grow(m, (X,), channels=2, noise=float("nan")), InputError, ("noise", "finite")),
    "protect a lone string": Case(
        lambda m: fxmorph.grow(m, (X,), channels=2, protect="conv"), InputError, ("protect=['conv']",)
    ),
    "protect a misspelt path": Case(
        lambda m: fxmorph.grow(m, (X,), channels=2, protect=["conv3"]), InputError, ("protect names 'conv3'",)
    ),
    "seed not an int": Case(
        lambda m: fxmorph.grow(m, (X,), channels=2, seed=None), InputError, ("seed must be an int",)
    ),
    "empty DataLoader": Case(lambda m: _grow_data(m, empty_loader()), InputError, ("no batch", "non-empty")),
    "data not iterable": Case(lambda m: _grow_data(m, 3), InputError, ("iterable of batches",)),
    "batches that do not fit the model": Case(
        lambda m: _grow_data(m, batches(channels=5)), InputError, ("first batch", "to have 3 channels")
    ),
    "loss_fn not callable": Case(lambda m: _grow_data(m, batches(), "ce"), InputError, ("loss_fn must be callable",)),
}


@pytest.mark.parametrize("case", list(GROW))
def test_grow(case: str) -> None:
    run_case(GROW[case])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_data", [False, True])
def test_low_precision_models_grow_through_float32(dtype: torch.dtype, with_data: bool) -> None:
    """Supported: a float16/bfloat16 model grows as a float32 copy and comes back in its dtype, same function
    up to its own rounding (bfloat16 failed the 1e-4 function check before)."""
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    before = snapshot(model)
    data = {"data": [(x.to(dtype), y) for x, y in batches()], "loss_fn": F.cross_entropy} if with_data else {}
    big, report = fxmorph.grow(model, (X.to(dtype),), budget_flops="150%", return_report=True, **data)
    assert {t.dtype for t in (*big.parameters(), *big.buffers()) if t.is_floating_point()} == {dtype}
    assert report.flops_after > report.flops_before and report.settings["dtype"] == str(dtype)[6:]
    with torch.no_grad():
        a, b = model(X.to(dtype)).float(), big(X.to(dtype)).float()
    assert (a - b).abs().max() <= 4 * torch.finfo(dtype).eps * max(a.abs().max().item(), 1.0)
    assert fxmorph.analyze(big).gm.meta["fxmorph.interface"][0][0][1] == dtype  # metadata in the model's dtype
    assert_unchanged(model, before)


# -- morph --------------------------------------------------------------------------------------------------
def _morph(m: nn.Module, data: Any = None, loss: Any = F.cross_entropy, budget: Any = 0.5, **kw: Any) -> Any:
    options = {"epochs": 1, "finetune_epochs": 0, "progress": False, "round_to": 4} | kw
    return fxmorph.morph(m, budget, (X,), batches() if data is None else data, loss, **options)


MORPH = {
    "float16 model": Case(
        _morph, InputError, ("float16", "model.float()", "result.to(torch.float16)"), make=lambda: Net().half()
    ),
    "bfloat16 model": Case(_morph, InputError, ("bfloat16", "float32 copy"), make=lambda: Net().to(torch.bfloat16)),
    "every parameter frozen": Case(
        _morph,
        InputError,
        ("none of its parameters requires grad", "requires_grad_"),
        make=lambda: Net().requires_grad_(False),
    ),
    "empty DataLoader": Case(lambda m: _morph(m, empty_loader()), InputError, ("no batch", "non-empty")),
    "batches that do not fit the model": Case(
        lambda m: _morph(m, batches(channels=5)), InputError, ("batch 1", "to have 3 channels", "(inputs, targets)")
    ),
    "loss that does not depend on the model": Case(
        lambda m: _morph(m, loss=lambda out, y: torch.tensor(1.0)), InputError, ("does not depend",)
    ),
    "optimizer factory returns no optimizer": Case(
        lambda m: _morph(m, optimizer=lambda params: 0.01), InputError, ("returned float", "torch.optim.sgd(params")
    ),
    "infinite learning rate": Case(lambda m: _morph(m, lr=float("inf")), InputError, ("lr must be a positive finite",)),
    "round_to zero": Case(lambda m: _morph(m, round_to=0), InputError, ("round_to must be 'auto' or a positive int",)),
    "budget beyond what the width step reaches": Case(
        lambda m: _morph(m, budget=1e20), BudgetError, ("above what morph's width step can reach", "lower the")
    ),
}


@pytest.mark.parametrize("case", list(MORPH))
def test_morph(case: str) -> None:
    run_case(MORPH[case])


def test_morph_refuses_an_unreachable_budget_before_training() -> None:
    calls: list[int] = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return F.cross_entropy(out, y)

    assert_error(lambda: _morph(Net(), loss=loss, budget=1e20), BudgetError, "above")
    assert calls == []


# -- FlopsRegularizer ---------------------------------------------------------------------------------------
REGULARIZER = {
    "strength a bool": Case(lambda m: fxmorph.FlopsRegularizer(m, (X,), strength=True), InputError, ("strength",)),
    "threshold a bool": Case(lambda m: fxmorph.FlopsRegularizer(m, (X,), threshold=False), InputError, ("threshold",)),
}


@pytest.mark.parametrize("case", list(REGULARIZER))
def test_regularizer(case: str) -> None:
    run_case(REGULARIZER[case])


def _resize_first_layer(m: nn.Module) -> None:
    m.conv, m.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)


CHANGES: dict[str, tuple[Callable[[nn.Module], None], tuple[str, ...]]] = {
    "a layer resized": (_resize_first_layer, ("shape [16]", "build a new flopsregularizer")),
    "a layer removed": (lambda m: setattr(m, "bn", nn.Identity()), ("no longer has", "build a new")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_regularizer_after_the_architecture_changed(change: str) -> None:
    model = Net()
    reg = fxmorph.FlopsRegularizer(model, (X,))
    edit, words = CHANGES[change]
    edit(model)  # the user changed the model on purpose: the calls below must change nothing more
    before = snapshot(model)
    assert_error(reg, InputError, *words)
    assert_error(reg.zero_dead, InputError, "build a new")
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regularizer_on_low_precision_models(dtype: torch.dtype) -> None:
    """Supported: the term is computed in the model's dtype and reaches its gates."""
    model = Net().to(dtype)
    term = fxmorph.FlopsRegularizer(model, (X.to(dtype),))()
    assert term.dtype == dtype and term.dim() == 0 and torch.isfinite(term)
    term.backward()
    assert model.bn.weight.grad is not None and model.bn.weight.grad.abs().sum() > 0


def test_numpy_scalars_are_budgets() -> None:
    """Supported: NumPy scalars as budgets (``np.float32(0.5)``, ``np.int64`` FLOPs), as Python numbers are."""
    import numpy as np

    model = Net().eval()
    half = fxmorph.shrink(model, np.float32(0.5), (X,), return_report=True)[1]
    assert half.budget_flops == fxmorph.shrink(model, 0.5, (X,), return_report=True)[1].budget_flops
    absolute = fxmorph.shrink(model, np.int64(half.budget_flops), (X,), return_report=True)[1]
    assert absolute.budget_flops == half.budget_flops and absolute.flops_after <= absolute.budget_flops
