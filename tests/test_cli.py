"""The command line: ``fxmorph-export`` and ``python -m fxmorph`` are one program."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxmorph", *args], capture_output=True, text=True, timeout=300)


def test_help() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "fxmorph-export" in result.stdout


def test_analyses_a_torchvision_model() -> None:
    result = _run("resnet18", "--input-shape", "1,3,64,64", "--explain")
    assert result.returncode == 0, result.stderr
    assert "13 channel groups (12 free)" in result.stdout
    assert "model output" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnt18"], "Did you mean: resnet18"),
        (["resnet18", "--input-shape", "1,3,x"], "--input-shape"),
        (["resnet18", "--input-shape", "1,5,64,64"], "example inputs do not run"),
        (["no_such_package.mod:factory"], "cannot import"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
