"""The ``factorize`` pass: split a Linear or convolution into two dense layers through a low-rank
factorization of its weight (truncated SVD), so that the rank becomes a channel group of its own.

``Linear(in, out)`` becomes ``Linear(in, r, bias=False) -> Linear(r, out)`` and ``ConvNd(c_in, c_out, k)``
becomes ``ConvNd(c_in, r, k, bias=False) -> ConvNd(r, c_out, 1)`` (the first keeps the stride, padding,
dilation and padding mode), with ``W = U S V^T`` split as ``U sqrt(S)`` and ``sqrt(S) V^T``. At full rank
``r = min(out, in)`` (``in`` counting the kernel elements of a convolution) the product is the old weight:
the function is the same up to floating-point rounding, but the FLOPs rise (``r * (in + out)`` against
``in * out`` multiply-adds per position). The gain comes afterwards: the rank is a channel group like any
other, so importance-per-FLOP pruning (:class:`~fxmorph.passes.prune.PrunePass`, or
``fxmorph.shrink(..., factorize=True)``) removes rank channels, input features and neurons against each
other. On LeNet-300-100 at 10x fewer FLOPs (both hidden Linears split) this kept 352 pixels -> rank 39
-> 207 neurons -> rank 15 -> 68, where pruning neurons alone kept 224 pixels -> 100 -> 38: 98.11%
against 97.54% after the same fine-tuning (``benchmarks/RESULTS.md``).

The factor modules live in an ``nn.Sequential`` at the layer's path (``fc1`` -> ``fc1.0``, ``fc1.1``)
whose two members the graph calls one after the other; ``gm.meta[FACTORS_KEY]`` records, per factorized
path, the rank the split kept and the full rank (later pruning is not reflected there), and so the
paths :func:`fxmorph.save` needs to rebuild the model. This pass decides which layers and which rank;
:mod:`fxmorph.surgery.factors` builds the factors and rewires the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from fxmorph.capture.trace import propagate_shapes
from fxmorph.errors import InputError
from fxmorph.meta import FACTORS_KEY
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.surgery.factors import CONVS, Split, split_layers, weight_svd
from fxmorph.validate import frozen_mode

__all__ = ["CONVS", "FACTORS_KEY", "FactorizePass", "factorizable", "full_rank"]

logger = logging.getLogger(__name__)

_ALREADY = "already factorized"
_KINDS = (nn.Linear, *CONVS)  # CONVS: the convolutions the pass splits (and merge-factors joins)


def full_rank(module: nn.Module) -> int:
    """``min(out, in)`` of the weight as a matrix (a convolution's ``in`` counts its kernel elements)."""
    weight = module.weight
    return min(weight.shape[0], weight[0].numel())


def _why_not(gm: fx.GraphModule, path: str, module: nn.Module, calls: dict[str, int], tied: set[str]) -> str | None:
    """Why the layer at ``path`` cannot be factorized, or None."""
    if type(module) not in _KINDS:
        return f"a {type(module).__name__}, not a Linear or Conv1d/2d/3d"
    if isinstance(module, CONVS) and module.groups != 1:
        return f"a grouped convolution (groups={module.groups})"
    if calls.get(path, 0) != 1:
        return f"called {calls.get(path, 0)} times, not once"
    if path in tied:
        return "its parameters are shared with another module or read directly by the graph"
    # A layer recorded as factorized, or one of its factors ``path.0`` / ``path.1``, is split already.
    if path in gm.meta.get(FACTORS_KEY, {}) or path.rpartition(".")[0] in gm.meta.get(FACTORS_KEY, {}):
        return _ALREADY
    return None


def _shared(gm: fx.GraphModule) -> set[str]:
    """Paths of modules whose parameters another module also holds, or that a get_attr node reads."""
    owners: dict[int, list[str]] = {}
    # remove_duplicate=False: a module registered at two paths shows up at both, and so counts as shared.
    for path, module in gm.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    shared = {path for paths in owners.values() if len(paths) > 1 for path in paths}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            # A graph that reads a layer's weight directly would keep reading the old one after the split.
            shared.add(str(node.target).rpartition(".")[0])
    return shared


def factorizable(gm: fx.GraphModule) -> dict[str, str | None]:
    """Per Linear or convolution the graph calls, ``None`` if the pass can factorize it, else why not."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    tied = _shared(gm)
    out: dict[str, str | None] = {}
    for path in calls:
        module = gm.get_submodule(path)
        if isinstance(module, _KINDS):
            out[path] = _why_not(gm, path, module, calls, tied)
    return out


def _rank(singular: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values hold ``energy`` of the squared total (all at 1.0)."""
    if energy >= 1.0:
        return len(singular)
    # The clamp keeps an all-zero weight from dividing 0 by 0; the min() below guards a share that rounding keeps a
    # hair under ``energy`` to the end.
    share = torch.cumsum(singular**2, 0) / (singular**2).sum().clamp_min(torch.finfo(singular.dtype).tiny)
    return min(int((share < energy).sum()) + 1, len(singular))


def _matches(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or lies under one (no prefixes: every path matches)."""
    return not prefixes or any(path == p or path.startswith(f"{p}.") for p in prefixes)


@dataclass(frozen=True)
class FactorizePass(Pass):
    """Split Linear and convolution layers into two through a truncated SVD of the weight.

    **Preserves the function with ``energy=1.0`` (the default)**, up to floating-point rounding of the
    factors (a relative error around 1e-7 in float32); the FLOPs rise until a pruning pass removes rank
    channels. With ``energy < 1`` each layer keeps the smallest rank whose singular values hold that
    share of the squared total: smaller and cheaper, but not the same function.

    ``targets``: module paths (or prefixes of paths, ``"features"`` covering ``"features.3"``) of the
    layers to factorize; empty means every eligible one. Eligible: an ``nn.Linear`` or
    ``nn.Conv1d/2d/3d`` with ``groups=1`` that the graph calls exactly once and whose parameters no other
    module shares, and that is not itself a factor; others are skipped with the reason in the note
    (or, when named in ``targets`` and nothing else matches, an :class:`~fxmorph.errors.InputError`
    naming the reason). Running the pass again on its result changes nothing.

    Before/after (``targets=("fc1",)``): ``flatten -> fc1 = Linear(784, 300)`` becomes
    ``flatten -> fc1.0 = Linear(784, 300, bias=False) -> fc1.1 = Linear(300, 300)``.
    """

    name: ClassVar[str] = "factorize"
    preserves_function: ClassVar[bool] = True
    targets: tuple[str, ...] = ()
    energy: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise InputError(f"factorize: targets must be a tuple of module paths, got {self.targets!r}.")
        if isinstance(self.energy, bool) or not isinstance(self.energy, int | float) or not 0 < self.energy <= 1:
            raise InputError(f"factorize: energy must lie in (0, 1], got {self.energy!r}.")

    def promises_function(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        """Exact only at full rank: with ``energy < 1`` the factors drop singular values."""
        return self.energy >= 1.0

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        eligible = factorizable(gm)
        chosen = [p for p, why in eligible.items() if why is None and _matches(p, self.targets)]
        skipped = {p: why for p, why in eligible.items() if why is not None and _matches(p, self.targets)}
        self._check_targets(eligible, chosen)
        if not chosen:
            return PassResult(gm, False, note="nothing factorized: no eligible Linear or convolution")
        splits = [self._split(gm, path) for path in chosen]
        out = split_layers(gm, splits)
        record = dict(out.meta.get(FACTORS_KEY, {}))
        for split in splits:
            # Read from ``gm``: in ``out`` the path holds the Sequential of factors.
            record[split.path] = {"rank": split.rank, "full_rank": full_rank(gm.get_submodule(split.path))}
        out.meta[FACTORS_KEY] = record
        # Shapes and FLOPs of the new graph; eval mode, so the run leaves BatchNorm statistics as they are.
        with frozen_mode(out):
            propagate_shapes(out, ctx.example_inputs)
        ranks = ", ".join(f"{p} {record[p]['rank']}/{record[p]['full_rank']}" for p in chosen[:6])
        note = f"factorized {len(chosen)} layer(s) (rank kept/full: {ranks}{', ...' if len(chosen) > 6 else ''})"
        if skipped:
            note += f"; skipped {len(skipped)}: " + "; ".join(f"{p} ({w})" for p, w in list(skipped.items())[:3])
        logger.info("factorize: %s", note)
        return PassResult(out, True, note=note)

    def _check_targets(self, eligible: dict[str, str | None], chosen: list[str]) -> None:
        """Raise :class:`InputError` for a target that names no layer, or only layers that cannot be factorized."""
        for target in self.targets:
            hits = [p for p in eligible if _matches(p, (target,))]
            if not hits:
                some = ", ".join(list(eligible)[:8]) or "none"
                raise InputError(
                    f"factorize: no Linear or convolution at or under '{target}'; the model's are: {some}."
                )
            # A target whose layers are all factorized already is fine: running the pass twice changes nothing.
            if not any(p in chosen or eligible[p] == _ALREADY for p in hits):
                raise InputError(f"factorize: '{target}' cannot be factorized: {hits[0]} is {eligible[hits[0]]}.")

    def _split(self, gm: fx.GraphModule, path: str) -> Split:
        """How to split the layer at ``path``: its weight's SVD and the rank ``energy`` keeps."""
        svd = weight_svd(gm.get_submodule(path))
        return Split(path, svd, _rank(svd.s, self.energy))
