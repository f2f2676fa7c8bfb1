"""Bad input at the file-writing and file-reading entry points: export_onnx, measure_latency /
compare_latency, save and load (rows of ``docs/bad_input.md``).

Besides the error (class, cause and fix in the message, raised by fxmorph) and the unchanged model, every
test that involves a file checks that the user's files are byte-for-byte as before.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxmorph
from fxmorph import ExportError, InputError, SerializationError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import Net, X, assert_error, assert_unchanged, meta_net, snapshot


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check(call: Callable[[], Any], error: type[fxmorph.FxmorphError], words: tuple[str, ...], model: nn.Module,
           root: Path) -> None:  # fmt: skip
    """The error, the model unchanged, and no file under ``root`` written, changed or removed."""
    before, files = snapshot(model), _files(root)
    assert_error(call, error, *words)
    assert_unchanged(model, before)
    assert _files(root) == files


# -- export_onnx --------------------------------------------------------------------------------------------
EXPORT: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, Path], Any], type, tuple[str, ...]]] = {
    "meta-device model": (meta_net, lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx"), InputError,
                          ("meta device", "to_empty")),
    "bfloat16 model": (lambda: Net().to(torch.bfloat16), lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx"),
                       InputError, ("bfloat16", "model.float()")),
    "path is a directory": (Net, lambda m, d: fxmorph.export_onnx(m, X, d / "dir"), InputError,
                            ("is a directory", "file path inside it")),
    "parent is a file": (Net, lambda m, d: fxmorph.export_onnx(m, X, d / "user.txt" / "m.onnx"), InputError,
                         ("cannot be created", "is a file, not a directory")),
    "path not a path": (Net, lambda m, d: fxmorph.export_onnx(m, X, 3), InputError, ("must be a path",)),
    "negative rtol": (Net, lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx", rtol=-1e-4), InputError,
                      ("rtol", "at least 0")),
    "rtol and atol both 0": (Net, lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx", rtol=0, atol=0), InputError,
                             ("both 0", "rtol=1e-4")),
    "opset a string": (Net, lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx", opset="17"), InputError,
                       ("opset", "an int from 7")),
    "opset beyond the exporter": (Net, lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx", opset=99), InputError,
                                  ("opset", "an int from 7 to", "got 99")),
    "float32 inputs to a float16 model": (lambda: Net().half(), lambda m, d: fxmorph.export_onnx(m, X, d / "m.onnx"),
                                          ExportError, ("input 0 is float32", "x.to(torch.float16)")),
    "meta-device inputs": (Net, lambda m, d: fxmorph.export_onnx(m, X.to("meta"), d / "m.onnx"), InputError,
                           ("meta device", "torch.randn")),
}  # fmt: skip


def _user_files(root: Path) -> None:
    (root / "dir").mkdir()
    (root / "user.txt").write_text("the user's notes\n")


@pytest.mark.parametrize("case", list(EXPORT))
def test_export(case: str, tmp_path: Path) -> None:
    make, call, error, words = EXPORT[case]
    _user_files(tmp_path)
    model = make()
    _check(lambda: call(model, tmp_path), error, words, model, tmp_path)


def test_failed_export_leaves_the_file_already_at_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter that fails after writing part of the file (here: every exporter) must not touch the user's
    earlier file at ``path``."""
    (tmp_path / "model.onnx").write_bytes(b"the user's earlier export")

    def half_written(model: nn.Module, args: Any, f: str, **kw: Any) -> None:
        Path(f).write_bytes(b"garbage")
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 20 is not supported.")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    model = Net()
    _check(lambda: fxmorph.export_onnx(model, X, tmp_path / "model.onnx"), ExportError,
           ("could not be exported", "fix: an operator has no onnx translation"), model, tmp_path)  # fmt: skip


def test_float64_model_names_the_missing_kernel(tmp_path: Path) -> None:
    model = Net().double()
    _check(lambda: fxmorph.export_onnx(model, X.double(), tmp_path / "m.onnx"), ExportError,
           ("could not find an implementation", "export the model in float32"), model, tmp_path)  # fmt: skip


def test_float16_model_exports_with_float16_tolerances(tmp_path: Path) -> None:
    """Supported: checked against torch to rtol=1e-2, atol=1e-3 (a few float16 rounding steps)."""
    model = Net().half().eval()
    before = snapshot(model)
    result = fxmorph.export_onnx(model, X.half(), tmp_path / "half.onnx")
    assert result.checked and result.max_rel_diff is not None and result.max_rel_diff < 1e-2
    assert_unchanged(model, before)
    assert [p.name for p in tmp_path.iterdir()] == ["half.onnx"]  # no scratch directory left behind


# -- measure_latency / compare_latency ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    fxmorph.export_onnx(Net(), X, path)
    return path


LATENCY: dict[str, tuple[Callable[[Path], Any], tuple[str, ...]]] = {
    "models a list": (lambda f: fxmorph.measure_latency([f], X), ("must be a mapping", "{'original'")),
    "a torch model instead of a file": (lambda f: fxmorph.measure_latency({"net": Net()}, X),
                                        ("is a SmallNet", "export it first")),
    "rounds a string": (lambda f: fxmorph.measure_latency({"net": f}, X, rounds="5"), ("rounds must be an int",)),
    "warmup negative": (lambda f: fxmorph.measure_latency({"net": f}, X, warmup=-1), ("warmup", "at least 0")),
    "threads a float": (lambda f: fxmorph.measure_latency({"net": f}, X, threads=1.5), ("threads", "at least 1")),
    "inputs None": (lambda f: fxmorph.measure_latency({"net": f}, None), ("inputs must be", "nonetype")),
    "meta-device inputs": (lambda f: fxmorph.measure_latency({"net": f}, X.to("meta")), ("meta device",)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LATENCY))
def test_measure_latency(case: str, onnx_file: Path) -> None:
    call, words = LATENCY[case]
    files = _files(onnx_file.parent)
    assert_error(lambda: call(onnx_file), InputError, *words)
    assert _files(onnx_file.parent) == files


COMPARE: dict[str, tuple[Callable[[nn.Module, Path], Any], tuple[str, ...]]] = {
    "unknown measure option": (lambda m, d: fxmorph.compare_latency(m, m, X, d / "out", round=5),
                               ("unknown measure_latency option 'round'", "did you mean 'rounds'")),
    "unknown export option": (lambda m, d: fxmorph.compare_latency(m, m, X, d / "out", export_kwargs={"opset_": 17}),
                              ("unknown export_kwargs option 'opset_'", "did you mean 'opset'")),
    "workdir is a file": (lambda m, d: fxmorph.compare_latency(m, m, X, d / "user.txt"), ("is a file", "directory")),
    "shrunk model not a module": (lambda m, d: fxmorph.compare_latency(m, "small.onnx", X, d / "out"),
                                  ("torch.nn.module",)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(COMPARE))
def test_compare_latency(case: str, tmp_path: Path) -> None:
    """Every option is checked before the first export: nothing is written."""
    call, words = COMPARE[case]
    _user_files(tmp_path)
    model = Net()
    _check(lambda: call(model, tmp_path), InputError, words, model, tmp_path)


# -- save ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(0)
    return fxmorph.shrink(Net(), 0.5, (X,))


SAVE: dict[str, tuple[Callable[[nn.Module, Path], Any], tuple[str, ...]]] = {
    "path is a directory": (lambda m, d: fxmorph.save(m, d / "dir"), ("is a directory", "file path inside it")),
    "parent directory missing": (lambda m, d: fxmorph.save(m, d / "nope" / "s.pt"), ("does not exist", "create it")),
    "parent is a file": (lambda m, d: fxmorph.save(m, d / "user.txt" / "s.pt"), ("is a file, not a directory",)),
    "path not a path": (lambda m, d: fxmorph.save(m, None), ("must be a path",)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SAVE))
def test_save(case: str, small: nn.Module, tmp_path: Path) -> None:
    call, words = SAVE[case]
    _user_files(tmp_path)
    _check(lambda: call(small, tmp_path), SerializationError, words, small, tmp_path)


@pytest.mark.parametrize(("make", "words"), [(meta_net, ("meta device", "to_empty")),
                                             (lambda: "small.pt", ("torch.nn.module", "model object"))])  # fmt: skip
def test_save_a_model_without_data(make: Callable[[], Any], words: tuple[str, ...], tmp_path: Path) -> None:
    model = make()
    assert_error(lambda: fxmorph.save(model, tmp_path / "s.pt"), SerializationError, *words)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_file_already_at_path(small: nn.Module, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A write that fails half-way (a full disk) leaves the user's earlier file intact."""
    (tmp_path / "small.pt").write_bytes(b"the user's earlier save")

    def disk_full(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    _check(lambda: fxmorph.save(small, tmp_path / "small.pt"), SerializationError, ("cannot write", "no space left"),
           small, tmp_path)  # fmt: skip


# -- load ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def saved_as_on_cuda() -> Iterator[None]:
    """``torch.save`` tags every tensor as CUDA memory, as on a GPU machine (``torch.load`` without
    ``map_location`` then fails here: 'Attempting to deserialize object on a CUDA device')."""
    registry = torch.serialization._package_registry
    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    registry.insert(0, entry)
    try:
        yield
    finally:
        registry.remove(entry)


@pytest.fixture(scope="module")
def saved(small: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "small.pt"
    fxmorph.save(small, path)
    return path


def _load_check(path: Path, original: Any, error: type, words: tuple[str, ...], inputs: Any = None) -> None:
    data = path.read_bytes()
    before = snapshot(original) if isinstance(original, nn.Module) else None
    assert_error(lambda: fxmorph.load(path, original, inputs), error, *words)
    assert path.read_bytes() == data
    if before is not None:
        assert_unchanged(original, before)


def test_load_path_not_a_path(saved: Path) -> None:
    assert_error(lambda: fxmorph.load(3, Net()), SerializationError, "path must be a str or pathlib.path")


def test_load_original_not_a_module(saved: Path) -> None:
    _load_check(saved, "Net", SerializationError, ("expects the original torch.nn.module",))


def test_load_into_an_original_of_another_dtype(saved: Path) -> None:
    _load_check(saved, Net().half(), SerializationError, ("holds a float32 model", "original.to(torch.float32)"))


def test_load_into_a_meta_device_original(saved: Path) -> None:
    _load_check(saved, meta_net(), InputError, ("meta device", "to_empty"))


def test_load_a_file_saved_on_a_cuda_machine(small: nn.Module, tmp_path: Path) -> None:
    """Supported: every tensor is mapped to the CPU (``map_location='cpu'``)."""
    with saved_as_on_cuda():
        fxmorph.save(small, tmp_path / "cuda.pt")
    data = (tmp_path / "cuda.pt").read_bytes()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really is tagged as CUDA memory
            torch.load(tmp_path / "cuda.pt", weights_only=True)
    loaded = fxmorph.load(tmp_path / "cuda.pt", Net())
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    for a, b in zip(loaded.state_dict().values(), small.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (tmp_path / "cuda.pt").read_bytes() == data


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_round_trip(dtype: torch.dtype, tmp_path: Path) -> None:
    """Supported: a float16/bfloat16 model saves and loads in its dtype."""
    original = Net().to(dtype)
    small = fxmorph.shrink(original, 0.5, (X.to(dtype),))
    fxmorph.save(small, tmp_path / "small.pt")
    loaded = fxmorph.load(tmp_path / "small.pt", Net().to(dtype))
    assert {t.dtype for t in loaded.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.equal(loaded(X.to(dtype)), small(X.to(dtype)))
