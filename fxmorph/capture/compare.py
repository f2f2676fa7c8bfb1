"""Compare two traced graphs op by op and tensor by tensor: the structural proof that two models compute the same.

Two GraphModules whose graphs call the same ops in the same order on the same arguments, and whose modules
and tensors are the same objects (or tensors equal in dtype, shape and every value), compute the same function
on every input their traces hold for. Write-back uses this to prove that the user's model, rebuilt around the
new modules, is the graph that surgery made; a difference names the node, the argument and the source line, so
a failure can say which line of the user's ``forward`` hard-codes a width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import fx, nn

__all__ = ["DiffKind", "Difference", "compare_graphs", "source_line"]

Where = tuple[int | str, ...]
"""A path into a node's arguments: ``("args", 1)``, ``("args", 1, 2)`` (an item of a tuple argument),
``("kwargs", "dim")``."""


class DiffKind(StrEnum):
    """What differs at a node: the graph's shape (nothing after it can be compared), a constant argument, or
    the module or tensor a node reads."""

    STRUCTURE = "structure"
    CONSTANT = "constant"
    MODULE = "module"
    TENSOR = "tensor"


@dataclass(frozen=True)
class Difference:
    """One difference between ``ours`` and ``theirs`` at the node in position ``index``."""

    kind: DiffKind
    index: int
    node: str
    where: Where
    ours: Any
    theirs: Any
    module_paths: tuple[str, ...]
    """The modules whose ``forward`` was running at the node in ``ours``, outermost first (from ``nn_module_stack``)."""

    def describe(self) -> str:
        """One line: the node, what differs and the two values."""
        at = f"argument {_where_text(self.where)} of " if self.where else ""
        return f"{self.kind} differs at {at}node '{self.node}': {_short(self.ours)} here, {_short(self.theirs)} wanted"


def _where_text(where: Where) -> str:
    head, *rest = where
    return str(head) + "".join(f"[{part!r}]" for part in rest)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def source_line(node: fx.Node) -> str | None:
    """``file:line: `code``` of the innermost frame in a node's recorded stack trace (None if none was recorded)."""
    trace = node.stack_trace
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    # torch's own frames (the tracer's machinery) are not where a width was written
    frames = [f for f in frames if "/torch/" not in f[0]]
    if not frames:
        return None
    path, line, code = frames[-1]
    return f"{path}:{line}: `{code.strip()}`"


def _module_paths(node: fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    # values are (qualified path, type); the keys may be mangled, the paths are not
    return tuple(str(value[0]) for value in stack.values())


def _attr(root: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path of ``root`` (a get_attr or call_module target)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same object, or a tensor of the same kind, dtype, shape and values (and gradient flag)."""
    if a is b:
        return True
    return (
        type(a) is type(b)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.requires_grad == b.requires_grad
        and bool(torch.equal(a.detach(), b.detach()))
    )


def _same_constant(a: Any, b: Any) -> bool:
    """Equal constants of the same type (1 is not 1.0 nor True; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, torch.Tensor):
        return _same_tensor(a, b)
    try:
        return bool(a == b)
    except Exception:  # an object whose == does not give a truth value: only identity says they are equal
        return a is b


class _MismatchError(Exception):
    """The graphs' shapes part at this argument: positional comparison cannot go on."""


Positions = dict[fx.Node, int]


def _walk(a: Any, b: Any, where: Where, index: Positions, theirs_index: Positions) -> Iterator[tuple[Where, Any, Any]]:
    """Yield ``(where, a, b)`` for every differing constant of two argument trees; raise _MismatchError where the
    trees' shapes (containers, node references) differ."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or index[a] != theirs_index[b]:
            raise _MismatchError(where)
        return
    if isinstance(a, list | tuple) and not hasattr(a, "_fields"):
        if type(a) is not type(b) or len(a) != len(b):
            # a container of another length is a constant that differs when it holds no nodes (a view's sizes)
            if _holds_node(a) or _holds_node(b):
                raise _MismatchError(where)
            yield where, a, b
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _walk(x, y, (*where, i), index, theirs_index)
        return
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            raise _MismatchError(where)
        for key in a:
            yield from _walk(a[key], b[key], (*where, key), index, theirs_index)
        return
    if isinstance(a, slice):
        if not isinstance(b, slice):
            raise _MismatchError(where)
        for part in ("start", "stop", "step"):
            yield from _walk(getattr(a, part), getattr(b, part), (*where, part), index, theirs_index)
        return
    if not _same_constant(a, b):
        yield where, a, b


def _holds_node(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _node_difference(
    a: fx.Node, b: fx.Node, ours: fx.GraphModule, theirs: fx.GraphModule, where_of: tuple[Positions, Positions]
) -> Iterator[tuple[DiffKind, Where, Any, Any]]:
    """The differences of two nodes in the same position (a STRUCTURE one ends the comparison)."""
    same_target = a.target is b.target or (isinstance(a.target, str) and a.target == b.target)
    if a.op != b.op or not same_target:
        yield DiffKind.STRUCTURE, (), f"{a.op} {a.target}", f"{b.op} {b.target}"
        return
    if a.op == "call_module":
        mine, wanted = _attr(ours, str(a.target)), _attr(theirs, str(b.target))
        if mine is not wanted:
            yield DiffKind.MODULE, (), type(mine).__name__, type(wanted).__name__
    if a.op == "get_attr":
        x, y = _attr(ours, str(a.target)), _attr(theirs, str(b.target))
        same = _same_tensor(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x is y
        if not same:
            yield DiffKind.TENSOR, (), _describe_value(x), _describe_value(y)
    try:
        for where, x, y in _walk((a.args, a.kwargs), (b.args, b.kwargs), (), *where_of):
            head = ("args", *where[1:]) if where[0] == 0 else ("kwargs", *where[1:])
            yield DiffKind.CONSTANT, head, x, y
    except _MismatchError:
        yield DiffKind.STRUCTURE, (), f"{a.op} {a.target} on {a.args}", f"{b.op} {b.target} on {b.args}"


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__}{list(value.shape)} {value.dtype}"
    return type(value).__name__


def compare_graphs(ours: fx.GraphModule, theirs: fx.GraphModule) -> list[Difference]:
    """Every difference between two traced models, node by node in graph order; after a STRUCTURE difference
    (another op, target, node count or data flow) nothing further is compared. An empty list proves the
    two compute the same function wherever their traces hold."""
    a_nodes, b_nodes = list(ours.graph.nodes), list(theirs.graph.nodes)
    where_of = ({n: i for i, n in enumerate(a_nodes)}, {n: i for i, n in enumerate(b_nodes)})
    found: list[Difference] = []
    for i, (a, b) in enumerate(zip(a_nodes, b_nodes, strict=False)):
        for kind, where, x, y in _node_difference(a, b, ours, theirs, where_of):
            found.append(Difference(kind, i, a.name, where, x, y, _module_paths(a)))
            if kind is DiffKind.STRUCTURE:
                return found
    if len(a_nodes) != len(b_nodes):
        i = min(len(a_nodes), len(b_nodes))
        node = a_nodes[i].name if i < len(a_nodes) else a_nodes[-1].name
        found.append(Difference(DiffKind.STRUCTURE, i, node, (), f"{len(a_nodes)} nodes", f"{len(b_nodes)} nodes", ()))
    return found
