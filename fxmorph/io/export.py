"""Export a model to ONNX and prove, in onnxruntime, that the file computes what the model computes.

Which exporter
--------------
``torch.onnx.export`` has two exporters in torch 2.14: the ``torch.export``-based one (``dynamo=True``,
torch's default) and the legacy TorchScript one (``dynamo=False``). fxmorph tries the **TorchScript
exporter first** and falls back to the dynamo exporter automatically (``exporter="auto"``); the one used
is recorded in :class:`ExportResult`. Measured on twelve torchvision classifiers (resnet18,
mobilenet_v3_small, vit_b_16, swin_t, convnext_tiny, shufflenet_v2_x0_5, densenet121, efficientnet_b0,
googlenet, inception_v3, squeezenet1_0, regnet_x_400mf), each as the original module and as a shrunk
fxmorph GraphModule, with a batch-1 example and a dynamic batch axis:

- TorchScript: 24 of 24 export, match torch to ~1e-6 (relative) and run at batch 3; 0.2 to 6.6 s of
  export per model.
- dynamo, as ``torch.onnx.export`` does it: 18 of 24. With a batch-1 example ``torch.export``
  specialises the batch axis to 1, which fails for swin_t and convnext_tiny (constraint violation)
  and, worse, silently yields a fixed-batch file for vit_b_16. Exported from a batch-2 copy of the
  example (which this module does for the dynamo exporter) all 24 work, but export takes 2 to 10
  times longer (1.8 to 19 s per model).

Beyond those twelve, alexnet and vgg11 at 64x64 show why the fallback matters: the TorchScript
exporter cannot translate their adaptive pooling (to 6x6 or 7x7 from a smaller map), the dynamo one
can. The TorchScript exporter is also deprecated upstream (it emits a DeprecationWarning, logged here
at debug level); if a later torch removes or breaks it, the automatic fallback keeps
:func:`export_onnx` working with the dynamo exporter. Every file is checked the same
way whichever exporter made it: on the example inputs and, with a dynamic batch, on a batch of
another size, so a silently specialised batch axis is caught and the other exporter is tried.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from fxmorph.capture.trace import as_inputs
from fxmorph.errors import FxmorphError, InputError
from fxmorph.io.onnx_parity import _check_file, _first_line, _MismatchError, _run_torch
from fxmorph.validate import (
    check_model,
    check_out_path,
    check_tensor_inputs,
    check_tolerances,
    run_failure_hint,
)

__all__ = ["EXPORTERS", "ExportError", "ExportResult", "export_onnx"]

logger = logging.getLogger(__name__)

ExporterName = Literal["auto", "torchscript", "dynamo"]
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")  # the order "auto" tries them in
_EXTERNAL_DATA_BYTES = 1_800_000_000  # beyond this the dynamo exporter writes weights to a side file


class ExportError(FxmorphError):
    """A model could not be exported to ONNX, or the exported file does not compute what the model does."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how well it agrees with torch.

    ``max_abs_diff`` is the largest absolute difference between onnxruntime and torch over every
    output and every checked batch size; ``max_rel_diff`` is the same difference divided by the
    largest magnitude of the torch output it was found in. Both are ``None`` when ``check=False``.
    ``fallbacks`` holds, for each exporter tried before the one used, why it was not used.
    """

    path: Path
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    checked: bool
    max_abs_diff: float | None
    max_rel_diff: float | None
    export_seconds: float
    fallbacks: tuple[str, ...] = ()


def _names(prefix: str, count: int) -> tuple[str, ...]:
    """``("input",)`` for one tensor, else ``("input_0", "input_1", ...)``: the ONNX names of the inputs or outputs."""
    return (prefix,) if count == 1 else tuple(f"{prefix}_{i}" for i in range(count))


def _params_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def _quiet_warnings(exporter: str) -> Iterator[None]:
    """Turn the exporters' warnings (deprecation notices, tracer warnings) into debug log records:
    the numerical check (:mod:`fxmorph.io.onnx_parity`), not a warning, decides whether a file is right."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    # Each distinct first line once: the same warning often comes once per op.
    for message in dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)):
        logger.debug("%s exporter warned: %s", exporter, message)


def _export_once(
    exporter: str,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_batch: bool,
    opset: int | None,
) -> None:
    """Write ``path`` with one exporter, from a fresh copy of ``model``; any failure propagates."""
    model = copy.deepcopy(model)  # a fresh copy per attempt: a failed attempt may leave hooks behind
    with _quiet_warnings(exporter):
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
            torch.onnx.export(
                model,
                inputs,
                str(path),
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=opset,
            )
            return
        shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch} for _ in inputs)
            # torch.export specialises a size-1 axis to the constant 1, so trace with two rows.
            inputs = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=shapes,
            opset_version=opset,
            verbose=False,
            external_data=_params_bytes(model) > _EXTERNAL_DATA_BYTES,
        )


def _hint(exc: BaseException) -> str:
    """A fix for an exporter's failure, guessed from its message."""
    # Matched on the message text (the exporters raise few specific types), with several spellings since torch
    # rewords them between releases.
    text = f"{type(exc).__name__} {exc}".lower()
    if "adaptive" in text and "factor" in text:
        return (
            "the TorchScript exporter cannot translate adaptive pooling to a size that does not divide the "
            "input's: use a larger example input or `exporter='dynamo'`"
        )
    if "unsupported" in text or "not supported" in text or "no symbolic" in text or "translation" in text:
        return "an operator has no ONNX translation at this opset: pass a higher `opset=` or replace the operator"
    if "constraint" in text or "specializ" in text or "dynamic" in text or "invalid dimensions" in text:
        return "the batch axis could not be made dynamic: pass `dynamic_batch=False`"
    if "data-dependent" in text or "data dependent" in text or "guard" in text:
        return "the forward branches on tensor values: make its control flow depend on shapes only"
    if "could not find an implementation" in text or "not_implemented" in text:
        return (
            "onnxruntime's CPU provider has no kernel for an operator in this dtype (float64 convolutions, for "
            "example): export the model in float32 (`model.float()` with float32 inputs)"
        )
    if "2gb" in text or "protobuf" in text:
        return "the model is too large for one ONNX file: use the dynamo exporter (`exporter='dynamo'`)"
    return "see the chained exception for the full cause; try the other exporter with `exporter=...`"


def _opset_range() -> tuple[int, int]:
    """The opsets this torch's ONNX exporters accept (from torch's constants, else onnx's newest)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 7, int(onnx.defs.onnx_opset_version())


def _opset_of(path: Path) -> int:
    """The default-domain opset the file at ``path`` declares (-1 when it declares none)."""
    proto = onnx.load(str(path), load_external_data=False)  # the header only: the weights may be gigabytes
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    check: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    exporter: ExporterName = "auto",
) -> ExportResult:
    """Export ``model`` (in eval mode) to the ONNX file ``path`` and check it in onnxruntime.

    ``example_inputs`` is a tensor or a tuple of tensors (one per positional input). With
    ``dynamic_batch`` axis 0 of every input and output is dynamic. ``opset=None`` takes the exporter's
    default. With ``check`` the file is run on the CPU provider and its outputs must match torch's
    (``|onnx - torch| <= atol + rtol * max(|torch|, 0.1 * max|torch output|)``: elementwise like
    ``numpy.allclose``, except that elements under a tenth of their output's largest magnitude are held
    to that tenth, since they carry the float32 rounding of the large values they were computed from),
    also at another batch size when the batch is dynamic.
    ``exporter="auto"`` tries the TorchScript exporter, then the dynamo one (see the module docstring).
    ``rtol``/``atol`` default to 1e-4/1e-5, and to 1e-2/1e-3 for float16 models (a few float16 rounding
    steps). ``model`` itself is never modified: a deep copy is exported. The file is written next to
    ``path`` and moved there only once it passed the check, so a failed export leaves a file already at
    ``path`` as it was. Raises :class:`InputError` for bad arguments (see ``docs/bad_input.md``; bfloat16
    models are refused: onnxruntime's CPU provider cannot check them) and :class:`ExportError` when no
    exporter gives a correct file; its message names the output, index and values of the element
    furthest beyond the tolerance, and the largest difference.
    """
    check_model(model)
    inputs = as_inputs(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError("export_onnx takes tensor inputs only: pass `example_inputs=(tensor, ...)`.")
    check_tensor_inputs(inputs)
    if exporter not in ("auto", *EXPORTERS):
        raise InputError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}.")
    if dynamic_batch and not all(t.dim() for t in inputs):
        raise InputError("a dynamic batch needs inputs with a batch axis (dim 0): pass `dynamic_batch=False`.")
    low, high = _opset_range()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high):
        raise InputError(
            f"opset must be None (the exporter's default) or an int from {low} to {high} (what this "
            f"torch exports), such as 18; got {opset!r}."
        )
    rtol, atol = check_tolerances(model, rtol, atol)
    path = check_out_path(path, "path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"path {path}: its directory cannot be created ({exc.strerror or exc}).") from exc
    inputs = tuple(t.detach().cpu() for t in inputs)  # exported and checked on the CPU, where onnxruntime runs the file
    try:
        work = copy.deepcopy(model).cpu().eval()
        expected = _run_torch(work, inputs)
    except Exception as exc:
        fix = run_failure_hint(model, inputs, exc) or "check the shapes and dtypes of `example_inputs`"
        raise ExportError(
            f"{type(model).__name__} does not run on the example inputs in eval mode ({_first_line(exc)}): {fix}."
        ) from exc
    # The scratch folder sits beside ``path``, on the same file system, so os.replace below moves the checked file
    # atomically.
    with tempfile.TemporaryDirectory(prefix=".fxmorph-export-", dir=path.parent) as scratch:
        result = _export_checked(
            model, work, inputs, expected, Path(scratch) / path.name, dynamic_batch, opset, check, rtol, atol, exporter
        )
        for name in (path.name + ".data", path.name):  # the weights first: the model file refers to them
            if (Path(scratch) / name).exists():
                os.replace(Path(scratch) / name, path.with_name(name))
    result = dataclasses.replace(result, path=path)
    logger.info(
        "exported %s to %s with the %s exporter in %.1f s (max abs diff %s)",
        type(model).__name__,
        path,
        result.exporter,
        result.export_seconds,
        "unchecked" if result.max_abs_diff is None else f"{result.max_abs_diff:.3g}",
    )
    return result


def _export_checked(
    model: nn.Module,
    work: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    expected: list[np.ndarray],
    path: Path,
    dynamic_batch: bool,
    opset: int | None,
    check: bool,
    rtol: float,
    atol: float,
    exporter: str,
) -> ExportResult:
    """Export to ``path`` with each exporter in turn until one gives a file that passes the check."""
    input_names, output_names = _names("input", len(inputs)), _names("output", len(expected))
    order = EXPORTERS if exporter == "auto" else (exporter,)
    failures: list[tuple[str, str, BaseException]] = []  # (exporter, "export" | "mismatch", cause)
    for name in order:
        start = time.perf_counter()
        try:
            _export_once(name, work, inputs, path, input_names, output_names, dynamic_batch, opset)
            seconds = time.perf_counter() - start  # the export alone, not the check
            diffs = (
                _check_file(work, path, inputs, expected, output_names, dynamic_batch, rtol, atol)
                if check
                else (None, None)
            )
        except _MismatchError as exc:
            logger.warning("%s exporter: the ONNX file does not match torch: %s", name, exc)
            failures.append((name, "mismatch", exc))
            continue
        except Exception as exc:  # torch and onnxruntime raise many unrelated types
            logger.info("%s exporter failed: %s", name, _first_line(exc))
            failures.append((name, "export", exc))
            continue
        result = ExportResult(
            path=path,
            exporter=name,
            opset=_opset_of(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_batch=dynamic_batch,
            checked=check,
            max_abs_diff=diffs[0],
            max_rel_diff=diffs[1],
            export_seconds=seconds,
            fallbacks=tuple(
                f"{n}: {exc}" if kind == "mismatch" else f"{n}: {_first_line(exc)}" for n, kind, exc in failures
            ),
        )
        return result
    raise _failure(type(model).__name__, failures) from failures[0][2]


def _failure(model_name: str, failures: list[tuple[str, str, BaseException]]) -> ExportError:
    """The :class:`ExportError` for every exporter failing: a mismatch first (a file was made, and the difference
    tells most), then the others with a fix each."""
    mismatches = [(n, exc) for n, kind, exc in failures if kind == "mismatch"]
    head = mismatches[0][0] if mismatches else None
    if mismatches:
        lines = [f"the ONNX file of {model_name} made by the {head} exporter does not match torch: {mismatches[0][1]}."]
    else:
        lines = [f"{model_name} could not be exported to ONNX:"]
    for n, kind, exc in failures:
        if n == head:
            continue
        if kind == "mismatch":
            lines.append(f"- the {n} exporter's file disagrees as well: {exc}")
        else:
            lines.append(f"- the {n} exporter failed: {_first_line(exc).rstrip('.')}; fix: {_hint(exc)}")
    if mismatches:
        lines.append(
            "Fix: look for operators whose ONNX translation differs (for example in float16, or an "
            "unusual padding or interpolation mode), loosen `rtol`/`atol` if the difference is rounding, "
            "or pass `check=False` to keep the file for inspection."
        )
    return ExportError("\n".join(lines))
