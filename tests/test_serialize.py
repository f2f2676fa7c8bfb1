"""fxmorph.io.serialize: save a shrunk model as plain containers and tensors, load it back with weights_only=True."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxmorph
from fxmorph.analysis.plan import WidthPlan
from fxmorph.io.serialize import FORMAT_VERSION, SerializationError, load, save
from fxmorph.io.serialize_format import _checksum

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
PACKAGE = Path(fxmorph.__file__).resolve().parent

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "densenet121": lambda: torchvision.models.densenet121(weights=None),
    "vit_b_16": lambda: torchvision.models.vit_b_16(weights=None, image_size=64),
}


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[name]().eval()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    small = fxmorph.shrink(_build("resnet18", 0), "50%", (X,))
    path = tmp_path_factory.mktemp("saved") / "resnet18.fxm"
    save(small, path)
    return path, small


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool | torch.Tensor)


def _rewrite(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    """Load a saved file, change it, and write it back with consistent checksums."""
    data = torch.load(src, weights_only=True)
    change(data)
    data["checksums"] = {k: _checksum(v) for k, v in data["state_dict"].items()}
    torch.save(data, dst)
    return dst


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    original = _build(name, 0)
    small = fxmorph.shrink(original, "50%", (X,))
    assert fxmorph.count_flops(small, (X,)) <= fxmorph.count_flops(original, (X,)) // 2
    path = tmp_path / f"{name}.fxm"
    save(small, path)

    data = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert _plain(data)
    assert data["format_version"] == FORMAT_VERSION
    assert data["example_inputs"] == [{"shape": [1, 3, 64, 64], "dtype": "float32"}]
    report = fxmorph.metadata(small)["fxmorph.report"]
    assert data["widths"] == {r.id: r.after for r in report.groups if not r.pinned}
    assert any(r.after < r.before for r in report.groups)

    # The architecture, with other random weights: every weight must come from the file.
    other = _build(name, 1)
    loaded = load(path, other)
    assert type(loaded) is type(other) and loaded is not other  # the user's class, a new object
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert loaded.training == small.training


def test_widths_from_the_original_match_the_report(tmp_path: Path, resnet18_file: tuple[Path, nn.Module]) -> None:
    path, small = resnet18_file
    again = tmp_path / "with_original.fxm"
    save(small, again, original=_build("resnet18", 3), example_inputs=(X,))
    assert torch.load(again, weights_only=True)["widths"] == torch.load(path, weights_only=True)["widths"]
    with torch.no_grad():
        assert torch.equal(load(again, _build("resnet18", 4), (X,))(X), small(X))


def test_a_resized_model_without_report(tmp_path: Path) -> None:
    """fxmorph.resize output carries no report: the widths come from the original, or from the tensors."""
    original = _build("resnet18", 0)
    cg = fxmorph.analyze(original, (X,))
    small = fxmorph.resize(cg, WidthPlan.from_widths(cg, {g.id: max(1, g.size // 3) for g in cg.free_groups}))
    for kwargs in ({}, {"original": original, "example_inputs": (X,)}):
        path = tmp_path / f"resized{len(kwargs)}.fxm"
        save(small, path, **kwargs)
        assert bool(torch.load(path, weights_only=True)["widths"]) == bool(kwargs)
        with torch.no_grad():
            assert torch.equal(load(path, _build("resnet18", 5))(X), small(X))


def test_a_folded_bias_survives(tmp_path: Path) -> None:
    """A dead-channel fold gives a bias-less layer a bias; the rebuilt model must have it too."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, bias=False), nn.ReLU()).eval()

    original = make()
    with torch.no_grad():
        original[0].weight[:4] = 0
        original[0].bias[:4] = 1.0  # four channels that are constantly 1
    x = torch.randn(1, 3, 16, 16)
    small = fxmorph.shrink(original, "60%", (x,), round_to=1)
    assert "2.bias" in small.state_dict()
    save(small, tmp_path / "fold.fxm")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "fold.fxm", make())(x), small(x))


def test_truncated_file(tmp_path: Path, resnet18_file: tuple[Path, nn.Module]) -> None:
    blob = resnet18_file[0].read_bytes()
    for size in (0, 100, len(blob) // 2, len(blob) - 10):
        (tmp_path / "cut.fxm").write_bytes(blob[:size])
        with pytest.raises(SerializationError, match="truncated, corrupted"):
            load(tmp_path / "cut.fxm", _build("resnet18", 0))


def test_corrupted_file(tmp_path: Path, resnet18_file: tuple[Path, nn.Module]) -> None:
    blob = resnet18_file[0].read_bytes()
    middle = len(blob) // 2  # inside the tensor data, which torch.load does not check
    (tmp_path / "bad.fxm").write_bytes(blob[:middle] + bytes(4096) + blob[middle + 4096 :])
    with pytest.raises(SerializationError, match="does not match its checksum"):
        load(tmp_path / "bad.fxm", _build("resnet18", 0))
    (tmp_path / "head.fxm").write_bytes(bytes(256) + blob[256:])
    with pytest.raises(SerializationError, match="cannot read"):
        load(tmp_path / "head.fxm", _build("resnet18", 0))
    (tmp_path / "noise.fxm").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(SerializationError, match="cannot read"):
        load(tmp_path / "noise.fxm", _build("resnet18", 0))
    with pytest.raises(SerializationError, match="no file"):
        load(tmp_path / "missing.fxm", _build("resnet18", 0))


def test_foreign_or_newer_files(tmp_path: Path, resnet18_file: tuple[Path, nn.Module]) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(SerializationError, match=re.escape("not a file written by fxmorph.save")):
        load(tmp_path / "foreign.pt", _build("resnet18", 0))
    torch.save(_build("resnet18", 0).state_dict(), tmp_path / "state.pt")
    with pytest.raises(SerializationError, match=re.escape("not a file written by fxmorph.save")):
        load(tmp_path / "state.pt", _build("resnet18", 0))
    newer = _rewrite(resnet18_file[0], tmp_path / "newer.fxm", lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(SerializationError, match="newer than this fxmorph"):
        load(newer, _build("resnet18", 0))
    no_key = _rewrite(resnet18_file[0], tmp_path / "nokey.fxm", lambda d: d.pop("widths"))
    with pytest.raises(SerializationError, match="entry 'widths' is missing"):
        load(no_key, _build("resnet18", 0))


def test_mismatching_shapes(tmp_path: Path, resnet18_file: tuple[Path, nn.Module]) -> None:
    path = resnet18_file[0]

    def consumer(d: dict) -> None:  # a layer that reads a group, given a width no group has
        d["state_dict"]["fc.weight"] = torch.zeros(1000, 100)
        d["shapes"]["fc.weight"] = [1000, 100]

    with pytest.raises(SerializationError, match=re.escape("wrong shape, first 'fc.weight'")):
        load(_rewrite(path, tmp_path / "consumer.fxm", consumer), _build("resnet18", 0))

    def producer(d: dict) -> None:  # a producer disagrees with the stored width of its group
        w = d["state_dict"]["layer1.0.conv1.weight"]
        d["state_dict"]["layer1.0.conv1.weight"] = torch.zeros(w.shape[0] - 1, *w.shape[1:])
        d["shapes"]["layer1.0.conv1.weight"] = [w.shape[0] - 1, *w.shape[1:]]

    with pytest.raises(SerializationError, match="but its tensors have width"):
        load(_rewrite(path, tmp_path / "producer.fxm", producer), _build("resnet18", 0))

    def listed(d: dict) -> None:  # the shape list disagrees with the tensor
        d["shapes"]["fc.bias"] = [999]

    with pytest.raises(SerializationError, match=re.escape("corrupted: tensor 'fc.bias' has shape")):
        load(_rewrite(path, tmp_path / "listed.fxm", listed), _build("resnet18", 0))

    with pytest.raises(SerializationError, match="another architecture"):  # the wrong original model
        load(path, torchvision.models.resnet34(weights=None))
    with pytest.raises(SerializationError, match="differ from those the model was saved with"):
        load(path, _build("resnet18", 0), (torch.randn(1, 3, 32, 32),))


def test_no_unsafe_unpickling_in_the_package() -> None:
    """No ``weights_only=False`` anywhere in fxmorph; every torch.load names weights_only, and the only one
    that is not ``weights_only=True`` is the CLI's --trust-checkpoint (the user vouching for the file)."""
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text(encoding="utf-8")
        assert not re.search(r"weights_only\s*=\s*False", text), file
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            arguments = call.group(0)
            assert "weights_only=" in arguments, (file, arguments)
            if "weights_only=True" not in arguments:
                where = file.relative_to(PACKAGE).as_posix()
                assert where == "cli/inputs.py" and "weights_only=not trust" in arguments, (file, arguments)
    assert "weights_only=True" in (PACKAGE / "io" / "serialize.py").read_text(encoding="utf-8")
