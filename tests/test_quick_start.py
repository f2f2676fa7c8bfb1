"""The README's main job (``examples/shrink_torchvision.py``) runs as a user runs it, and what it prints holds."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "shrink_torchvision.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_main_job_meets_the_budget_and_agrees_with_pytorchs_counter() -> None:
    """resnet18 at 64x64 to 25%: exit 0, the report's FLOPs line shows 25.0% of the original within the
    budget, PyTorch's count equals the report's, and the output shape is unchanged."""
    done = _run("resnet18", "25%", "--size", "64")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "resnet18 shrunk to 25% of its FLOPs" in out
    flops = re.search(r"FLOPs\s+([\d.]+) G ->\s+([\d.]+) G \(([\d.]+)%, budget ([\d.]+) G\)", out)
    assert flops, out
    before, after, share, budget = (float(v) for v in flops.groups())
    assert share == 25.0 and after <= budget and abs(after - before / 4) <= 0.001
    counted = re.search(r"flop_counter: ([\d.]+) G \(report says ([\d.]+) G\)", out)
    assert counted and counted.group(1) == counted.group(2), out
    assert "output shape (1, 1000) -> (1, 1000)" in out
    assert "MISMATCH" not in out


def test_main_job_refuses_bad_arguments_in_one_line() -> None:
    """An unknown model name or an impossible budget: a nonzero exit and one line naming the cause, no traceback."""
    with ThreadPoolExecutor(max_workers=2) as pool:  # at once: each run is mostly interpreter start-up
        unknown, too_big = pool.map(lambda args: _run(*args), [("resnet19",), ("resnet18", "150%", "--size", "64")])
    assert unknown.returncode == 2 and "unknown model 'resnet19'" in unknown.stderr and "resnet18" in unknown.stderr
    assert too_big.returncode == 1 and "above 100%" in too_big.stderr
    assert "Traceback" not in unknown.stderr + too_big.stderr
