"""ONNX export parity on the torchvision zoo (original and shrunk), export errors, and latency measurement."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxmorph
from fxmorph.io.export import ExportError, ExportResult, export_onnx
from fxmorph.io.latency import LatencyReport, compare_latency, measure_latency
from fxmorph.io.onnx_parity import _compare, _MismatchError
from fxmorph.testing import random_plan
from tests.zoo import CLASSIFICATION, HUGE, build, example_input

# A broad sample of the zoo: plain, residual, depthwise, squeeze-excite, channel shuffle, dense
# concatenation, inception branches, grouped convolutions, attention (ViT, Swin) and LayerNorm (ConvNeXt).
ZOO = [
    "resnet18",
    "mobilenet_v3_small",
    "vit_b_16",
    "swin_t",
    "convnext_tiny",
    "shufflenet_v2_x0_5",
    "densenet121",
    "efficientnet_b0",
    "googlenet",
    "inception_v3",
    "squeezenet1_0",
    "regnet_x_400mf",
    "alexnet",  # the TorchScript exporter fails at 64x64 (adaptive pooling), so this exercises the fallback
]


# Where torch.export specialised the batch axis to the example's 1; these also run at batch 3 here.
BATCH3 = {"resnet18", "vit_b_16", "swin_t", "convnext_tiny"}


@functools.lru_cache(maxsize=1)
def _zoo_models(name: str) -> tuple[nn.Module, fx.GraphModule, fx.GraphModule, torch.Tensor]:
    model, x = build(name), example_input(name)
    cg = fxmorph.analyze(model, (x,))
    return model, fxmorph.resize(cg, random_plan(cg, seed=0)).eval(), fxmorph.shrink(model, 0.5, (x,)), x


def _assert_parity(result: ExportResult) -> None:
    """Checked in onnxruntime, and the largest difference is under 1e-4 of the output's magnitude (weights=None
    ResNet-101/152 reach outputs of 1e7 at 64x64, where float32 rounding alone exceeds 1e-4 absolute)."""
    assert result.checked and result.path.exists()
    assert result.max_rel_diff is not None and result.max_rel_diff < 1e-4


def _ort_run(path, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})


@pytest.mark.parametrize(("name", "variant"), [(n, v) for n in ZOO for v in ("original", "random-plan", "shrink-50")])
def test_zoo_parity(name: str, variant: str, tmp_path) -> None:
    original, random_shrunk, shrunk, x = _zoo_models(name)
    model = {"original": original, "random-plan": random_shrunk, "shrink-50": shrunk}[variant]
    result = export_onnx(model, (x,), tmp_path / f"{name}.onnx")
    _assert_parity(result)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.exporter in ("torchscript", "dynamo")
    assert (result.exporter == "dynamo") == bool(result.fallbacks)
    if name == "alexnet":  # the one model here that exercises the fallback (see ZOO)
        assert result.exporter == "dynamo" and result.fallbacks
    assert result.output_names == ("output",) and result.input_names == ("input",)
    if name not in BATCH3:
        return  # export_onnx itself has already checked the file at batch 2
    x3 = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x3).numpy()
    (got,) = _ort_run(result.path, x3)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 + 1e-4 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CLASSIFICATION if n not in HUGE and n not in ZOO])
def test_whole_classification_zoo_parity(name: str, tmp_path) -> None:
    """The rest of the classification zoo, original and shrunk to 50% (`-m slow`; the sample above runs in CI)."""
    model, x = build(name), example_input(name)
    _assert_parity(export_onnx(model, (x,), tmp_path / "original.onnx"))
    _assert_parity(export_onnx(fxmorph.shrink(model, 0.5, (x,)), (x,), tmp_path / "shrunk.onnx"))


class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x) + self.b(y))
        return h, h.sum(1, keepdim=True) * 2


def _tiny(width: int = 8) -> Tiny:
    torch.manual_seed(0)
    model = Tiny(width)
    nn.init.normal_(model.bn.running_mean)
    nn.init.uniform_(model.bn.running_var, 0.5, 2.0)
    return model.eval()


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


_REAL_SESSION = ort.InferenceSession


class _PerturbedSession:
    """An onnxruntime session whose first output has 0.5 added at index (0, 3)."""

    def __init__(self, *args, **kwargs) -> None:
        self._session = _REAL_SESSION(*args, **kwargs)

    def get_inputs(self):
        return self._session.get_inputs()

    def run(self, output_names, feed):
        outputs = self._session.run(output_names, feed)
        outputs[0] = outputs[0].copy()
        outputs[0][0, 3] += 0.5
        return outputs


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_mismatch_raises_with_largest_difference(exporter: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("fxmorph.io.onnx_parity.ort.InferenceSession", _PerturbedSession)
    path = tmp_path / "tiny.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(_tiny(), X, path, exporter=exporter)
    message = str(info.value)
    assert re.search(r"output 'output' differs by 0\.5\d* at index \(0, 3\)", message), message
    assert re.search(r"the largest difference is 0\.5\d*", message), message
    assert "rtol=0.0001" in message
    if exporter == "auto":  # both exporters were tried and both files disagreed
        assert "torchscript exporter" in message and "dynamo exporter" in message
    assert not path.exists()  # no unproven file is left behind


def test_mismatch_names_the_element_beyond_tolerance() -> None:
    # 0.05 on 200 is a mismatch, though the largest difference (0.09 on 1e3) is within tolerance.
    expected, actual = np.array([[1e3, 200.0]]), np.array([[1e3 + 0.09, 200.05]])
    with pytest.raises(_MismatchError, match=r"differs by 0\.05\d* at index \(0, 1\).*largest difference is 0\.09"):
        _compare([actual], [expected], ("output",), 1e-4, 1e-5, "at batch 1")


def test_float32_rounding_of_small_elements_in_a_large_output_passes() -> None:
    # Outputs of 1e7 (weights=None ResNets at 64x64) round near-zero elements by about 1e7 * 2**-24.
    expected, actual = np.array([[1.2e7, 0.0, 3.0]]), np.array([[1.2e7 + 6.5, 5.0, 3.0 - 8.0]])
    worst_abs, worst_rel = _compare([actual], [expected], ("output",), 1e-4, 1e-5, "at batch 1")
    assert worst_abs == 8.0 and worst_rel == pytest.approx(8.0 / 1.2e7)


def test_mismatch_against_another_model(tmp_path, monkeypatch) -> None:
    other = _tiny(width=8)
    nn.init.normal_(other.fc.bias, mean=3.0)
    monkeypatch.setattr("fxmorph.io.export._run_torch", lambda m, xs: [other(*xs).detach().numpy()])
    with pytest.raises(ExportError, match=r"largest difference is \d"):
        export_onnx(_tiny(), X, tmp_path / "tiny.onnx", exporter="torchscript")


def test_fallback_to_dynamo_is_recorded(tmp_path, monkeypatch) -> None:
    real_export = torch.onnx.export

    def no_torchscript(*args, **kwargs):
        if not kwargs.get("dynamo", True):
            raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 20 is not supported.")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    result = export_onnx(_tiny(), X, tmp_path / "tiny.onnx")
    assert result.exporter == "dynamo"
    assert len(result.fallbacks) == 1 and result.fallbacks[0].startswith("torchscript: RuntimeError")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    (got,) = _ort_run(result.path, X.repeat(3, 1, 1, 1))
    assert got.shape == (3, 5)


def test_torch_errors_are_wrapped(tmp_path, monkeypatch) -> None:
    cause = RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 20 is not supported.")

    def broken(*args, **kwargs):
        raise cause

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError) as info:
        export_onnx(_tiny(), X, tmp_path / "tiny.onnx")
    message = str(info.value)
    assert "could not be exported" in message
    assert "torchscript exporter failed" in message and "dynamo exporter failed" in message
    assert "aten::foo" in message and "opset" in message  # the cause and a fix
    assert info.value.__cause__ is cause


def test_model_that_does_not_run(tmp_path) -> None:
    with pytest.raises(ExportError, match="does not run on the example inputs"):
        export_onnx(_tiny(), torch.randn(1, 4, 16, 16), tmp_path / "tiny.onnx")


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(fxmorph.InputError):
        export_onnx(lambda x: x, X, tmp_path / "f.onnx")
    with pytest.raises(fxmorph.InputError):
        export_onnx(_tiny(), X, tmp_path / "f.onnx", exporter="tflite")
    with pytest.raises(fxmorph.InputError):
        export_onnx(_tiny(), (X, 3), tmp_path / "f.onnx")
    assert issubclass(ExportError, fxmorph.FxmorphError)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_user_model_is_unchanged(exporter: str, tmp_path) -> None:
    model = _tiny().train()
    model.bn.eval()  # a mix of flags, which must all survive
    cg = fxmorph.analyze(_tiny(), (X,))
    small = fxmorph.resize(cg, random_plan(cg, seed=1)).train()
    for m in (model, small):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        flags = {n: s.training for n, s in m.named_modules()}
        params = {n: (id(p), p.requires_grad) for n, p in m.named_parameters()}
        code = m.code if isinstance(m, fx.GraphModule) else None
        export_onnx(m, X, tmp_path / f"{type(m).__name__}.onnx", exporter=exporter)
        after = m.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert {n: s.training for n, s in m.named_modules()} == flags
        assert {n: (id(p), p.requires_grad) for n, p in m.named_parameters()} == params
        assert all(not s._forward_hooks and not s._forward_pre_hooks for s in m.modules())
        assert code is None or m.code == code


def test_dynamic_batch(tmp_path) -> None:
    model = _tiny()
    result = export_onnx(model, X, tmp_path / "dyn.onnx")
    assert result.dynamic_batch
    x3 = torch.randn(3, 3, 16, 16)
    (got,) = _ort_run(result.path, x3)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x3).numpy(), rtol=1e-4, atol=1e-5)

    fixed = export_onnx(model, X, tmp_path / "fixed.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(fixed.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 16, 16]
    with pytest.raises(Exception, match=r"(?i)dimension"):
        session.run(None, {"input": x3.numpy()})


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_several_inputs_and_outputs(exporter: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    x, y = torch.randn(2, 6), torch.randn(2, 3)
    result = export_onnx(model, (x, y), tmp_path / "two.onnx", exporter=exporter, opset=18)
    assert result.input_names == ("input_0", "input_1") and result.output_names == ("output_0", "output_1")
    assert result.exporter == exporter and result.opset == 18
    got = _ort_run(result.path, x[:1], y[:1])
    with torch.no_grad():
        expected = model(x[:1], y[:1])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)


def test_unchecked_export(tmp_path) -> None:
    result = export_onnx(_tiny(), X, tmp_path / "sub" / "tiny.onnx", check=False)
    assert result.path.exists() and not result.checked
    assert result.max_abs_diff is None and result.max_rel_diff is None
    assert result.exporter == "torchscript" and result.opset > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.exporter = "dynamo"  # type: ignore[misc]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory) -> tuple[ExportResult, ExportResult]:
    folder = tmp_path_factory.mktemp("latency")
    return (export_onnx(_tiny(8), X, folder / "small.onnx"), export_onnx(_tiny(64), X, folder / "wide.onnx"))


def test_measure_latency(two_files) -> None:
    small, wide = two_files
    report = measure_latency(
        {"small": small.path, "small_again": small.path.read_bytes(), "wide": wide},
        X,
        threads=1,
        warmup=3,
        rounds=12,
        repeats_per_round=2,
    )
    assert isinstance(report, LatencyReport)
    assert [m.name for m in report.models] == ["small", "small_again", "wide"] and report.baseline == "small"
    for m in report.models:
        assert 0 < m.min_ms <= m.median_ms <= m.p90_ms
        assert len(m.samples_ms) == 12 and all(s > 0 for s in m.samples_ms)
    assert report["small"].ratio == 1.0 and report["small"].paired_ratio == 1.0 and report["small"].steady_ratio == 1.0
    for m in report.models:  # the steady ratio reads the fast tails: 10th percentiles over the baseline's
        assert m.min_ms <= m.p10_ms <= m.median_ms
        assert m.steady_ratio == pytest.approx(m.p10_ms / report["small"].p10_ms)
    assert all(0 < r < math.inf for r in (report["small_again"].ratio, report["small_again"].paired_ratio))
    assert (report.threads, report.inter_op_threads, report.warmup, report.rounds) == (1, 1, 3, 12)
    assert report.repeats_per_round == 2 and not report.allow_spinning
    assert report.ort_version == ort.__version__ and report.graph_optimization == "ORT_ENABLE_ALL"
    data = json.loads(json.dumps(report.to_dict()))
    assert data["models"][2]["name"] == "wide" and len(data["models"][2]["samples_ms"]) == 12
    table = report.table()
    assert all(name in table for name in ("small", "small_again", "wide", "median", "ORT_ENABLE_ALL"))


def test_measure_latency_interleaves_in_rotated_order(two_files, monkeypatch) -> None:
    small, wide = two_files
    calls: list[str] = []
    real_run = ort.InferenceSession.run

    def spy(self, output_names, feed, *args, **kwargs):
        calls.append(self._model_path)
        return real_run(self, output_names, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", spy)
    report = measure_latency({"a": small.path, "b": wide.path}, (X,), threads=1, warmup=0, rounds=4)
    assert report.threads == 1 and report.warmup == 0
    timed = calls[-4 * 2 :]
    a, b = str(small.path), str(wide.path)
    assert timed == [a, b, b, a, a, b, b, a]


def test_measure_latency_takes_session_copies_in_turn(two_files, monkeypatch) -> None:
    """``sessions=2`` loads each model twice; the rounds alternate between the copies, and the paired ratio is the
    mean of each copy's median ratio."""
    small, wide = two_files
    used: list[int] = []
    real_run = ort.InferenceSession.run

    def spy(self, output_names, feed, *args, **kwargs):
        used.append(id(self))
        return real_run(self, output_names, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", spy)
    report = measure_latency({"a": small.path, "b": wide.path}, (X,), threads=1, warmup=0, rounds=6, sessions=2)
    timed = used[-6 * 2 :]
    rounds = [tuple(timed[2 * r : 2 * r + 2]) for r in range(6)]
    even, odd = {s for r in rounds[0::2] for s in r}, {s for r in rounds[1::2] for s in r}
    assert len(even) == len(odd) == 2 and not even & odd  # two sessions per copy, never shared between copies
    assert report.sessions == 2 and "over 2 sessions each" in report.table()
    b, a = np.asarray(report["b"].samples_ms), np.asarray(report["a"].samples_ms)
    per_copy = [np.median((b / a)[c::2]) for c in range(2)]
    assert report["b"].paired_ratio == pytest.approx(np.mean(per_copy))
    with pytest.raises(fxmorph.InputError, match="sessions"):
        measure_latency({"a": small.path}, (X,), sessions=0)


def test_measure_latency_errors(two_files) -> None:
    small, _ = two_files
    with pytest.raises(fxmorph.InputError, match="at least one model"):
        measure_latency({}, X)
    with pytest.raises(fxmorph.InputError, match="cannot load"):
        measure_latency({"junk": b"not an onnx file"}, X)
    with pytest.raises(fxmorph.InputError, match="1 input"):
        measure_latency({"small": small.path}, (X, X))
    with pytest.raises(fxmorph.InputError, match="does not run"):
        measure_latency({"small": small.path}, torch.randn(1, 4, 16, 16))
    with pytest.raises(fxmorph.InputError, match="optimisation level"):
        measure_latency({"small": small.path}, X, graph_optimization="fastest")
    report = measure_latency(
        {"small": small.path}, {"input": X}, threads=1, warmup=1, rounds=2, graph_optimization="basic"
    )
    assert report.graph_optimization == "ORT_ENABLE_BASIC"


def test_compare_latency(tmp_path) -> None:
    model = _tiny(32)
    cg = fxmorph.analyze(model, (X,))
    small = fxmorph.resize(cg, random_plan(cg, seed=0))
    snapshot = copy.deepcopy(model.state_dict())
    report = compare_latency(model, small, (X,), tmp_path, threads=1, warmup=2, rounds=5)
    assert [m.name for m in report.models] == ["original", "shrunk"]
    assert (tmp_path / "original.onnx").exists() and (tmp_path / "shrunk.onnx").exists()
    assert report["shrunk"].median_ms > 0 and report.rounds == 5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
