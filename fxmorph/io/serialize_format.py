"""The file format of :func:`fxmorph.save`: its header, the dtypes it names, a checksum per tensor, and
writing a payload (atomically) and reading one back (with ``torch.load(..., weights_only=True)``, every entry
checked).

What the entries mean, and how :func:`fxmorph.load` rebuilds a model from them, is in
:mod:`fxmorph.io.serialize`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fxmorph.errors import FxmorphError

__all__ = ["FORMAT", "FORMAT_VERSION", "SerializationError"]

FORMAT = "fxmorph.shrunk-model"
FORMAT_VERSION = 1
_REQUIRED = {
    "format": str,
    "format_version": int,
    "example_inputs": list,
    "widths": dict,
    "shapes": dict,
    "checksums": dict,
    "state_dict": dict,
    "training": bool,
}
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class SerializationError(FxmorphError):
    """A model cannot be saved, or a file cannot be loaded back (unreadable, corrupted, or made from
    another architecture)."""


def _checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw bytes."""
    # The bytes, not the values: the hash covers every bit (-0.0, NaN payloads) whatever the dtype, and numpy lacks
    # bfloat16 anyway.
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``, the form the file stores."""
    return str(dtype).removeprefix("torch.")


def _write(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a file beside ``path``, then move it there: a failed write leaves ``path`` as it was."""
    if not path.parent.is_dir():
        raise SerializationError(f"cannot write {path}: the directory {path.parent} does not exist; create it first.")
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)  # torch.save opens the file by name
    try:
        torch.save(payload, scratch)
        os.replace(scratch, path)
    except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError for OS failures
        raise SerializationError(f"cannot write {path}: {getattr(exc, 'strerror', None) or _first(exc)}.") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


def _first(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message (at most 200 characters), or its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _read(path: Path) -> dict[str, Any]:
    """The file's payload, every entry checked for type, shape, consistency and checksum;
    :class:`SerializationError` otherwise."""
    if not path.is_file():
        raise SerializationError(f"no file at {path}: pass the path a model was saved to with fxmorph.save.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: loading runs no pickled code
    except Exception as exc:  # torch raises many types for truncated, corrupted or foreign files
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # The line that names the cause in torch's long message.
        lines = [line for line in lines if line.startswith("WeightsUnpickler error")] or lines
        first = lines[0].split(". ")[0][:200] if lines else ""
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise SerializationError(
            f"cannot read {path}: it is truncated, corrupted, or not a file written by fxmorph.save ({detail})."
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SerializationError(f"{path} is not a file written by fxmorph.save (no '{FORMAT}' header).")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise SerializationError(f"{path} has an invalid format version {version!r}: the file is corrupted.")
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"{path} has format version {version}, newer than this fxmorph reads ({FORMAT_VERSION}): upgrade fxmorph."
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise SerializationError(f"{path} is corrupted: entry '{key}' is missing or not a {kind.__name__}.")
    state, shapes = data["state_dict"], data["shapes"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SerializationError(f"{path} is corrupted: state dict entry {bad[0]!r} is not a named tensor.")
    if set(state) != set(shapes):
        odd = sorted(set(state) ^ set(shapes))
        raise SerializationError(f"{path} is corrupted: the state dict and the shape list disagree on {odd[:3]}.")
    for name, tensor in state.items():
        if list(tensor.shape) != list(shapes[name]):
            raise SerializationError(
                f"{path} is corrupted: tensor '{name}' has shape {list(tensor.shape)}, the file lists {shapes[name]}."
            )
    checksums = data["checksums"]
    if set(checksums) != set(state):
        raise SerializationError(f"{path} is corrupted: the checksums do not cover the stored tensors.")
    damaged = [name for name, tensor in state.items() if _checksum(tensor) != checksums[name]]
    if damaged:
        raise SerializationError(
            f"{path} is corrupted: the data of {len(damaged)} tensor(s) does not match its checksum "
            f"(first '{damaged[0]}'); save the model again."
        )
    for gid, width in data["widths"].items():
        if not isinstance(gid, int) or not isinstance(width, int) or width < 1:
            raise SerializationError(f"{path} is corrupted: width entry {gid!r}: {width!r} is not a positive int.")
    factors = data.setdefault("factors", [])  # absent in files without factorized layers
    if not isinstance(factors, list) or not all(isinstance(f, str) for f in factors):
        raise SerializationError(f"{path} is corrupted: entry 'factors' is not a list of module paths.")
    for spec in data["example_inputs"]:
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list) and spec.get("dtype") in _DTYPES):
            raise SerializationError(f"{path} is corrupted: example input entry {spec!r} is malformed.")
    return data
