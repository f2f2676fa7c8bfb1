"""The command line: ``fxmorph-export`` and ``python -m fxmorph`` are one program (run here as subprocesses).

Each full run shrinks a model at 64x64, exports both ONNX files (checked against torch by the export
step), times them for 5 rounds and writes the report; the tests then load the files in onnxruntime
themselves, read ``report.json`` and check the plots. Every bad input must exit with code 2, print
exactly one line on stderr and no traceback, and write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import cli_models  # noqa: E402

SHAPE = "1,3,64,64"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "fxmorph", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_out(path: Path, x: torch.Tensor) -> np.ndarray:
    session = _session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _torch_out(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def _original(spec: str) -> torch.nn.Module:
    """The model exactly as the CLI builds it (seed 0, random weights)."""
    torch.manual_seed(0)
    if ":" in spec:
        return getattr(cli_models, spec.partition(":")[2])().eval()
    return torchvision.models.get_model(spec, weights=None).eval()


def _assert_one_line(result: subprocess.CompletedProcess, message: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert lines[0].startswith("fxmorph-export: error: ")
    assert result.stdout == ""


def _check_report(out: Path, model: str, rounds: int = 5) -> dict:
    data = json.loads((out / "report.json").read_text())
    assert data["model"] == model and data["input_shape"] == [1, 3, 64, 64]
    for key in ("flops", "macs", "params"):
        assert 0 < data[key]["after"] <= data[key]["before"], key
    assert data["macs"]["before"] * 2 == data["flops"]["before"]
    assert data["flops"]["after"] <= data["budget"]["flops"] == data["flops"]["before"] // 2
    lat = data["latency"]
    assert lat["measured"] and lat["before_ms"] > 0 and lat["after_ms"] > 0
    assert lat["before_ms"] == lat["models"]["original"]["median_ms"]
    assert lat["after_ms"] == lat["models"]["shrunk"]["median_ms"]
    settings = lat["settings"]
    assert settings["rounds"] == rounds and settings["threads"] >= 1 and settings["warmup"] >= 1
    assert settings["ort_version"] == ort.__version__ and settings["provider"] == "CPUExecutionProvider"
    assert len(lat["models"]["shrunk"]["samples_ms"]) == rounds
    assert set(data["versions"]) >= {"torch", "torchvision", "onnxruntime", "fxmorph"}
    assert data["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert data["command"]["argv"][1] == model and "--budget-flops" in data["command"]["line"]
    rows = data["groups"]["rows"]
    assert rows and data["groups"]["total"] == len(rows)
    assert any(r["after"] < r["before"] for r in rows)
    assert all(r["after"] == r["before"] for r in rows if r["pinned"])
    assert [p["group"] for p in data["pins"]] == [r["id"] for r in rows if r["pinned"]]
    assert all(p["reason"] for p in data["pins"])
    for name in ("original", "shrunk"):
        info = data["onnx"][name]
        assert info["checked_in_onnxruntime"] and info["max_abs_diff"] is not None
        assert info["max_rel_diff"] < 1e-4
    for name in ("original.onnx", "shrunk.onnx", "report.md", "widths.png", "latency.png", "flops.png"):
        assert (out / name).is_file(), name
    for name in ("widths.png", "latency.png", "flops.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    md = (out / "report.md").read_text()
    assert "## Latency" in md and "median ms" in md and "![Width per group](widths.png)" in md
    return data


Quick = dict[str, subprocess.CompletedProcess]
SCRIPT = shutil.which("fxmorph-export", path=str(Path(sys.executable).parent))


def _links_to_elsewhere(root: Path) -> None:
    """``root/out`` whose result files are links to files in ``root/elsewhere`` (see the --force test)."""
    out, elsewhere = root / "out", root / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for name in ("shrunk.onnx", "report.json", "report.md"):
        (elsewhere / name).write_bytes(b"precious " + name.encode())
        (out / name).symlink_to(elsewhere / name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder for each quick case: empty (--explain), holding links (--force) or a pickled model (trust)."""
    paths = {case: tmp_path_factory.mktemp(case) for case in ("explain", "force", "trust", "fail")}
    _links_to_elsewhere(paths["force"])
    torch.save(cli_models.small_net(), paths["trust"] / "model.pt")  # a pickled module, not a state dict
    return paths


@pytest.fixture(scope="module")
def quick(folders: dict[str, Path]) -> Quick:
    """The processes of the quick cases, two at a time: each is mostly interpreter start-up (the start-ups,
    not the cases, made this file slow). Each case's test below checks its own result."""
    from concurrent.futures import ThreadPoolExecutor

    checkpoint, fail = str(folders["trust"] / "model.pt"), str(folders["fail"])
    trust = ["cli_models:small_net", "--explain", "--input-shape", SHAPE, "--checkpoint", checkpoint]
    untraceable = ["cli_models:untraceable", "--budget-flops", "50%", "--input-shape", SHAPE, "--out"]
    force = ["cli_models:small_net", "--budget-flops", "0.5", "--input-shape", SHAPE, "--no-latency", "--force"]
    cases = {
        "help": lambda: _run("--help"),
        "explain": lambda: _run("resnet18", "--input-shape", SHAPE, "--explain", cwd=folders["explain"]),
        "force": lambda: _run(*force, "--out", str(folders["force"] / "out"), cwd=folders["force"]),
        "untrusted": lambda: _run(*trust),
        "trusted": lambda: _run(*trust, "--trust-checkpoint"),
        # an --out of its own each: the two run at once
        "failure": lambda: _run(*untraceable, f"{fail}/out"),
        "failure verbose": lambda: _run(*untraceable, f"{fail}/out_verbose", "--verbose"),
    }
    if SCRIPT is not None:
        cases["console script"] = lambda: subprocess.run(
            [SCRIPT, "--help"], capture_output=True, text=True, timeout=120
        )
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(run) for case, run in cases.items()}
    return {case: future.result() for case, future in futures.items()}


def test_help(quick: Quick) -> None:
    result = quick["help"]
    assert result.returncode == 0
    assert "fxmorph-export" in result.stdout and "--budget-flops" in result.stdout


def test_console_script(quick: Quick) -> None:
    if SCRIPT is None:
        pytest.skip("the fxmorph-export entry point is not installed next to this interpreter")
    result = quick["console script"]
    assert result.returncode == 0 and "usage: fxmorph-export" in result.stdout


def test_explain_analyses_a_torchvision_model(quick: Quick, folders: dict[str, Path]) -> None:
    tmp_path = folders["explain"]
    result = quick["explain"]
    assert result.returncode == 0, result.stderr
    assert "13 channel groups (12 free)" in result.stdout
    assert "model output" in result.stdout
    assert list(tmp_path.iterdir()) == []  # --explain alone writes nothing


def test_resnet18_end_to_end(tmp_path: Path) -> None:
    import fxmorph

    out = tmp_path / "out"
    result = _run("resnet18", "--budget-flops", "50%", "--out", str(out), "--input-shape", SHAPE, "--rounds", "5",
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing written outside --out
    data = _check_report(out, "resnet18")
    assert data["groups"]["total"] == 13 and data["groups"]["free"] == 12
    for line in ("FLOPs", "MACs", "parameters", "latency (median)", "ONNX max abs diff", "13 channel groups"):
        assert line in result.stdout, line

    # The files load in onnxruntime and compute what torch computes, also at another batch size.
    model = _original("resnet18")
    x = torch.randn(3, 3, 64, 64)
    np.testing.assert_allclose(_onnx_out(out / "original.onnx", x), _torch_out(model, x), rtol=1e-4, atol=1e-4)
    small = fxmorph.shrink(model, "50%", (torch.randn(1, 3, 64, 64),))  # same weights, same settings
    assert fxmorph.count_params(small) == data["params"]["after"]
    np.testing.assert_allclose(_onnx_out(out / "shrunk.onnx", x), _torch_out(small, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["mobilenet_v2", pytest.param("cli_models:vit_b_16_64", marks=pytest.mark.slow)])
def test_other_models_end_to_end(tmp_path: Path, model: str) -> None:
    out = tmp_path / "out"
    result = _run(model, "--budget-flops", "50%", "--out", str(out), "--input-shape", SHAPE, "--rounds", "5")
    assert result.returncode == 0, result.stderr
    _check_report(out, model)
    x = torch.randn(2, 3, 64, 64)
    original = _original(model)
    np.testing.assert_allclose(_onnx_out(out / "original.onnx", x), _torch_out(original, x), rtol=1e-4, atol=1e-4)
    assert _onnx_out(out / "shrunk.onnx", x).shape == _torch_out(original, x).shape


def test_factory_with_checkpoint_json_and_force(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = cli_models.small_net().eval()
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "out"
    args = ["cli_models:small_net", "--budget-flops", "0.5", "--out", str(out), "--input-shape", SHAPE,
            "--checkpoint", str(tmp_path / "weights.pt"), "--round-to", "1", "--criterion", "l2"]  # fmt: skip
    result = _run(*args, "--json", "--no-latency", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is the JSON and nothing else
    assert data == json.loads((out / "report.json").read_text())
    assert data["latency"] == {"measured": False, "reason": "--no-latency"}
    assert not (out / "latency.png").exists() and (out / "widths.png").is_file()
    assert data["checkpoint"]["tensors"] == len(trained.state_dict())
    assert data["settings"]["criterion"] == "l2" and data["settings"]["round_to"] == 1
    assert abs(data["flops"]["ratio"] - 0.5) < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "weights.pt"]
    x = torch.randn(2, 3, 64, 64)  # the checkpoint's weights, not the factory's, went into the file
    np.testing.assert_allclose(_onnx_out(out / "original.onnx", x), _torch_out(trained, x), rtol=1e-4, atol=1e-5)

    again = _run(*args, cwd=tmp_path)
    _assert_one_line(again, "--force")
    forced = _run(*args, "--force", "--rounds", "5", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "report.json").read_text())["latency"]["measured"]
    assert (out / "latency.png").is_file()


def test_force_never_writes_through_links_outside_out(quick: Quick, folders: dict[str, Path]) -> None:
    """--force replaces result files in --out; a result name that is a link to a file elsewhere is
    replaced by a new file, and the file it pointed to keeps its bytes."""
    tmp_path = folders["force"]
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    result = quick["force"]
    assert result.returncode == 0, result.stderr
    for name in ("shrunk.onnx", "report.json", "report.md"):
        assert (elsewhere / name).read_bytes() == b"precious " + name.encode()
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_whole_model_checkpoint_needs_trust(quick: Quick) -> None:
    refused = quick["untrusted"]
    _assert_one_line(refused, "--trust-checkpoint")
    assert "pickled" in refused.stderr
    trusted = quick["trusted"]
    assert trusted.returncode == 0, trusted.stderr
    assert "channel groups" in trusted.stdout


def test_internal_failure_is_one_line_exit_1(quick: Quick) -> None:
    result = quick["failure"]
    _assert_one_line(result, "cannot trace", code=1)
    assert "--verbose" in result.stderr
    verbose = quick["failure verbose"]
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr


def _bad_checkpoints(tmp: Path) -> dict[str, Path]:
    files = {"garbage": tmp / "garbage.pt", "truncated": tmp / "truncated.pt", "mismatch": tmp / "mismatch.pt"}
    files["garbage"].write_bytes(b"not a checkpoint\n" * 10)
    state = cli_models.small_net().state_dict()
    torch.save(state, tmp / "full.pt")
    blob = (tmp / "full.pt").read_bytes()
    files["truncated"].write_bytes(blob[: len(blob) // 2])
    state["head.weight"] = torch.zeros(5, 640)
    torch.save(state, files["mismatch"])
    return files


BAD_INPUTS = {
    "unknown model": (["resnt18"], "Did you mean: resnet18"),
    "budget unparsable": (["resnet18", "--budget-flops", "half"], "cannot parse budget"),
    "budget above 100%": (["resnet18", "--budget-flops", "150%"], "above 100%"),
    "budget negative": (["resnet18", "--budget-flops", "-5%"], "budget"),
    "budget above the model": (["cli_models:small_net", "--budget-flops", "1T"], "nothing to shrink"),
    "budget unreachable": (["cli_models:small_net", "--budget-flops", "0.001%"], "below what this model can reach"),
    "shape malformed": (["resnet18", "--input-shape", "1,3,x"], "--input-shape"),
    "shape does not fit": (["resnet18", "--input-shape", "1,5,64,64"], "example inputs do not run"),
    "module not importable": (["no_such_package.mod:factory"], "cannot import"),
    "factory not a module": (["cli_models:not_a_module"], "not a torch.nn.Module"),
    "checkpoint missing": (["cli_models:small_net", "--checkpoint", "{tmp}/nothing.pt"], "no such file"),
    "checkpoint garbage": (["cli_models:small_net", "--checkpoint", "{tmp}/garbage.pt"], "cannot be read"),
    "checkpoint truncated": (["cli_models:small_net", "--checkpoint", "{tmp}/truncated.pt"], "cannot be read"),
    "checkpoint mismatch": (["cli_models:small_net", "--checkpoint", "{tmp}/mismatch.pt"], "head.weight: [5, 640]"),
    "out is a file": (["cli_models:small_net", "--out", "{tmp}/garbage.pt"], "is a file"),
    "round-to zero": (["resnet18", "--round-to", "0"], "--round-to"),
    "criterion unknown": (["resnet18", "--criterion", "taylor"], "invalid choice"),
    "out missing": (["resnet18", "--budget-flops", "50%", "--out"], "expected one argument"),
}


def _args(case: str, tmp: Path, out: Path) -> list[str]:
    args = [a.replace("{tmp}", str(tmp)) for a in BAD_INPUTS[case][0]]
    for option, value in {"--budget-flops": "50%", "--out": str(out), "--input-shape": SHAPE}.items():
        if option not in args:
            args += [option, value]
    return args


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """In-process (the subprocess test below checks a few of these as real processes)."""
    from fxmorph.cli.main import main

    _bad_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    try:
        code = main(_args(case, tmp_path, tmp_path / "out"))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    _assert_one_line(subprocess.CompletedProcess([], code, captured.out, captured.err), BAD_INPUTS[case][1])
    assert sorted(tmp_path.iterdir()) == before  # nothing written


PROCESS_CASES = ["unknown model", "shape does not fit", "checkpoint truncated", "factory not a module", "round-to zero"]


def test_bad_input_in_a_real_process(tmp_path: Path) -> None:
    """A few bad inputs as real processes (run concurrently: each is mostly interpreter start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    _bad_checkpoints(tmp_path)
    before = sorted(tmp_path.iterdir())
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c: pool.submit(_run, *_args(c, tmp_path, tmp_path / f"out{i}"), cwd=tmp_path)
                   for i, c in enumerate(PROCESS_CASES)}  # fmt: skip
    for case, future in futures.items():
        _assert_one_line(future.result(), BAD_INPUTS[case][1])
    assert sorted(tmp_path.iterdir()) == before
