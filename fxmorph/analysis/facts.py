"""What the op table knows about one op: how it moves channels, and the properties the passes and surgery ask.

An :class:`OpFacts` is plain data: the channel rule (:mod:`fxmorph.analysis.rules`), a kind
(:class:`OpKind`), and properties such as ``f(0) = 0`` and the slope there. Facts that depend on the
call (the slope of a ``LeakyReLU`` is its ``negative_slope``; ``F.pad`` keeps zeros only with a zero
fill) are refined per call by the entry's ``specialise`` function, which reads the module's attributes
or the call's arguments through :class:`Call`. The table itself is :mod:`fxmorph.analysis.ops`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import fx, nn

from fxmorph.analysis.context import RuleContext

__all__ = ["Call", "OpFacts", "OpKind", "Rule", "ShapeAttr", "number"]

Rule = Callable[[RuleContext, fx.Node], Any]
"""A channel rule: reads a node's inputs' channel spaces from the context, returns the node's."""


class OpKind(Enum):
    """What an op does to the values of a channel, as the passes need to know it."""

    LAYER = "layer"
    """A weight reads the input's channels through its columns (Linear, convolutions)."""
    BATCH_NORM = "batch_norm"
    """Per-channel affine map of running statistics in eval mode (BatchNorm)."""
    NORM = "norm"
    """Normalisation by statistics of the input itself (instance, layer, group and RMS norm)."""
    ACTIVATION = "activation"
    """A nonlinear function of each element of one tensor (ReLU, GELU, PReLU ...)."""
    POINTWISE = "pointwise"
    """Any other elementwise op: arithmetic, casts, identity, dropout."""
    MOVE = "move"
    """Data movement: every value kept, only positions change (reshape, permute, cat, indexing)."""
    POOL = "pool"
    """Pooling, padding, interpolation, reductions over dims that do not carry the channel."""
    SHAPE = "shape"
    """Reads only the tensor's shape (``x.size()``, ``x.dim()``)."""
    OTHER = "other"
    """Anything else (matmul, attention, softmax, embeddings, ops without a rule)."""


@dataclass(frozen=True)
class Call:
    """One call of an op as a specialiser sees it: the module called, or the function's arguments."""

    module: nn.Module | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def arg(self, name: str, position: int, default: Any) -> Any:
        """The module's attribute ``name``; for a function, argument ``name`` by keyword or at
        ``position``; ``default`` where it is not given."""
        if self.module is not None:  # a module keeps its call's settings as attributes of the same name
            return getattr(self.module, name, default)
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else default


@dataclass(frozen=True)
class ShapeAttr:
    """A module attribute that states the size of one of its tensors: ``BatchNorm2d.num_features`` is dim 0 of
    ``weight`` (or of ``running_mean`` without affine parameters); ``dim=None`` is the whole shape, as a tuple
    (``LayerNorm.normalized_shape``)."""

    name: str
    tensors: tuple[str, ...] = ()
    """The tensors that state it, in order of preference (the first the module has)."""
    dim: int | None = None
    derive: Callable[[nn.Module], int | None] | None = None
    """Instead of one tensor's size: the value from the module's tensors and its other attributes as they were
    (a convolution's ``in_channels`` is ``weight.shape[1] * groups``). A module's attributes are restated in
    the table's order, each from the values before it was set."""

    def value(self, module: nn.Module) -> int | tuple[int, ...] | None:
        """The attribute's value as the module's tensors state it (None when it has none of them)."""
        if self.derive is not None:
            return self.derive(module)
        tensor = next((getattr(module, t) for t in self.tensors if getattr(module, t, None) is not None), None)
        if tensor is None:
            return None
        return tuple(int(d) for d in tensor.shape) if self.dim is None else int(tensor.shape[self.dim])


@dataclass(frozen=True)
class OpFacts:
    """Everything the table says about one op. Defaults describe an op nothing is known about.

    ``zero_preserving``: all-zero inputs give a zero output (``f(0) = 0``; for arithmetic, every operand
    zero). ``slope_at_zero``: the derivative at 0 as autograd computes it (``relu``: 0), None where it is
    not known or varies. ``keeps_constant``: a channel constant at every position stays that constant at
    any input size (max pooling, adaptive average pooling). ``zero_absorbing``: a zero operand gives a
    zero output whatever the others are (``x * 0``, inputs taken finite). ``inplace``: the op always
    writes into its first argument (``relu_``, ``+=``). ``train_flag``: position of the argument that
    makes the op random when set (dropout, ``rrelu``; by keyword ``training`` or ``train``).
    ``identity_in_eval``: the op is the identity when not training (dropout). ``new_channel``: the value
    a new channel of a parameter gets by default, by parameter name (a norm's scale 1 and shift 0,
    running statistics 0 and 1); for functions, by argument name. ``shape_attrs``: the module's attributes
    that state its tensors' sizes (:class:`ShapeAttr`). ``specialise`` refines these facts for one call
    (see :class:`Call`).
    """

    rule: Rule
    kind: OpKind = OpKind.OTHER
    zero_preserving: bool = False
    slope_at_zero: float | None = None
    keeps_constant: bool = False
    zero_absorbing: bool = False
    inplace: bool = False
    train_flag: int | None = None
    identity_in_eval: bool = False
    new_channel: tuple[tuple[str, float], ...] = ()
    shape_attrs: tuple[ShapeAttr, ...] = ()
    specialise: Callable[[OpFacts, Call], OpFacts] | None = None
    copies: bool = True
    """Whether a runtime moves the op's data (the latency model prices it); False for views (reshape)."""
    fuses: bool = False
    """Whether CPU runtimes fuse the op into a convolution that alone feeds it, so that it costs no time of its
    own: onnxruntime folds a batch norm into the weights, runs ReLU, Clip, Sigmoid, Tanh, LeakyReLU and
    HardSigmoid as the convolution's activation, and adds a residual as its blocked kernel's sum."""
    broadcasts: bool = False
    """Whether the op, applied to a tensor whose dims of size 1 stand for any size, gives the op of the full tensor
    broadcast (a permute or transpose: positions move, sizes with them). Pointwise ops and batch norms do so too
    (:attr:`commutes_with_broadcast`); a reshape or a pooling does not. A group removed whole that leaves a residual
    branch constant computes the branch's ops after the constant on one value per channel
    (:mod:`fxmorph.analysis.removal_constant`)."""
    joins: bool = False
    """Whether the op joins the tensors of its first argument (a list) along one dim (``dim``, the second argument,
    0 by default): an input without channels along that dim can be left out of the list, which is how a group
    removed whole leaves the concatenations it fed (:mod:`fxmorph.analysis.removal`)."""

    @property
    def commutes_with_broadcast(self) -> bool:
        """Whether the op of a tensor whose unit dims stand for any size is the op of the full tensor, broadcast:
        elementwise ops (their other operands broadcast alike), batch norms in eval mode, and :attr:`broadcasts`."""
        return self.broadcasts or self.pointwise or self.kind is OpKind.BATCH_NORM

    @property
    def pointwise(self) -> bool:
        """Whether each output element depends only on the same element of the inputs."""
        return self.kind in (OpKind.ACTIVATION, OpKind.POINTWISE)

    def default(self, name: str) -> float | None:
        """The default value of a new channel of parameter (or argument) ``name``; None if the table has none."""
        return dict(self.new_channel).get(name)

    def at(self, call: Call) -> OpFacts:
        """These facts refined for one call (the same object where nothing depends on the call). A call with
        the keyword ``inplace=True`` (``F.silu(x, inplace=True)``) writes into its first argument."""
        facts = self if self.specialise is None else self.specialise(self, call)
        if call.kwargs.get("inplace") is True and not facts.inplace:
            return facts.replace(inplace=True)
        return facts

    def replace(self, **changes: Any) -> OpFacts:
        """A copy with ``changes`` (for the table's builders and specialisers)."""
        return dataclasses.replace(self, **changes)


def number(value: Any) -> float | None:
    """``value`` as a finite float when it is a plain number (not a graph node or tensor), else None."""
    # bool is a Real too, but a flag passed where a number is expected is not one
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None
