"""No entry point leaks global torch state or changes the user's model (issue 6, item 4), and no
``torch.load`` in the package unpickles code (item 5)."""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from tests.conftest import SmallNet as Net

X = torch.randn(2, 3, 8, 8)
DATA = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(2)]


def _global_state() -> dict[str, Any]:
    return {
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "rng": torch.random.get_rng_state(),
    }


def _model_state(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "devices_dtypes": {(p.device, p.dtype) for p in model.parameters()},
        "grads": [p.grad for p in model.parameters()],
    }


def _save_load(model: nn.Module, tmp: Path) -> Any:
    small = fxmorph.shrink(model, 0.5, (X,))
    fxmorph.save(small, tmp / "small.pt")
    return fxmorph.load(tmp / "small.pt", model, (X,))


ENTRY_POINTS: dict[str, Callable[[nn.Module, Path], Any]] = {
    "trace": lambda m, _: fxmorph.trace(m, (X,)),
    "analyze": lambda m, _: fxmorph.analyze(m, (X,)),
    "shrink": lambda m, _: fxmorph.shrink(m, 0.5, (X,)),
    "shrink-taylor": lambda m, _: fxmorph.shrink(m, 0.5, (X,), criterion="taylor", data=DATA, loss_fn=F.cross_entropy),
    "shrink-random": lambda m, _: fxmorph.shrink(m, 0.5, (X,), criterion="random"),
    "shrink-width-up": lambda m, _: fxmorph.shrink(m, "150%", (X,), strategy="width"),
    "grow": lambda m, _: fxmorph.grow(m, (X,), budget_flops="150%"),
    "grow-data": lambda m, _: fxmorph.grow(m, (X,), budget_flops="150%", data=DATA, loss_fn=F.cross_entropy),
    "check": lambda m, _: fxmorph.check(m, (X,)),
    "count": lambda m, _: (fxmorph.count_flops(m, (X,)), fxmorph.count_params(m)),
    "regularizer": lambda m, _: fxmorph.FlopsRegularizer(m, (X,)).flops_estimate(),
    "export": lambda m, tmp: fxmorph.export_onnx(m, (X,), tmp / "m.onnx"),
    "save-load": _save_load,
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_entry_point_leaks_no_state(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net().train()
    model.conv.bias.requires_grad_(False)  # a frozen parameter must stay frozen
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # and existing gradients stay as they were
    before_model, before_global = _model_state(model), _global_state()
    ENTRY_POINTS[name](model, tmp_path)
    after_model, after_global = _model_state(model), _global_state()
    rng_before, rng_after = before_global.pop("rng"), after_global.pop("rng")
    assert after_global == before_global
    assert torch.equal(rng_before, rng_after), f"{name} consumed the global random generator"
    assert after_model["modes"] == before_model["modes"]
    assert after_model["requires_grad"] == before_model["requires_grad"]
    assert after_model["devices_dtypes"] == before_model["devices_dtypes"]
    assert all(torch.equal(before_model["tensors"][k], v) for k, v in after_model["tensors"].items())
    assert after_model["grads"][0] is None and torch.equal(after_model["grads"][-2], torch.ones(5, 32))


def test_entry_points_under_no_grad_and_inference_mode() -> None:
    model = Net().eval()
    with torch.no_grad():
        small = fxmorph.shrink(model, 0.5, (X,))
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        grown = fxmorph.grow(copy.deepcopy(model), (X,), budget_flops="150%")
        small_inf = fxmorph.shrink(model, 0.5, (X,))
        assert torch.is_inference_mode_enabled()
    assert fxmorph.count_flops(small, (X,)) <= fxmorph.count_flops(model, (X,)) * 0.5
    torch.testing.assert_close(grown(X), model(X), rtol=1e-5, atol=1e-5)
    for result in (small, grown, small_inf):  # built under no_grad / inference_mode, still trainable
        result.train()(X).sum().backward()
        assert all(p.grad is not None for p in result.parameters())


def _torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
    ]  # fmt: skip


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """``torch.load`` without ``weights_only=True`` only where the user passed the explicit trust flag."""
    package = Path(fxmorph.__file__).parent
    calls = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        for call in _torch_load_calls(ast.parse(source)):
            calls.append(call)
            kw = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in kw, f"{path.name}:{call.lineno}: torch.load without weights_only"
            value = kw["weights_only"]
            if not (isinstance(value, ast.Constant) and value.value is True):
                # the one non-constant use: the CLI's --trust-checkpoint, named in the expression
                assert "trust" in ast.unparse(value), f"{path.name}:{call.lineno}: weights_only={ast.unparse(value)}"
    assert calls, "expected the package to load files somewhere (serialize, the CLI)"
