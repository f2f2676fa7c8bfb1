"""The ``merge-factors`` pass: join a factorized pair back into one layer where that costs no more.

:class:`~fxmorph.passes.factorize.FactorizePass` splits a layer into ``first`` (``K`` inputs per output
position, ``r`` outputs) and ``second`` (``r`` to ``out``, pointwise). After pruning, the pair costs
``r * (K + out)`` multiply-adds per position against ``K * out`` for the single layer with weight
``second @ first``: where the rank kept is at or above ``K * out / (K + out)`` the single layer is
cheaper (and one op fewer), for exactly the same function up to rounding. This pass decides which pairs;
:func:`fxmorph.surgery.factors.merge_pairs` builds the merged layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from fxmorph.capture.trace import propagate_shapes
from fxmorph.meta import FACTORS_KEY
from fxmorph.passes.base import Pass, PassContext, PassResult
from fxmorph.surgery.factors import CONVS, factor_pair, merge_pairs, merged_layer
from fxmorph.validate import frozen_mode

__all__ = ["MergeFactorsPass", "merged_layer"]

logger = logging.getLogger(__name__)


def _worth_merging(first: nn.Module, second: nn.Module) -> bool:
    """True when the single layer costs at most what the pair costs per output position."""
    if not isinstance(first, (nn.Linear, *CONVS)) or type(second) is not type(first):
        return False
    # The product is one layer only when the second factor is pointwise: a 1x1 ungrouped convolution without stride
    # or padding, as factorize builds it.
    if isinstance(second, CONVS) and (
        any(k != 1 for k in second.kernel_size)
        or any(t != 1 for t in second.stride)
        or second.padding not in ("valid", (0,) * len(second.kernel_size))
        or second.groups != 1
    ):
        return False
    # The rank as pruned since the split, not the one the record holds.
    rank, fan_in = first.weight.shape[0], first.weight[0].numel()
    out = second.weight.shape[0]
    return fan_in * out <= rank * (fan_in + out)  # a tie merges: the same FLOPs in one op fewer


@dataclass(frozen=True)
class MergeFactorsPass(Pass):
    """Merge each factorized pair (recorded in ``gm.meta[FACTORS_KEY]``) whose rank is at or above the
    break-even ``K * out / (K + out)`` back into one layer. **Preserves the function** up to
    floating-point rounding of the product; FLOPs fall or stay equal. Pairs below the break-even, or
    no longer adjacent, are left as they are; a model without factorized layers is returned unchanged.

    Before/after: ``fc1.0 = Linear(784, 250, bias=False) -> fc1.1 = Linear(250, 300)`` (250 >= 217.3)
    becomes ``fc1 = Linear(784, 300)``.
    """

    name: ClassVar[str] = "merge-factors"
    preserves_function: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        record = gm.meta.get(FACTORS_KEY, {})
        chosen = [path for path in record if self._mergeable(gm, path)]
        if not chosen:
            return PassResult(gm, False, note="nothing merged: every factorized pair is cheaper than its product")
        out = merge_pairs(gm, chosen)
        # A merged path is a plain layer again: save/load must not rebuild it as a pair.
        out.meta[FACTORS_KEY] = {p: r for p, r in record.items() if p not in chosen}
        # Shapes and FLOPs of the new graph; eval mode, so the run leaves BatchNorm statistics as they are.
        with frozen_mode(out):
            propagate_shapes(out, ctx.example_inputs)
        note = f"merged {len(chosen)} factorized pair(s) back into one layer: {', '.join(chosen[:6])}"
        logger.info("merge-factors: %s", note)
        return PassResult(out, True, note=note)

    @staticmethod
    def _mergeable(gm: fx.GraphModule, path: str) -> bool:
        """Whether the pair at ``path`` is still adjacent and its product costs no more than the pair."""
        pair = factor_pair(gm, path)
        return pair is not None and _worth_merging(gm.get_submodule(f"{path}.0"), gm.get_submodule(f"{path}.1"))
