"""Size metrics of the fxmorph package at a git revision: files, lines per file, function lengths.

    python -m benchmarks.code_metrics            # the working tree
    python -m benchmarks.code_metrics 4afe31d    # a revision

Lines are physical lines of each ``.py`` file; a function's length runs from its ``def`` (decorators
excluded) to its last line, nested functions counted on their own as well as inside their parent.
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Metrics:
    """Per-file line counts and per-function lengths of one revision of the package."""

    lines: dict[str, int]
    functions: dict[str, int]  # "path:qualname" -> length in lines

    def summary(self) -> str:
        files = np.array(list(self.lines.values()))
        funcs = np.array(list(self.functions.values()))
        longest = sorted(self.functions.items(), key=lambda kv: -kv[1])[:10]
        out = [
            f"files: {len(files)}, lines: {files.sum()}",
            f"lines per file: median {np.median(files):.0f}, p90 {np.percentile(files, 90):.0f}, max {files.max()}",
            f"functions: {len(funcs)}, length median {np.median(funcs):.0f}, p90 {np.percentile(funcs, 90):.0f}",
            "longest functions:",
        ]
        return "\n".join(out + [f"  {n:4d}  {name}" for name, n in longest])


def _sources(revision: str | None) -> dict[str, str]:
    if revision is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "fxmorph").rglob("*.py"))}
    names = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", revision, "fxmorph"], cwd=ROOT, text=True)
    paths = [n for n in names.split() if n.endswith(".py")]
    return {p: subprocess.check_output(["git", "show", f"{revision}:{p}"], cwd=ROOT, text=True) for p in paths}


def _functions(path: str, tree: ast.AST) -> dict[str, int]:
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                found[f"{path}:{name}"] = (child.end_lineno or child.lineno) - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def measure(revision: str | None = None) -> Metrics:
    """Metrics of the package at ``revision`` (``None``: the working tree)."""
    sources = _sources(revision)
    functions: dict[str, int] = {}
    for path, text in sources.items():
        functions |= _functions(path, ast.parse(text))
    return Metrics({p: len(t.splitlines()) for p, t in sources.items()}, functions)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info(measure(sys.argv[1] if len(sys.argv) > 1 else None).summary())
