"""Bad input at the command line (rows of ``docs/bad_input.md`` that ``tests/test_cli.py`` does not cover).

Each case runs ``python -m fxmorph`` as a real process in a scratch directory holding a module of model
factories: a bad input exits with code 2, prints one line on stderr that names the cause and the fix, no
traceback, and writes nothing (the user's checkpoint is byte-for-byte as before).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input_io import saved_as_on_cuda

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Linear(32, 10)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    class OnCuda(Small):
        def forward(self, x):
            return super().forward(x.cuda())


    def small():
        return Small()


    def half():
        return Small().half()


    def meta():
        with torch.device("meta"):
            return Small()


    def on_cuda():
        return OnCuda()
    """
)

CASES: dict[str, tuple[list[str], int, tuple[str, ...]]] = {
    # name: (arguments, exit code, words of the one line on stderr)
    "factory returns a meta-device model": (["models:meta"], 2, ("meta device", "to_empty")),
    "factory returns a float16 model": (["models:half"], 2, ("float16 model", "works in float32", "model.float()")),
    "forward moves tensors to CUDA (no CUDA here)": (["models:on_cuda"], 2, ("cuda", "x.device")),
    "checkpoint written by fxmorph.save": (["models:small", "--checkpoint", "small.fxm"], 2,
                                           ("written by fxmorph.save", "original model's state dict")),
    "checkpoint saved on a CUDA machine": (["models:small", "--checkpoint", "cuda.pt", "--explain"], 0,
                                           ("channel groups",)),
}  # fmt: skip


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    full = [*args] if "--explain" in args else [*args, "--budget-flops", "50%", "--out", "out"]
    return subprocess.run([sys.executable, "-m", "fxmorph", *full, "--input-shape", "1,3,16,16"], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the factories, a checkpoint saved on a CUDA machine and a file of fxmorph.save."""
    import fxmorph

    root = tmp_path_factory.mktemp("cli")
    (root / "models.py").write_text(FACTORIES)
    sys.path.insert(0, str(root))
    try:
        import models  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(root))
    model = models.small()
    with saved_as_on_cuda():
        torch.save(model.state_dict(), root / "cuda.pt")
    fxmorph.save(fxmorph.shrink(model, 0.5, (torch.randn(1, 3, 16, 16),), round_to=4), root / "small.fxm")
    sys.modules.pop("models", None)
    return root


@pytest.fixture(scope="module")
def results(workdir: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every case as a real process, two at a time (each is mostly interpreter start-up); checks afterwards
    that none of them wrote a file or changed a checkpoint."""
    files = _files(workdir)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run, args, workdir) for case, (args, _, _) in CASES.items()}
    out = {case: future.result() for case, future in futures.items()}
    assert _files(workdir) == files
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_at_the_command_line(case: str, results: dict[str, subprocess.CompletedProcess]) -> None:
    if "CUDA here" in case and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result, (_, code, words) = results[case], CASES[case]
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    if code == 0:
        assert all(w in result.stdout for w in words), result.stdout[-500:]
        return
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxmorph-export: error: "), result.stderr
    assert all(w.lower() in lines[0].lower() for w in words), lines[0]
    assert result.stdout == ""
