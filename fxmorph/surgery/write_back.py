"""Write a graph-level result back into a copy of the user's own model, and prove the two compute the same.

Surgery works on a GraphModule; the user wants their own class back (its methods, its ``isinstance``, its
``torch.save``). The copy is a deep copy of the user's model in which every module the result's graph calls,
and every parameter and buffer it holds, is the result's own object at the same path: one memo in
``copy.deepcopy`` does it, so a module or tensor the user's model holds under two names stays one object.
A module the result replaced by a different kind (a layer factorized into a pair) is installed whole.

What the graph holds as constants (a ``reshape`` to ``self.hidden_dim``, an attention's ``self.num_heads``)
comes from integer attributes of the user's modules: the copy is traced again and compared with the result
node by node (:func:`~fxmorph.capture.compare.compare_graphs`); each differing constant is traced to an
integer attribute of a module whose ``forward`` was running at that node (``nn_module_stack``), which is set
to the result's value if that makes the graphs closer. When no difference is left, the comparison is the
proof: the same ops, in the same order, on the same modules and tensors. Otherwise a
:class:`~fxmorph.errors.WriteBackError` names the node and the user's line (a width written in the source).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from torch import fx, nn
from torch.nn.utils import parametrize

from fxmorph.analysis.ops import module_facts
from fxmorph.capture.again import capture_again
from fxmorph.capture.compare import Difference, DiffKind, compare_graphs, source_line
from fxmorph.capture.layers import layer_sizes
from fxmorph.errors import TraceError, WriteBackError
from fxmorph.meta import CAPTURE_KEY
from fxmorph.surgery.removed import computes_alike, drop_removed

__all__ = ["AttributeChange", "WrittenBack", "write_back"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttributeChange:
    """An integer attribute (or a tuple of ints) of a module of the user's model set to the result's width."""

    module: str
    """The module's path in the model (``""`` for the model itself)."""
    name: str
    old: Any
    new: Any

    def describe(self) -> str:
        """``path.name: old -> new``."""
        owner = f"{self.module}." if self.module else ""
        return f"{owner}{self.name}: {self.old} -> {self.new}"


@dataclass(frozen=True)
class WrittenBack:
    """The user's class holding the result, the attributes set on it, and how many traces the proof took."""

    model: nn.Module
    attributes: tuple[AttributeChange, ...]
    traces: int


def _existing_prefix(model: nn.Module, target: str) -> str | None:
    """The longest prefix of the dotted ``target`` that names a module of ``model`` (the path itself if it does)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        path = ".".join(parts[:cut])
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    return None


def _tensor_at(model: nn.Module, path: str) -> Any:
    """The parameter or buffer at ``path`` of ``model`` (None where the path names none)."""
    owner, _, leaf = path.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    return module._parameters.get(leaf, module._buffers.get(leaf))


def _substitutions(model: nn.Module, result: fx.GraphModule) -> dict[int, Any]:
    """The deep-copy memo: id of each of ``model``'s objects -> the result's object at the same path."""
    memo: dict[int, Any] = {}
    for node in result.graph.nodes:
        if node.op != "call_module":
            continue
        path = _existing_prefix(model, str(node.target))
        if path is None:
            continue  # the comparison will name the module the user's class has no place for
        new = result.get_submodule(path)
        # GraphModule builds plain nn.Module containers above the modules it calls: never put one in place of
        # the user's module there (only a module surgery installed, such as a factorized pair, goes in whole)
        if path != node.target and type(new) is nn.Module:
            continue
        memo[id(model.get_submodule(path))] = new
    named = chain(result.named_parameters(remove_duplicate=False), result.named_buffers(remove_duplicate=False))
    for path, tensor in named:
        old = _tensor_at(model, path)
        if old is not None:
            # one tensor of the user's held at two paths maps once: if the result holds two tensors there
            # (a tie it could not keep), the comparison finds the path whose tensor is not the result's
            memo.setdefault(id(old), tensor)
    return memo


def _restate_sizes(copied: nn.Module, memo: dict[int, Any]) -> list[AttributeChange]:
    """Set the size attributes (``num_features``, ``normalized_shape`` ...) of the copy's modules that hold the
    result's tensors without being the result's modules: a subclass of a torch.nn layer whose own forward the
    trace entered (timm's ``BatchNormAct2d``); the op table says which attributes state which tensor sizes."""
    placed = {id(obj) for obj in memo.values()}
    changes = []
    for path, module in copied.named_modules():
        if id(module) in placed:
            continue  # the result's own module: surgery set its attributes
        own = (*module._parameters.values(), *module._buffers.values(), *_parametrized(module))
        facts = module_facts(type(module))
        if facts is None or not any(id(t) in placed for t in own if t is not None):
            continue
        for attr in facts.shape_attrs:
            old, new = getattr(module, attr.name, None), attr.value(module)
            if new is not None and old is not None and new != old:
                # a tuple attribute keeps its container type (LayerNorm's normalized_shape is a tuple)
                setattr(module, attr.name, type(old)(new) if isinstance(old, list | tuple) else new)
                changes.append(AttributeChange(path, attr.name, old, getattr(module, attr.name)))
    return changes


def _parametrized(module: nn.Module) -> Iterator[Any]:
    """The tensors a parametrization stores for ``module`` (weight_norm's ``g`` and ``v``): they are the module's
    own, although they sit in its ``parametrizations`` (its ``weight`` is derived from them on access)."""
    if parametrize.is_parametrized(module):
        yield from module.parametrizations.parameters()
        yield from module.parametrizations.buffers()


def _restate_layers(copied: nn.Module) -> list[AttributeChange]:
    """Set the width attributes of the torch.nn layers traced along their plain path: in the user's class they
    run their own forward, which checks them (``nn.Transformer.d_model``, see
    :func:`~fxmorph.capture.layers.layer_sizes`)."""
    changes = []
    for path, module in copied.named_modules():
        for name, new in layer_sizes(module).items():
            old = getattr(module, name)
            if old != new:
                setattr(module, name, new)
                changes.append(AttributeChange(path, name, old, new))
    return changes


def _restore_modes(model: nn.Module, copied: nn.Module) -> None:
    """Each module of the copy in the training mode of the user's module at its path (the result's modules
    come in the mode the entry point set on the whole result)."""
    flags = {path: m.training for path, m in model.named_modules(remove_duplicate=False)}
    for path, module in copied.named_modules(remove_duplicate=False):
        if path in flags:
            module.training = flags[path]


@dataclass
class _Candidate:
    """Setting one integer attribute of one module to a new value, undoable."""

    module: nn.Module
    change: AttributeChange

    def apply(self) -> None:
        setattr(self.module, self.change.name, self.change.new)

    def revert(self) -> None:
        setattr(self.module, self.change.name, self.change.old)


def _int(value: Any) -> bool:
    return type(value) is int  # not bool, which is an int to isinstance


def _candidates(copied: nn.Module, diff: Difference) -> Iterator[_Candidate]:
    """Integer attributes that may have produced the differing constant, most likely first: on the modules
    running at the node, innermost first, attributes equal to the constant (or a tuple of ints holding it,
    such as a LayerNorm's ``normalized_shape``), then those it is a multiple or a share of (``self.head_dim * 3``,
    ``self.expand_chs // 2``)."""
    ours, theirs = diff.ours, diff.theirs
    if not (_int(ours) and _int(theirs)):
        return
    paths = list(dict.fromkeys(("", *diff.module_paths)))[::-1]
    # a path the copy does not hold (the trace named a module it built itself) has no attributes to offer
    modules = [(path, copied.get_submodule(path) if path else copied) for path in paths if _holds(copied, path)]
    for exact in (True, False):
        for path, module in modules:
            for name, value in list(vars(module).items()):
                if name.startswith("_"):
                    continue
                for new in _new_values(value, ours, theirs, exact):
                    yield _Candidate(module, AttributeChange(path, name, value, new))


def _holds(model: nn.Module, path: str) -> bool:
    """Whether ``model`` has a submodule at ``path`` (``""`` is the model itself)."""
    return not path or _existing_prefix(model, path) == path


def _new_values(value: Any, ours: int, theirs: int, exact: bool) -> Iterator[Any]:
    """The values an attribute would take to turn ``ours`` into ``theirs``: an int scaled, or one item of a
    tuple or list of ints."""
    if _int(value) and value:
        new = _scaled(value, ours, theirs, exact)
        if new is not None and new != value:
            yield new
    elif isinstance(value, tuple | list) and exact and all(_int(v) for v in value):
        for i, item in enumerate(value):
            if item == ours:
                items = list(value)
                items[i] = theirs
                yield type(value)(items)


def _scaled(value: int, ours: int, theirs: int, exact: bool) -> int | None:
    """The attribute's new value if ``ours`` is ``value`` (``exact``), or (not exact) an integer multiple of it
    (``self.head_dim * 3``) or an integer share of it (``self.expand_chs // 2``, CSPNet's split)."""
    if exact:
        return theirs if value == ours else None
    if value == ours or not ours:
        return None
    if ours % value == 0 and ours // value >= 2:
        factor = ours // value
        return theirs // factor if theirs % factor == 0 else None
    if value % ours == 0 and value // ours >= 2:
        return theirs * (value // ours)
    return None


class _Search:
    """The copy, the result, and the traces spent comparing them."""

    def __init__(
        self, model: nn.Module, copied: nn.Module, result: fx.GraphModule, leaf_modules: Iterable[type | str]
    ) -> None:
        self.model, self.copied, self.result, self.leaf_modules = model, copied, result, tuple(leaf_modules)
        self.traces = 0
        self._planned: list[Difference] | None = None
        self.stuck = False
        """Whether the copy could not be captured at the last try (its differences are then the plan's)."""

    def differences(self) -> list[Difference]:
        """Trace the copy as it is now and compare it with the result."""
        self.traces += 1
        try:
            graph = capture_again(self.copied, self.result, self.leaf_modules)
        except TraceError as exc:  # an attribute set to a width the user's forward cannot run with
            self.stuck = True
            failed = Difference(DiffKind.STRUCTURE, -1, "", (), str(exc).splitlines()[0], "a traceable model", ())
            return self.planned() or [failed]
        self.stuck = False
        return compare_graphs(graph, self.result)

    def planned(self) -> list[Difference]:
        """The constants surgery changed: the user's model's graph against the result's, constants only.

        An exported capture runs the forward (on fake tensors), so a copy whose attributes still state the old
        widths fails before any graph can be compared (a reshape to the old width); a symbolic trace does not
        run it. The differences of the model as it was then say which constants to look for."""
        if self.result.meta.get(CAPTURE_KEY) != "export":
            return []
        if self._planned is None:
            self.traces += 1
            try:
                original = capture_again(self.model, self.result, self.leaf_modules)
            except TraceError:
                original = None
            found = compare_graphs(original, self.result) if original is not None else []
            self._planned = [d for d in found if d.kind is DiffKind.CONSTANT]
        return self._planned

    def line(self, diff: Difference) -> str | None:
        """The user's source line at the differing node (a trace that records stack traces)."""
        if diff.index < 0:
            return None
        # the copy's graph, or where the copy cannot be captured, the user's model's (the planned differences')
        for model in (self.copied, self.model):
            try:
                graph = capture_again(model, self.result, self.leaf_modules, stack_traces=True)
                break
            except TraceError:
                continue
        else:
            return None
        nodes = list(graph.graph.nodes)
        return source_line(nodes[diff.index]) if diff.index < len(nodes) else None


def _closer(trial: list[Difference], before: list[Difference]) -> bool:
    """Whether a trial left only constant differences, and fewer of them."""
    return all(d.kind is DiffKind.CONSTANT for d in trial) and len(trial) < len(before)


def _settle(search: _Search) -> list[AttributeChange]:
    """Set attributes of the copy until its graph is the result's; raise WriteBackError when none helps."""
    changes: list[AttributeChange] = []
    diffs = search.differences()
    while diffs:
        first = next((d for d in diffs if d.kind is not DiffKind.CONSTANT), diffs[0])
        if first.kind is not DiffKind.CONSTANT:
            raise _failure(search, first)
        # the first difference an attribute fixes (one no attribute gives may be fixed already, where the
        # differences are the plan's: an exported copy that cannot run yet for another attribute)
        accepted = _all_at_once(search, diffs) if search.stuck else None
        accepted = accepted or next(filter(None, (_first_fix(search, d, diffs) for d in diffs)), None)
        if accepted is None:
            raise _failure(search, first)
        batch, diffs = accepted
        changes += [c.change for c in batch]
    return changes


def _all_at_once(search: _Search, diffs: list[Difference]) -> tuple[list[_Candidate], list[Difference]] | None:
    """Where the copy cannot be captured until several attributes are right (an exported forward runs, and fails
    at the first stale width), every difference's first candidate at once: kept if the graphs come closer."""
    batch: dict[tuple[int, str], _Candidate] = {}
    for diff in diffs:
        candidate = next(_candidates(search.copied, diff), None)
        if candidate is not None:
            batch.setdefault((id(candidate.module), candidate.change.name), candidate)
    if len(batch) < 2:  # one candidate alone is what the search below tries anyway
        return None
    trial = _try(search, list(batch.values()), diffs)
    return (list(batch.values()), trial) if _closer(trial, diffs) else None


def _first_fix(
    search: _Search, first: Difference, diffs: list[Difference]
) -> tuple[list[_Candidate], list[Difference]] | None:
    """The first candidate for ``first`` that brings the graphs closer (applied), with the differences left."""
    for candidate in _candidates(search.copied, first):
        # The same attribute of every repeated block usually changes alike (each block's num_heads): the
        # candidate goes together with its likes at the other differences first, one trace for them all.
        likes = _likes(search.copied, candidate, diffs[1:])
        for batch in (likes, [candidate]) if len(likes) > 1 else (likes,):
            trial = _try(search, batch, diffs)
            if _closer(trial, diffs):
                return batch, trial
    return None


def _likes(copied: nn.Module, candidate: _Candidate, diffs: list[Difference]) -> list[_Candidate]:
    """``candidate`` and, for each of ``diffs``, a candidate setting an attribute of the same name from the same
    value to the same value on a module of the same type (another instance of one block)."""
    key = (type(candidate.module), candidate.change.name, candidate.change.old, candidate.change.new)
    batch, seen = [candidate], {id(candidate.module)}
    for diff in diffs:
        for other in _candidates(copied, diff):
            if id(other.module) in seen:
                continue
            if (type(other.module), other.change.name, other.change.old, other.change.new) == key:
                batch.append(other)
                seen.add(id(other.module))
                break
    return batch


def _try(search: _Search, batch: list[_Candidate], before: list[Difference]) -> list[Difference]:
    """The differences with ``batch`` applied; the batch is reverted unless they are fewer than ``before``."""
    for candidate in batch:
        candidate.apply()
    trial = search.differences()
    if not _closer(trial, before):
        for candidate in reversed(batch):
            candidate.revert()
    return trial


def _failure(search: _Search, diff: Difference) -> WriteBackError:
    """The error that says why the result does not fit the user's class, naming the line where one is known."""
    line = search.line(diff)
    at = f" at {line}" if line else ""
    name = type(search.copied).__name__
    if diff.kind is DiffKind.CONSTANT:
        where = ", ".join(p or name for p in ("", *diff.module_paths))
        why = (
            f"the forward of {name} computes {diff.ours!r} where the result needs {diff.theirs!r} "
            f"({diff.describe()}){at}, and no integer attribute of the modules running there ({where}) gives it: "
            "the width is written in the source. Compute it from the input's shape (`x.shape[1]`) or from an "
            "attribute of the module"
        )
    elif diff.kind is DiffKind.STRUCTURE:
        why = (
            f"the result's graph differs in structure from the forward of {name} ({diff.describe()}){at}: a pass "
            "rewrote the graph in a way the class's code does not express"
        )
    else:
        why = (
            f"the result's {diff.kind} at node '{diff.node}'{at} is not the one {name} holds there "
            f"({diff.describe()}): a module or tensor the model holds under two names would need two different shapes"
        )
    return WriteBackError(f"cannot give the result back as {name}: {why}.", line=line)


def write_back(model: nn.Module, result: fx.GraphModule, leaf_modules: Iterable[type | str] = ()) -> WrittenBack:
    """A copy of ``model`` (its class, its other attributes) that computes exactly what ``result`` computes.

    ``result`` must come from surgery on a trace of ``model`` (the same module paths). ``model`` is never
    modified. Raises WriteBackError when the copy cannot be proven to be ``result``'s graph."""
    memo = _substitutions(model, result)
    copied = copy.deepcopy(model, dict(memo))  # a copy of the memo: deepcopy adds every object it copies
    _restore_modes(model, copied)
    drop_removed(copied, result)
    sizes = _restate_sizes(copied, memo) + _restate_layers(copied)
    search = _Search(model, copied, result, leaf_modules)
    changes = sizes + _settle(search)
    computes_alike(copied, result)
    logger.debug("write-back: %d attribute(s) set, %d trace(s)", len(changes), search.traces)
    return WrittenBack(copied, tuple(changes), search.traces)
