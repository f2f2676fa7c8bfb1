"""Shared checks of what users pass to fxmorph's entry points.

Every check raises an :mod:`fxmorph.errors` exception whose message says what was wrong and what to do,
before any long step starts and without touching the user's model. The table of bad inputs per entry
point, and the test of each, is in ``docs/bad_input.md``.

The checks live in three modules, all re-exported here: :mod:`fxmorph.validate.model` (the model and its
example inputs, and the helpers every check shares), :mod:`fxmorph.validate.data` (training data and loss)
and :mod:`fxmorph.validate.values` (scalar and named arguments).
"""

from __future__ import annotations

from fxmorph.validate.data import check_data, check_first_batch, check_loss, split_batch
from fxmorph.validate.model import (
    LOW_PRECISION,
    SUPPORTED_DTYPES,
    check_leaf_modules,
    check_model,
    check_tensor_inputs,
    check_trainable,
    first_line,
    frozen_mode,
    low_precision_dtype,
    model_dtype,
    run_failure_hint,
    training_mode,
)
from fxmorph.validate.values import (
    check_callable,
    check_count,
    check_number,
    check_options,
    check_out_path,
    check_prefixes,
    check_seed,
    check_tolerances,
)

__all__ = [
    "LOW_PRECISION",
    "SUPPORTED_DTYPES",
    "check_callable",
    "check_count",
    "check_data",
    "check_first_batch",
    "check_leaf_modules",
    "check_loss",
    "check_model",
    "check_number",
    "check_options",
    "check_out_path",
    "check_prefixes",
    "check_seed",
    "check_tensor_inputs",
    "check_tolerances",
    "check_trainable",
    "first_line",
    "frozen_mode",
    "low_precision_dtype",
    "model_dtype",
    "run_failure_hint",
    "split_batch",
    "training_mode",
]
