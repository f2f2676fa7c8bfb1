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
paths :func:`fxmorph.save` needs to rebuild the model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from fxmorph.capture.trace import propagate_shapes
from fxmorph.errors import InputError
from fxmorph.meta import FACTORS_KEY
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.validate import frozen_mode

__all__ = ["CONVS", "FACTORS_KEY", "FactorizePass", "factorizable", "full_rank"]

logger = logging.getLogger(__name__)

"""``gm.meta`` key: ``{path: {"rank": r, "full_rank": R}}`` for every layer split into ``path.0``, ``path.1``."""

_ALREADY = "already factorized"
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions the pass splits (and merge-factors joins)."""
_KINDS = (nn.Linear, *CONVS)


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
    if path in gm.meta.get(FACTORS_KEY, {}) or path.rpartition(".")[0] in gm.meta.get(FACTORS_KEY, {}):
        return _ALREADY
    return None


def _shared(gm: fx.GraphModule) -> set[str]:
    """Paths of modules whose parameters another module also holds, or that a get_attr node reads."""
    owners: dict[int, list[str]] = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    shared = {path for paths in owners.values() if len(paths) > 1 for path in paths}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
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
    share = torch.cumsum(singular**2, 0) / (singular**2).sum().clamp_min(torch.finfo(singular.dtype).tiny)
    return min(int((share < energy).sum()) + 1, len(singular))


def _factors(module: nn.Module, energy: float) -> tuple[nn.Module, nn.Module, int]:
    """The two layers whose composition is ``module`` (at full rank), and the rank kept."""
    weight = module.weight.detach()
    out = weight.shape[0]
    u, s, vh = torch.linalg.svd(weight.to("cpu", torch.float64).reshape(out, -1), full_matrices=False)
    r = _rank(s, energy)
    root = s[:r].sqrt()
    first_w = (root[:, None] * vh[:r]).to(weight.device, weight.dtype)
    second_w = (u[:, :r] * root).to(weight.device, weight.dtype)
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(module, nn.Linear):
        first: nn.Module = nn.Linear(module.in_features, r, bias=False, **factory)
        second: nn.Module = nn.Linear(r, out, bias=module.bias is not None, **factory)
        first.weight = nn.Parameter(first_w, requires_grad=module.weight.requires_grad)
        second.weight = nn.Parameter(second_w, requires_grad=module.weight.requires_grad)
    else:
        kind = type(module)
        first = kind(module.in_channels, r, module.kernel_size, module.stride, module.padding, module.dilation,
                     bias=False, padding_mode=module.padding_mode, **factory)  # fmt: skip
        second = kind(r, out, 1, bias=module.bias is not None, **factory)
        first.weight = nn.Parameter(first_w.reshape(r, *weight.shape[1:]), requires_grad=module.weight.requires_grad)
        ones = (1,) * (weight.dim() - 2)
        second.weight = nn.Parameter(second_w.reshape(out, r, *ones), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        second.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    first.train(module.training)
    second.train(module.training)
    return first, second, r


def _matches(path: str, prefixes: tuple[str, ...]) -> bool:
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

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        eligible = factorizable(gm)
        chosen = [p for p, why in eligible.items() if why is None and _matches(p, self.targets)]
        skipped = {p: why for p, why in eligible.items() if why is not None and _matches(p, self.targets)}
        self._check_targets(eligible, chosen)
        if not chosen:
            return PassResult(gm, False, note="nothing factorized: no eligible Linear or convolution")
        out = copy.deepcopy(gm)
        record = dict(out.meta.get(FACTORS_KEY, {}))
        for path in chosen:
            record[path] = self._split(out, path)
        out.graph.lint()
        out.recompile()
        out.meta[FACTORS_KEY] = record
        with frozen_mode(out):
            propagate_shapes(out, ctx.example_inputs)
        ranks = ", ".join(f"{p} {record[p]['rank']}/{record[p]['full_rank']}" for p in chosen[:6])
        note = f"factorized {len(chosen)} layer(s) (rank kept/full: {ranks}{', ...' if len(chosen) > 6 else ''})"
        if skipped:
            note += f"; skipped {len(skipped)}: " + "; ".join(f"{p} ({w})" for p, w in list(skipped.items())[:3])
        logger.info("factorize: %s", note)
        return PassResult(out, True, note=note)

    def _check_targets(self, eligible: dict[str, str | None], chosen: list[str]) -> None:
        for target in self.targets:
            hits = [p for p in eligible if _matches(p, (target,))]
            if not hits:
                some = ", ".join(list(eligible)[:8]) or "none"
                raise InputError(f"factorize: no Linear or convolution at or under '{target}'; the model's are: "
                                 f"{some}.")  # fmt: skip
            if not any(p in chosen or eligible[p] == _ALREADY for p in hits):
                raise InputError(f"factorize: '{target}' cannot be factorized: {hits[0]} is {eligible[hits[0]]}.")

    def _split(self, gm: fx.GraphModule, path: str) -> dict[str, Any]:
        """Replace the one call of the layer at ``path`` by calls of its two factors."""
        module = gm.get_submodule(path)
        first, second, rank = _factors(module, self.energy)
        owner, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, nn.Sequential(first, second))
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
        with gm.graph.inserting_after(node):
            a = gm.graph.call_module(f"{path}.0", node.args, dict(node.kwargs))
        with gm.graph.inserting_after(a):
            b = gm.graph.call_module(f"{path}.1", (a,))
        node.replace_all_uses_with(b)
        gm.graph.erase_node(node)
        return {"rank": rank, "full_rank": full_rank(module)}
