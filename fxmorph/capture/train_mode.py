"""What a model's train-mode forward reads that its eval-mode trace does not show.

fxmorph traces in eval mode, so a submodule that runs only in training (GoogLeNet's and Inception-v3's
auxiliary heads) is not in the graph, and nothing stops the channels it reads from changing. The result,
given back as the user's class, would then fail in ``model.train()``. This module traces the train-mode
forward too (symbolically, no compute), lines its nodes up with the eval graph's (the same code runs in the
same order up to each train-only branch), and names the eval-graph nodes whose values train-only code
reads: the analysis pins their channels, so those modules keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import fx, nn

from fxmorph.capture.symbolic import trace_graph
from fxmorph.errors import TraceError

__all__ = ["module_paths", "train_only_readers"]

logger = logging.getLogger(__name__)


def module_paths(node: fx.Node) -> list[str]:
    """The module paths a node runs in: its ``nn_module_stack`` and, for a call, the module it calls."""
    stack = [str(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]
    return [*stack, str(node.target)] if node.op == "call_module" else stack


def _owner(node: fx.Node, unreached: tuple[str, ...]) -> str | None:
    """The unreached module ``node`` runs in, if any."""
    for path in module_paths(node):
        for module in unreached:
            if path == module or path.startswith(module + "."):
                return module
    return None


def _same_op(a: fx.Node, b: fx.Node) -> bool:
    return a.op == b.op and (a.target is b.target or (isinstance(a.target, str) and a.target == b.target))


def train_only_readers(
    model: nn.Module, gm: fx.GraphModule, unreached: tuple[str, ...], leaf_modules: Iterable[type | str] = ()
) -> dict[str, str] | None:
    """``{eval-graph node name: reader}`` for every value of ``gm`` that train-only code of ``model`` reads
    (the reader is the unreached module, or ``"train-mode code"``). None when the train-mode forward cannot be
    traced or lined up with ``gm``: then what it reads is unknown."""
    try:
        train = trace_graph(model, leaf_modules, train=True)
    except TraceError as exc:
        logger.info("the train-mode forward cannot be traced (%s)", str(exc).splitlines()[0])
        return None
    evals = [n for n in gm.graph.nodes if n.op != "output"]
    matched: dict[fx.Node, fx.Node] = {}
    readers: dict[str, str] = {}
    position = 0
    for node in train.graph.nodes:
        if node.op == "output":
            continue
        owner = _owner(node, unreached)
        inputs = node.all_input_nodes
        shared = owner is None and all(a in matched for a in inputs)
        if shared and position < len(evals) and _same_op(node, evals[position]):
            matched[node] = evals[position]
            position += 1
            continue
        # a train-only node: the values it reads from the shared part are what train mode needs unchanged
        for arg in inputs:
            if arg in matched:
                readers.setdefault(matched[arg].name, owner or "train-mode code")
    if position != len(evals):
        logger.info(
            "the train-mode forward does not line up with the eval trace (%d of %d nodes)", position, len(evals)
        )
        return None
    return readers
