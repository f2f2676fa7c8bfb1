"""The layering contract of DESIGN.md section 2, checked on the source (no import of the package needed).

Each package is a layer and imports only downward: base (errors, meta, validate) < capture < analysis <
surgery < check < passes < api < io < the root package < cli. On top of the order, two rules the order
alone cannot say: the CLI reaches the engine only through the public API (api, io, the root package), and
analysis and passes never build modules or write tensors (that is surgery's job). A break names the file,
the line and the rule; ``test_contract_catches_an_upward_import`` shows the check is not vacuous.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fxmorph"

# Lowest first. A module may import modules of its own layer or of any layer before it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("fxmorph.errors", "fxmorph.meta", "fxmorph.validate")),
    ("capture", ("fxmorph.capture",)),
    ("analysis", ("fxmorph.analysis",)),
    ("surgery", ("fxmorph.surgery",)),
    ("check", ("fxmorph.check", "fxmorph.testing")),
    ("passes", ("fxmorph.passes",)),
    ("api", ("fxmorph.api",)),
    ("io", ("fxmorph.io",)),
    ("root", ("fxmorph",)),  # the package's __init__: the public API, which only the CLI may import
    ("cli", ("fxmorph.cli", "fxmorph.__main__")),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# Beyond the order: the CLI sees the engine only through the public API.
ALLOWED = {"cli": {"base", "api", "io", "root", "cli"}}
# Calls that build modules or write tensors. Analysis and passes decide; surgery rewrites.
WRITES = {"Parameter", "register_buffer", "register_parameter", "add_submodule", "add_module", "copy_", "mul_",
          "add_", "zero_", "fill_", "normal_", "uniform_", "setattr", "load_state_dict"}  # fmt: skip
NO_WRITES = {"analysis", "passes"}


@dataclass(frozen=True)
class Break:
    """One import or call that breaks the contract."""

    path: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}"


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to (the longest matching prefix wins)."""
    best, length = "", -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    if not best:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Every fxmorph module a file imports (``from fxmorph.x import y`` names ``fxmorph.x.y`` when it is a
    module, so ``from fxmorph.cli import report_files`` counts as the cli layer)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "fxmorph"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fxmorph":
            found.append((node.module, node.lineno))
    return found


def _writes(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in WRITES:
                found.append((f"calls {name}", node.lineno))
            # constructing a torch.nn layer (nn.Linear(...), nn.Sequential(...))
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "nn":
                found += [(f"calls nn.{func.attr}", node.lineno)] if func.attr[:1].isupper() else []
        # writing into another object's tensor: ``module.running_mean[pos] = ...`` (an object's own
        # caches, ``self._rows[k]``, and the graph's metadata and environment are not tensors of the model)
        elif isinstance(node, ast.Assign | ast.AugAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute):
                    owner = target.value.value
                    if target.value.attr not in {"meta", "env"} and not (
                        isinstance(owner, ast.Name) and owner.id == "self"
                    ):
                        found.append((f"assigns to {ast.unparse(target.value)}[...]", node.lineno))
    return found


def breaks(root: Path = PACKAGE) -> list[Break]:
    """Every break of the contract under ``root`` (the fxmorph package directory)."""
    found: list[Break] = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = layer_of(me)
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(root.parent))
        for target, line in _imports(tree):
            theirs = layer_of(target)
            if RANK[theirs] > RANK[mine]:
                found.append(Break(rel, line, f"{mine} imports {target} ({theirs}, a higher layer)"))
            elif theirs not in ALLOWED.get(mine, {theirs}):
                found.append(Break(rel, line, f"{mine} imports {target} ({theirs}): only {sorted(ALLOWED[mine])}"))
        if mine in NO_WRITES:
            for what, line in _writes(tree):
                found.append(Break(rel, line, f"{mine} {what}: building modules or writing tensors is surgery's job"))
    return found


def test_layers_import_only_downward() -> None:
    found = breaks()
    assert not found, "layering contract (DESIGN.md section 2) broken:\n" + "\n".join(map(str, found))


@pytest.mark.parametrize(
    ("source", "where", "rule"),
    [
        ("from fxmorph.api.shrink import shrink\n", "analysis/scratch.py", "analysis imports fxmorph.api.shrink"),
        ("from fxmorph.passes import PrunePass\n", "cli/scratch.py", "cli imports fxmorph.passes"),
        ("import torch\nw = torch.nn.Parameter(torch.ones(1))\n", "passes/scratch.py", "passes calls Parameter"),
        ("from torch import nn\nlayer = nn.Linear(2, 2)\n", "analysis/scratch.py", "analysis calls nn.Linear"),
        (
            "def f(bn):\n    bn.running_var[0] = 1.0\n",
            "passes/scratch.py",
            "passes assigns to bn.running_var",
        ),
    ],
)
def test_contract_catches_an_upward_import(tmp_path: Path, source: str, where: str, rule: str) -> None:
    """A scratch copy of the package with one deliberate break fails the check, naming the file and rule."""
    root = tmp_path / "fxmorph"
    for path in PACKAGE.rglob("*.py"):
        target = root / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    assert not breaks(root), "the scratch copy starts clean"
    (root / where).write_text(source)
    (found,) = breaks(root)
    assert found.path == f"fxmorph/{where}" and found.rule.startswith(rule), found
