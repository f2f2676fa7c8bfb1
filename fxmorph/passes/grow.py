"""The ``grow`` pass: add channels where the gradient says capacity helps, keeping the function.

Where: with data, every growable group's bridging operator ``B`` (see :mod:`fxmorph.passes.grow_probe`)
is estimated and steps of ``round_to`` channels are added one at a time, the most ``sum sigma_j^2`` per
FLOP added first (the squared gradient norm GradMax's new channels bring, over what they cost in the
cost model), until no step fits the budget. Without data, one uniform multiplier (see
:mod:`fxmorph.passes.grow_select`). Or the counts asked for. How: :mod:`fxmorph.passes.grow_init`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import fx

from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel, Costs
from fxmorph.analysis.plan import WidthPlan
from fxmorph.errors import BudgetError, InputError, PassError
from fxmorph.meta import GROW_KEY
from fxmorph.passes.base import Pass, PassContext, PassResult, eval_outputs, precision_bound, relative_change
from fxmorph.passes.grow_init import DATA_INITS, INITS, Choice, choose, specs_for, structure_for
from fxmorph.passes.grow_probe import Bridge, bridges, take_batches
from fxmorph.passes.grow_select import greedy_grow_widths, max_grow_flops, uniform_grow_widths
from fxmorph.passes.grow_stats import batch_inputs, calibrate_norms, dual_signs
from fxmorph.passes.grow_values import group_slots, stage_plan
from fxmorph.passes.importance import importance
from fxmorph.passes.protect import check_protect, grow_candidates
from fxmorph.passes.rounding import Grid, RoundTo
from fxmorph.passes.select import DEFAULT_ROUND_TO
from fxmorph.passes.uniform import in_units, width_classes
from fxmorph.surgery.apply import apply_plan

__all__ = ["GROW_KEY", "GrowPass", "grow_to_widths"]

logger = logging.getLogger(__name__)


def _choices(
    cg: ChannelGraph, new: Mapping[int, int], init: str, found: Mapping[int, Bridge], data: bool
) -> dict[int, Choice]:
    return {g: choose(init, cg, cg.groups[g], group_slots(cg, cg.groups[g]), found.get(g), data) for g in new}


def grow_to_widths(
    gm: fx.GraphModule,
    cg: ChannelGraph,
    widths: Mapping[int, int] | np.ndarray,
    ctx: PassContext,
    *,
    init: str = "auto",
    batches: Sequence[Any] = (),
    found: Mapping[int, Bridge] | None = None,
    rank: int = 8,
    scale: float = 0.5,
    noise: float = 0.01,
    verify: bool = True,
    skipped: Mapping[int, str] | None = None,
) -> PassResult:
    """Grow the groups of ``cg`` to ``widths`` (never narrower) with function-preserving values.

    ``found`` holds bridging operators already estimated; without them, and with ``batches``, they are
    estimated for the growing groups. Records per group the init used in ``result.gm.meta[GROW_KEY]``.
    """
    sizes = {g.id: g.size for g in cg.groups}
    new = {g: int(widths[g]) - sizes[g] for g in range(len(cg.groups)) if int(widths[g]) > sizes[g]}
    if not new:
        gm.meta[GROW_KEY] = {"groups": {}, "skipped": dict(skipped or {}), "max_difference": 0.0}
        return PassResult(gm, False, note="no channels to add")
    found = dict(found or {})
    if batches and init != "zero" and any(g not in found for g in new):
        found.update(bridges(cg, [g for g in new if g not in found], batches, ctx.loss_fn, rank, ctx.seed))
    choices: dict[int, Choice] = _choices(cg, new, init, found, bool(batches))
    scores: dict[int, np.ndarray] = {}
    if any(c.init == "net2net" for c in choices.values()):
        criterion = "taylor" if batches else "l2"
        scores = importance(cg, criterion, data=batches, loss_fn=ctx.loss_fn, batches=max(len(batches), 1))
    structures = {g: structure_for(cg, g, choices[g].init, k, scores.get(g)) for g, k in new.items()}
    plain = WidthPlan(structures)
    duals = {g: k for g, k in new.items() if choices[g].init == "dual"}
    signs = dual_signs(cg, duals, found, batches, ctx.loss_fn, ctx.seed) if duals else {}
    specs = {
        g: specs_for(
            cg,
            plain,
            g,
            choices[g].init,
            bridge=found.get(g),
            scores=scores.get(g),
            signs=signs.get(g),
            scale=scale,
            noise=noise,
            seed=ctx.seed,
        )
        for g in new
    }
    plan = stage_plan(cg, structures, specs)
    out = apply_plan(gm, cg, plan, seed=ctx.seed)
    measured = [g for g, c in choices.items() if c.init in ("dual", "zero")]
    plan = calibrate_norms(out, cg, plan, measured, batch_inputs(batches, ctx.example_inputs))
    difference = relative_change(eval_outputs(gm, ctx.example_inputs), eval_outputs(out, ctx.example_inputs))
    precision, bound = precision_bound(out)  # 1e-4 in float32: rounding only, by the Pipeline's measure
    if verify and difference > bound:
        raise PassError(
            f"growth changed the outputs by {difference:.2e} (relative, above the {bound:.0e} that {precision} "
            "rounding allows): this is a bug in fxmorph"
        )
    rows = {
        g: {"init": c.init, "note": c.note, "before": sizes[g], "after": sizes[g] + new[g]} for g, c in choices.items()
    }
    out.meta[GROW_KEY] = {"groups": rows, "skipped": dict(skipped or {}), "max_difference": difference}
    changes = {g: (sizes[g], sizes[g] + k) for g, k in new.items()}
    kinds = sorted({c.init for c in choices.values()})
    note = f"+{sum(new.values())} channels in {len(new)} groups ({', '.join(kinds)})"
    return PassResult(out, True, changes, note, plan)


@dataclass(frozen=True)
class GrowPass(Pass):
    """Add channels until ``budget_flops`` (or the counts in ``channels``) is reached.

    Preserves the function at the moment of growth, on every input, exactly up to floating-point
    rounding (in train mode too, but for dropout's randomness): each new channel either outputs
    exactly zero (``gradmax``: zero fan-in, through ops that keep zero at zero), or is read by nothing
    (``dual``, ``zero``: zero fan-out), or is a copy of a channel whose fan-out it shares (``net2net``,
    whose copies' shares sum to one; where that cannot be exact the group falls back to another
    init). The statistics of new BatchNorm channels only reach the new channels. The pass checks the
    outputs on the example inputs (``verify``) and raises if they moved.

    Where to grow: with ``ctx.data`` and ``ctx.loss_fn``, steps of ``round_to`` channels go, one at a
    time, to the group whose next step brings the most squared gradient norm (``sum sigma_j^2`` of its
    bridging operator, estimated to ``rank`` values on ``batches`` batches) per FLOP added; without
    data, every growable group is scaled by one multiplier. No group grows beyond ``max_factor`` times
    its width. Groups that cannot grow (pinned, ``grow_pins``, or under a ``protect`` prefix) are
    skipped, and the reason recorded in ``result.gm.meta["fxmorph.grow"]``.

    Before/after (resnet18, budget 1.5x its FLOPs, no data): every group scaled by about 1.2
    (``layer1.0.conv1`` 64 -> 80 channels, ...), output unchanged.
    """

    name: ClassVar[str] = "grow"
    preserves_function: ClassVar[bool] = True
    budget_flops: int | None = None
    channels: tuple[tuple[int, int], ...] = ()
    init: str = "auto"
    round_to: RoundTo | Grid = DEFAULT_ROUND_TO
    max_factor: float = 4.0
    rank: int = 8
    batches: int = 4
    scale: float = 0.5
    noise: float = 0.01
    protect: tuple[str, ...] = ()
    verify: bool = True
    uniform_blocks: bool = False
    """Growing to a budget, keep the groups playing one role in the model's repeated blocks at one width
    (see :mod:`fxmorph.passes.uniform`; ``channels`` names its own counts)."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """A known ``init``, a loss with data, data for the inits that read gradients, ``protect`` paths
        the model has, and a budget above the model's FLOPs that ``max_factor`` reaches."""
        if self.init not in INITS:
            raise InputError(f"unknown init '{self.init}': choose one of {', '.join(INITS)}.")
        if ctx.data is not None and ctx.loss_fn is None:
            raise InputError("growing with data needs loss_fn: pass a loss, or no data.")
        if self.init in DATA_INITS and ctx.data is None:
            raise InputError(f"init='{self.init}' needs data and loss_fn: pass both, or use 'net2net' or 'zero'.")
        check_protect(gm, self.protect)
        if self.budget_flops is not None and not self.channels:
            self._check_budget(self.analyse(gm), self.budget_flops)

    def _check_budget(self, cg: ChannelGraph, budget: int) -> None:
        cost = CostModel(cg)
        flops = cost.flops()
        if budget <= flops:
            raise BudgetError(
                f"grow needs a budget above the model's current {flops:,} FLOPs, got {budget:,}: pass absolute "
                "FLOPs or a percentage above 100% ('150%'); fxmorph.shrink goes below."
            )
        candidates, _ = grow_candidates(cg, self.protect)
        most = max_grow_flops(cost, candidates, self.round_to, self.max_factor)
        if budget > most:
            raise BudgetError(
                f"budget {budget:,} FLOPs is above what growth can reach: {most:,} FLOPs with each of the "
                f"{len(candidates)} growable group(s) at {self.max_factor}x its width (round_to={self.round_to}). "
                "Raise max_factor, or lower the budget."
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches = take_batches(ctx.data, self.batches)
        cg = self.analyse(gm)
        cost = CostModel(cg)
        candidates, skipped = grow_candidates(cg, self.protect)
        widths = cost.widths()
        found: dict[int, Bridge] = {}
        if self.channels:
            for g, k in self.channels:
                if g in candidates:
                    widths[g] += k
                else:
                    skipped.setdefault(g, cg.groups[g].pinned or "cannot grow")
            probe = [g for g, _ in self.channels if g in candidates]
        else:
            probe = candidates
        if batches and probe:
            found = bridges(cg, probe, batches, ctx.loss_fn, self.rank, ctx.seed)
        if self.budget_flops is not None and not self.channels:
            widths = self._budget_widths(cg, candidates, found, bool(batches))
        for g, reason in skipped.items():
            logger.info("grow: group %d skipped: %s", g, reason)
        return grow_to_widths(
            gm,
            cg,
            widths,
            ctx,
            init=self.init,
            batches=batches,
            found=found,
            rank=self.rank,
            scale=self.scale,
            noise=self.noise,
            verify=self.verify,
            skipped=skipped,
        )

    def _budget_widths(
        self, cg: ChannelGraph, groups: list[int], found: Mapping[int, Bridge], data: bool
    ) -> np.ndarray:
        """Widths under the budget: most gradient gain per FLOP first with data, one multiplier without."""
        budget = self.budget_flops
        assert budget is not None
        classes, groups = width_classes(cg, groups, self.uniform_blocks)
        gains = {g: np.square(found[g].s) if g in found else np.zeros(1) for g in groups} if data else None

        def widths(costs: Costs, variables: list[int], gained: Mapping[int, np.ndarray] | None) -> np.ndarray:
            if gained is not None:
                return greedy_grow_widths(costs, variables, budget, self.round_to, self.max_factor, gained)
            return uniform_grow_widths(costs, variables, budget, self.round_to, self.max_factor)

        return in_units(CostModel(cg), classes, groups, widths, gains)
