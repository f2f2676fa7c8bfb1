"""``fxmorph.morph``: MorphNet's cycle (Gordon et al. 2018) on a copy of a model, to a FLOPs budget.

1. **Train with the FLOPs regularizer** (:class:`~fxmorph.FlopsRegularizer`): the gates of channels
   that cost many FLOPs and help little are driven towards zero.
2. **Remove dead channels**: gates at or below ``threshold`` are zeroed
   (:meth:`~fxmorph.FlopsRegularizer.zero_dead`) and the ``remove-dead`` pass deletes them physically.
3. **Apply one width multiplier** that lands on the budget: ``fxmorph.shrink(..., strategy="width")``,
   which shrinks every free group by importance when the lean model is above the budget, and grows them
   (function-preserving growth, gradient-chosen values with data) when it is below. The regularizer
   decides the *shape*, the multiplier the *size*.
4. **Fine-tune** the resized model.

The user's model is never modified: everything happens on a deep copy. A small training loop is built in
(:mod:`fxmorph.training`); pass ``step_fn`` to compute the loss your own way, ``optimizer`` for another
optimizer, ``evaluate`` to record a metric at every stage.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, build_channel_graph
from fxmorph.api.analyze import analyze
from fxmorph.api.budget import parse_any_budget
from fxmorph.api.deliver import deliver
from fxmorph.api.options import MorphOptions
from fxmorph.api.regions import refuse_regions
from fxmorph.api.regularizer import FlopsRegularizer
from fxmorph.api.report import MorphReport, MorphStage
from fxmorph.api.shrink import run_pipeline, run_shrink
from fxmorph.api.training import OptimizerFactory, StepFn, adam, default_step, fit
from fxmorph.capture.counting import count_flops, count_params
from fxmorph.capture.trace import as_inputs, trace
from fxmorph.errors import BudgetError, InputError
from fxmorph.meta import FLOPS_KEY, MORPH_KEY
from fxmorph.passes.base import PassContext
from fxmorph.passes.remove_dead import RemoveDeadPass
from fxmorph.passes.rounding import RoundTo
from fxmorph.passes.select import DEFAULT_ROUND_TO
from fxmorph.passes.width import MAX_FACTOR, width_reach
from fxmorph.validate import check_leaf_modules, check_model, check_trainable, low_precision_dtype

__all__ = ["MORPH_KEY", "MorphReport", "MorphStage", "morph", "recalibrate_norms"]

logger = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm


# -- checking what needs the model ------------------------------------------------------------------------
def _check_model(model: Any) -> None:
    check_model(model)
    low = low_precision_dtype(model)
    if low is not None:
        name = str(low).removeprefix("torch.")
        raise InputError(
            f"the model is {name}: morph trains it, and {name} training without mixed precision loses the "
            "regularizer's small gradients and diverges. Call morph on a float32 copy (`model.float()`, with "
            f"float32 data) and convert the result back (`result.to(torch.{name})`)."
        )
    check_trainable(model, "morph")


def _budget(model: nn.Module, inputs: tuple[Any, ...], leaf: tuple[Any, ...], options: MorphOptions) -> int:
    """The budget in FLOPs, refused before training when no width multiplier can reach it."""
    gm = trace(model, inputs, leaf_modules=leaf)
    refuse_regions(gm, "morph")
    budget = parse_any_budget(options.budget_flops, gm.meta[FLOPS_KEY])
    flops, round_to = gm.meta[FLOPS_KEY], options.round_to
    if budget > flops and budget > (most := width_reach(build_channel_graph(gm), round_to, options.protect)):
        raise BudgetError(
            f"budget {budget:,} FLOPs is above what morph's width step can reach: {most:,} FLOPs with every "
            f"growable group of the model at {MAX_FACTOR:g}x its width (round_to={round_to}). Lower the "
            "budget (a percentage such as '150%', or absolute FLOPs)."
        )
    return budget


def _reachable(
    lean: fx.GraphModule, budget: int, inputs: tuple[Any, ...], leaf: tuple[Any, ...], options: MorphOptions
) -> int:
    """``budget``, or the most the lean model can grow to when that is less (dead channels were removed)."""
    if budget <= lean.meta.get(FLOPS_KEY, budget):
        return budget
    most = width_reach(analyze(lean, inputs, leaf_modules=leaf), options.round_to, options.protect)
    if budget > most:
        logger.warning(
            "morph: the lean model grows to at most %s FLOPs (budget %s): resizing to that", f"{most:,}", f"{budget:,}"
        )
        return most
    return budget


# -- stages ------------------------------------------------------------------------------------------------
def _made_by(cg: ChannelGraph, gid: int) -> str:
    return ", ".join(dict.fromkeys(p.name.rsplit(".", 1)[0] for p in cg.groups[gid].producers)) or f"group {gid}"


def _widths(model: nn.Module, inputs: tuple[Any, ...], leaf_modules: tuple[Any, ...]) -> dict[str, int]:
    cg = analyze(model, inputs, leaf_modules=leaf_modules)
    return {_made_by(cg, g.id): g.size for g in cg.free_groups if g.params}


def _evaluate(model: nn.Module, evaluate: Callable[[nn.Module], float] | None) -> float | None:
    if evaluate is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = evaluate(model)
    finally:
        model.train(was_training)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"evaluate must return a number (for example an accuracy), got {value!r}.") from exc


def _stage(name: str, model: nn.Module, inputs: tuple[Any, ...], evaluate: Any, leaf: tuple[Any, ...]) -> MorphStage:
    stage = MorphStage(
        name, count_flops(model, inputs), count_params(model), _evaluate(model, evaluate), _widths(model, inputs, leaf)
    )
    metric = "" if stage.metric is None else f", metric {stage.metric:.4f}"
    logger.info("morph %s: %s FLOPs, %s params%s", name, f"{stage.flops:,}", f"{stage.params:,}", metric)
    return stage


def recalibrate_norms(model: nn.Module, data: Iterable[Any], step: StepFn, batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches`` batches.

    After regularized training the gates (BN gammas) have shrunk steadily, and the running averages, which
    lag behind by about ten steps, describe activations larger than the current ones, so the model is much
    worse in eval mode than in train mode. This forward-only pass (train mode, ``torch.no_grad()``, the
    step's loss discarded) fixes that. Preserves every parameter; changes only running statistics.
    Returns how many batches were used (0 when the model has no BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    momenta, was_training, used = [m.momentum for m in norms], model.training, 0
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        with torch.no_grad():
            for batch in itertools.islice(data, batches):
                step(model, batch)
                used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used


def _remove_dead(model: nn.Module, inputs: tuple[Any, ...], leaf: tuple[Any, ...], uniform: bool) -> fx.GraphModule:
    gm = trace(model, inputs, leaf_modules=leaf)
    return run_pipeline([RemoveDeadPass(uniform_blocks=uniform)], gm, PassContext(inputs), copy_model=True).gm


def morph(
    model: nn.Module,
    budget_flops: float | int | str,
    example_inputs: Any,
    data: Iterable[Any],
    loss_fn: Callable[..., Any] | None = None,
    *,
    strength: float | None = None,
    threshold: float = 1e-2,
    epochs: int = 2,
    finetune_epochs: int = 1,
    optimizer: OptimizerFactory | None = None,
    lr: float = 5e-3,
    finetune_lr: float = 1e-3,
    step_fn: StepFn | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    criterion: str | None = None,
    round_to: RoundTo = DEFAULT_ROUND_TO,
    recalibrate: int = 20,
    progress: bool = True,
    seed: int = 0,
    leaf_modules: Iterable[type | str] = (),
    keep_class: bool | None = None,
    uniform_blocks: bool = False,
) -> tuple[nn.Module, MorphReport]:
    """Reshape a copy of ``model`` with MorphNet's cycle and resize it to ``budget_flops``.

    Train with the FLOPs regularizer, remove the channels whose gate fell to ``threshold`` or below, apply
    the uniform width multiplier that lands on the budget (shrinking or growing), fine-tune.

    Preserves: the user's model (weights, buffers, gradients, train/eval mode and torch's global RNG state
    are as before) and the model's interface (input and output shapes and dtypes; every pass is checked).
    Not the function: the copy is trained. Each removal of dead channels and each growth step is exact at
    the moment it happens (up to the dropped constant outputs of dead BatchNorm channels, see
    :meth:`~fxmorph.FlopsRegularizer.zero_dead`); shrinking by the multiplier is not.

    Args:
        model: the model; never modified (a deep copy is trained).
        budget_flops: FLOPs of the result: absolute (``3.5e8``, ``"1.2G"``), a fraction of the model's FLOPs
            (``0.5``), or a percentage, which may exceed 100% (``"150%"``: the result is wider than the model).
        example_inputs: a tensor or tuple of tensors the model accepts; FLOPs are counted on them.
        data: a re-iterable of batches (a list, a ``DataLoader``), on the model's device. With the default
            step, batches are ``(inputs, targets)``; these also feed Taylor importance and gradient-chosen
            growth in the width step.
        loss_fn: ``loss_fn(model(*inputs), targets) -> scalar``. Without it (``step_fn`` only) the width step
            uses magnitude importance and Net2Net growth, which need no data.
        strength: the regularizer's weight; ``None`` is ``1 / FLOPs`` of the model (MorphNet's starting point;
            scan x0.3 to x10). threshold: a channel whose gate (|BN gamma|, or its group-lasso norm where no
            BatchNorm exists) is at most this after training is removed.
        epochs, finetune_epochs: passes over ``data`` with the regularizer, and after resizing.
        optimizer: a factory ``optimizer(params) -> torch.optim.Optimizer``, called once per phase. Default:
            Adam at ``lr`` (training) and ``finetune_lr`` (fine-tuning). Adam, because its steps are
            invariant to the scale of the gradient: the regularizer's push on a gate is ``strength x`` the
            channel's marginal FLOPs, which spans orders of magnitude across models and layers, and under
            Adam the default strength and learning rate work without tuning either to the model (under
            SGD the push, hence the number of dead channels, scales with ``lr x strength x FLOPs``).
            Adam's steps of about ``lr`` also leave dead gates below the default threshold.
        step_fn: ``step_fn(model, batch) -> loss`` (a scalar tensor) instead of the default step; the loop
            adds the regularizer, calls ``backward`` and steps the optimizer.
        evaluate: ``evaluate(model) -> float`` (for example a validation accuracy), called at every stage
            with the model in eval mode under ``torch.no_grad()``; recorded in the report.
        criterion: importance for the shrinking side of the width step; default ``"taylor"`` with
            ``loss_fn``, ``"l1"`` without.
        round_to: widths of resized groups are multiples of this (groups narrower than it keep their width);
            ``"auto"`` (the default) as in :func:`fxmorph.shrink`.
        recalibrate: after regularized training, re-estimate BatchNorm running statistics over this many
            batches (see :func:`recalibrate_norms`); 0 skips it.
        progress: show tqdm progress bars.
        seed: seeds torch's RNG for the whole cycle (restored afterwards); same seed, same data, same model.
        leaf_modules: extra leaf modules for tracing, as in :func:`fxmorph.trace`.
        keep_class: as in :func:`fxmorph.shrink`: ``None`` gives ``model``'s class back where proven equal to
            the result's graph, else the GraphModule with a warning; ``True`` raises instead; ``False`` never tries.
        uniform_blocks: keep the groups that play one role in the model's repeated blocks at one width, as in
            :func:`fxmorph.shrink` (dead channels go from every block of a class alike: as many as the block
            with the fewest has).

    Returns:
        The fine-tuned model (``model``'s class, or a GraphModule: ``keep_class``; in ``model``'s train/eval
        mode) and its :class:`MorphReport` (also at ``fxmorph.metadata(result)["fxmorph.morph"]``).

    The options are validated once, as a :class:`~fxmorph.api.options.MorphOptions`.

    Raises:
        InputError: no or empty data, a one-shot iterator, batches the model cannot run, neither ``loss_fn`` nor
            ``step_fn``, a loss that is not a scalar, an optimizer instance instead of a factory (or a factory
            that returns no optimizer), negative epochs, a bad criterion, strength or threshold, a model with no
            channel gate to regularize, no trainable parameter, a float16/bfloat16 model, bad model or inputs.
        BudgetError: the budget cannot be parsed, is above what the width step can reach (checked before
            training), or is below what the lean model can reach. See ``docs/bad_input.md``.
    """
    start = time.perf_counter()
    options = MorphOptions(
        budget_flops=budget_flops,
        data=data,
        loss_fn=loss_fn,
        strength=strength,
        threshold=threshold,
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        optimizer=optimizer,
        lr=lr,
        finetune_lr=finetune_lr,
        step_fn=step_fn,
        evaluate=evaluate,
        criterion=criterion,
        round_to=round_to,
        recalibrate=recalibrate,
        progress=progress,
        seed=seed,
        leaf_modules=leaf_modules,
        keep_class=keep_class,
        uniform_blocks=uniform_blocks,
    )
    _check_model(model)
    inputs = as_inputs(example_inputs)
    leaf = check_leaf_modules(model, options.leaf_modules)
    report = MorphReport(_budget(model, inputs, leaf, options), settings=options.settings())
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        work = copy.deepcopy(model)
        result = _cycle(work, inputs, leaf, options, report)
    result.train(model.training)
    result.meta[MORPH_KEY] = report
    # the trained copy is the model the result's graph was computed from: its class, its attributes
    delivered, report.delivery = deliver(work, result, keep_class=options.keep_class, leaf_modules=leaf, entry="morph")
    report.seconds = time.perf_counter() - start
    logger.info("%s", report.table())
    return delivered, report


def _cycle(
    work: nn.Module, inputs: tuple[Any, ...], leaf: tuple[Any, ...], options: MorphOptions, report: MorphReport
) -> fx.GraphModule:
    """Train ``work`` (the user's model's copy) with the regularizer, remove its dead channels, resize it to
    the budget and fine-tune it, recording every stage in ``report``."""
    data, evaluate = options.data, options.evaluate
    step = options.step_fn or default_step(options.loss_fn)  # type: ignore[arg-type]
    where = "step_fn" if options.step_fn is not None else "loss_fn"
    report.stages.append(_stage("original", work, inputs, evaluate, leaf))
    reg = FlopsRegularizer(work, inputs, strength=options.strength, threshold=options.threshold, leaf_modules=leaf)
    report.settings["strength"] = reg.strength
    report.history += fit(
        work,
        data,
        step,
        options.optimizer or adam(options.lr),
        options.epochs,
        penalty=reg,
        progress=options.progress,
        phase="morph: train",
        where=where,
    )
    recalibrate_norms(work, data, step, options.recalibrate)
    report.stages.append(_stage("trained", work, inputs, evaluate, leaf))
    report.dead_channels = sum(len(v) for v in reg.zero_dead().values())
    lean = _remove_dead(work, inputs, leaf, options.uniform_blocks)
    report.stages.append(_stage("dead removed", lean, inputs, evaluate, leaf))
    target = _reachable(lean, report.budget_flops, inputs, leaf, options)
    result, _ = run_shrink(lean, inputs, options.width_step(target, leaf))
    report.stages.append(_stage("resized", result, inputs, evaluate, leaf))
    report.history += fit(
        result,
        data,
        step,
        options.optimizer or adam(options.finetune_lr),
        options.finetune_epochs,
        progress=options.progress,
        phase="morph: fine-tune",
        where=where,
    )
    report.stages.append(_stage("fine-tuned", result, inputs, evaluate, leaf))
    return result
