"""Parity of an exported ONNX file with torch: run the file in onnxruntime and compare its outputs elementwise.

:func:`fxmorph.io.export.export_onnx` calls :func:`_check_file` on every file it writes, whichever exporter
made it: on the example inputs and, with a dynamic batch, on a batch of another size, so a silently
specialised batch axis is caught. A difference beyond the tolerance raises :class:`_MismatchError`, which
the exporter turns into a fallback or an :class:`~fxmorph.io.export.ExportError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = ["REFERENCE_FLOOR"]

REFERENCE_FLOOR = 0.1
"""Parity compares ``|onnx - torch| <= atol + rtol * max(|torch|, REFERENCE_FLOOR * max|torch output|)``."""


class _MismatchError(Exception):
    """Internal: the exported file ran but its outputs differ from torch's."""


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) model output in pytree order; the check pairs them with the file's outputs by
    position."""
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _run_torch(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The model's outputs on ``inputs`` as numpy arrays, flattened as :func:`_flat_tensors` does."""
    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in _flat_tensors(model(*inputs))]


def _other_batch(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The example inputs with one more row (a copy of the first) on the batch axis."""
    # A batch size the export never saw: a file whose batch axis was silently fixed fails to run on it.
    return tuple(torch.cat([t, t[:1]]) for t in inputs)


def _compare(
    actual: list[np.ndarray], expected: list[np.ndarray], names: tuple[str, ...], rtol: float, atol: float, where: str
) -> tuple[float, float]:
    """Largest absolute and relative difference; raises :class:`_MismatchError` beyond the tolerance."""
    if len(actual) != len(expected):
        raise _MismatchError(f"{where}: the ONNX file has {len(actual)} outputs, the model returns {len(expected)}")
    worst_abs = worst_rel = 0.0
    for name, a, e in zip(names, actual, expected, strict=True):
        a = np.asarray(a)
        if a.shape != e.shape:
            raise _MismatchError(f"{where}: output '{name}' has shape {a.shape} in ONNX and {e.shape} in torch")
        if a.size == 0:
            continue
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        diff = np.abs(a64 - e64)
        both_nan = np.isnan(a64) & np.isnan(e64)
        # NaN in both agrees; NaN in one only is the worst mismatch.
        diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
        flat = int(np.argmax(diff))
        largest = float(diff.flat[flat])
        scale = float(np.nanmax(np.abs(e64))) if not np.isnan(e64).all() else 0.0
        worst_abs = max(worst_abs, largest)
        worst_rel = max(worst_rel, largest / scale if scale > 0 else (0.0 if largest == 0 else np.inf))
        # An element far below its output's largest values carries their float32 rounding, so it is
        # compared against a tenth of the output's magnitude at least (REFERENCE_FLOOR).
        reference = np.maximum(np.abs(np.nan_to_num(e64)), REFERENCE_FLOOR * scale)
        excess = diff / (atol + rtol * reference)
        if (excess > 1.0).any():
            bad = int(np.argmax(excess))
            index = tuple(int(i) for i in np.unravel_index(bad, diff.shape))
            raise _MismatchError(
                f"{where}: output '{name}' differs by {float(diff.flat[bad]):.6g} at index {index} (onnxruntime "
                f"{a64.flat[bad]:.6g}, torch {e64.flat[bad]:.6g}), beyond rtol={rtol:g}, atol={atol:g}; "
                f"the largest difference is {largest:.6g} (output magnitude up to {scale:.6g})"
            )
    return worst_abs, worst_rel


def _check_file(
    model: nn.Module,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    expected: list[np.ndarray],
    output_names: tuple[str, ...],
    dynamic_batch: bool,
    rtol: float,
    atol: float,
) -> tuple[float, float]:
    """Run the file in onnxruntime (CPU) against ``expected``, and at another batch size when it is dynamic; the
    worst ``(abs, rel)`` difference."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are noise here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]

    def run(xs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        return session.run(None, {n: t.numpy() for n, t in zip(feed_names, xs, strict=True)})

    if len(feed_names) != len(inputs):
        raise _MismatchError(f"the ONNX file takes {len(feed_names)} inputs, the example has {len(inputs)}")
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    worst = _compare(run(inputs), expected, output_names, rtol, atol, f"at batch {batch}")
    if dynamic_batch and all(t.dim() for t in inputs):
        other = _other_batch(inputs)
        try:
            got = run(other)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise _MismatchError(f"the file does not run at batch {batch + 1}: {_first_line(exc)}") from exc
        more = _compare(got, _run_torch(model, other), output_names, rtol, atol, f"at batch {batch + 1}")
        worst = (max(worst[0], more[0]), max(worst[1], more[1]))
    return worst


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of ``exc`` (at most 300 characters of it)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
