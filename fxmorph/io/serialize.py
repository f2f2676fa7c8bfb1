"""Save a shrunk model and load it back without pickling any code.

A model made by :func:`fxmorph.shrink` or :func:`fxmorph.resize` is a ``torch.fx.GraphModule``
whose Python code and module classes ``torch.save`` would have to pickle, and whose loading would
then run arbitrary code. :func:`save` instead stores only plain containers (dicts, lists, ints,
strings) and tensors:

- a format name and version;
- the example input shapes and dtypes the model was traced with;
- the **width plan**: for every channel group of the original model's channel graph
  (``fxmorph.analyze(original, inputs)``), its final width;
- the paths of the layers ``shrink(..., factorize=...)`` split in two (``factors``; absent in files
  without any), which :func:`load` splits the same way before analysing the original;
- the state dict, the shape of each of its entries, and a SHA-256 of each tensor's bytes (``torch.load``
  does not check the archive's CRCs, so damaged tensor data would otherwise load silently).

:func:`load` reads the file with ``torch.load(..., weights_only=True)``, analyses the original
architecture (which the caller supplies, as code they trust), rebuilds the shrunk model with
``fxmorph.resize(cg, WidthPlan.from_widths(cg, widths))`` and loads the stored state dict into it.
The kept channel indices are not needed: the state dict already holds the kept values. Every step is
validated; problems raise :class:`SerializationError` with a message that says what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, Role
from fxmorph.errors import FxmorphError
from fxmorph.validate import check_model, check_out_path, model_dtype

__all__ = ["FORMAT", "FORMAT_VERSION", "SerializationError", "load", "save"]

logger = logging.getLogger(__name__)

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


def _input_spec(model: nn.Module, example_inputs: Any) -> list[dict[str, Any]]:
    """Shapes and dtypes of the example inputs: given, or read from the model's traced interface."""
    if example_inputs is not None:
        values = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(t, torch.Tensor) for t in values):
            raise SerializationError("example_inputs must be a tensor or a tuple of tensors.")
        return [{"shape": [int(s) for s in t.shape], "dtype": _dtype_name(t.dtype)} for t in values]
    spec: list[dict[str, Any]] = []
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
            if node.op == "placeholder":
                if meta is None or not hasattr(meta, "shape"):
                    # All or nothing: a partial list would pair shapes with the wrong inputs.
                    return []
                spec.append({"shape": [int(s) for s in meta.shape], "dtype": _dtype_name(meta.dtype)})
    return spec


def _group_widths(cg: Any, shapes: Mapping[str, Sequence[int]]) -> dict[int, int]:
    """The width of every free group of ``cg`` as the tensors of ``shapes`` (name -> shape) show it.

    A group is measured on a parameter whose bound axis is made of that group alone, producers
    (role ``OUT``) first: surgery keeps module paths, so the same name exists in both models.
    """
    widths: dict[int, int] = {}
    for g in cg.free_groups:
        # A stable sort on ``role != OUT``: producers (False) come first, each kind in member order.
        for m in sorted(g.params, key=lambda p: p.role != Role.OUT):
            shape = shapes.get(m.name)
            if shape is None or m.dim >= len(shape):
                continue
            pieces = cg.layout_groups(cg.bindings[(m.name, m.dim)].layout)
            if not all(gid == g.id for gid, _ in pieces):
                continue
            # The axis holds the group in one piece or several (a cat of the same group), each channel spanning
            # ``i`` positions of a piece.
            inner = sum(i for _, i in pieces)
            if shape[m.dim] % inner:
                raise SerializationError(
                    f"tensor '{m.name}' has {shape[m.dim]} channels on dim {m.dim}, not a multiple of {inner} as "
                    f"group {g.id} of the original model needs: the model does not come from this architecture."
                )
            widths[g.id] = shape[m.dim] // inner
            break
    return widths


def _added_biases(original: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths whose ``bias`` is in ``state`` but not in ``original`` (added by a fold)."""
    names = set(original.state_dict())
    return sorted(k[: -len(".bias")] for k in state if k.endswith(".bias") and k not in names)


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    original: nn.Module | None = None,
    example_inputs: Any = None,
) -> None:
    """Write ``model`` (a model made by :func:`fxmorph.shrink` or :func:`fxmorph.resize`) to ``path``.

    Only plain containers and tensors are written (``torch.save`` of a dict), so :func:`load` can read
    the file with ``weights_only=True``. The width plan is stored per group of the original model's
    channel graph: pass ``original`` (and ``example_inputs``, unless ``model`` was traced and remembers
    its input shapes) to compute it now; without ``original`` the widths come from the shrink report
    the model carries, or failing that, are recomputed from the stored shapes when loading.
    """
    check_model(model, error=SerializationError)
    path = check_out_path(path, "save: path", error=SerializationError)
    # A copy of each tensor: torch.save writes the whole storage behind a view, and the model may keep changing
    # after save returns.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    shapes = {k: [int(s) for s in v.shape] for k, v in state.items()}
    spec = _input_spec(model, example_inputs)
    factors = _factors(model)
    widths: dict[int, int] = {}
    if original is not None:
        if not spec:
            raise SerializationError(
                "save needs example_inputs to analyse the original model: pass example_inputs=(x,)."
            )
        if example_inputs is not None:
            inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        else:
            # The analysis needs shapes and dtypes only: zeros of the recorded ones will do.
            inputs = tuple(torch.zeros(s["shape"], dtype=_DTYPES[s["dtype"]]) for s in spec)
        cg = _analyze(original, inputs, factors, Path(path))
        widths = _group_widths(cg, shapes)
    else:
        from fxmorph.meta import REPORT_KEY

        report = getattr(model, "meta", {}).get(REPORT_KEY)
        if report is not None and not factors:  # with factors, widths are measured from the shapes on load
            widths = {int(r.id): int(r.after) for r in report.groups if not r.pinned}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "example_inputs": spec,
        "widths": widths,
        "shapes": shapes,
        "checksums": {k: _checksum(v) for k, v in state.items()},
        "state_dict": state,
        "training": bool(model.training),  # load puts the model back in this mode
    }
    if factors:
        payload["factors"] = factors
    _write(payload, path)
    logger.info("saved %s (%d tensors, %d group widths) to %s", type(model).__name__, len(state), len(widths), path)


def _factors(model: nn.Module) -> list[str]:
    """The paths of the layers a factorize pass split in ``model`` (from its ``meta``)."""
    from fxmorph.meta import FACTORS_KEY

    return sorted(getattr(model, "meta", {}).get(FACTORS_KEY, {}))


def _analyze(original: nn.Module, inputs: tuple[Any, ...], factors: list[str], path: Path) -> Any:
    """The channel graph of ``original``, with the layers at ``factors`` split first as shrink split them."""
    from fxmorph.api.analyze import analyze

    if not factors:
        return analyze(original, inputs)
    from fxmorph.capture.trace import trace
    from fxmorph.passes import FactorizePass, PassContext, Pipeline

    try:
        gm = Pipeline([FactorizePass(tuple(factors))])(trace(original, inputs), PassContext(inputs)).gm
    except FxmorphError as exc:
        raise SerializationError(
            f"{path} was saved from a model whose layers {factors[:3]} were factorized, and the original model "
            f"cannot be factorized the same way ({str(exc).splitlines()[0]}): it is another architecture."
        ) from exc
    return analyze(gm)


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


def _inputs(data: dict[str, Any], example_inputs: Any, path: Path) -> tuple[torch.Tensor, ...]:
    """The inputs to analyse the original model with: ``example_inputs`` checked against the file's, or tensors
    of the stored shapes and dtypes."""
    stored = data["example_inputs"]
    if example_inputs is None:
        if not stored:
            raise SerializationError(f"{path} does not record its example inputs: pass example_inputs=(x,) to load.")
        generator = torch.Generator().manual_seed(0)  # seeded: loading a file twice analyses the same inputs
        return tuple(
            torch.randn(s["shape"], generator=generator).to(_DTYPES[s["dtype"]])
            if _DTYPES[s["dtype"]].is_floating_point
            else torch.zeros(s["shape"], dtype=_DTYPES[s["dtype"]])
            for s in stored
        )
    values = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in values):
        raise SerializationError("example_inputs must be a tensor or a tuple of tensors.")
    if stored:
        # The batch axis may differ: only the per-sample shapes fix the channel graph.
        given = [([int(s) for s in t.shape[1:]], _dtype_name(t.dtype)) for t in values]
        want = [(s["shape"][1:], s["dtype"]) for s in stored]
        if given != want:
            raise SerializationError(
                f"the example inputs ({given}) differ from those the model was saved with ({want}, shapes "
                "without the batch axis): pass inputs of the saved shapes and dtypes, or none to use them."
            )
    return values


def _check_dtype(data: dict[str, Any], original: nn.Module, path: Path) -> None:
    """The saved model's floating dtype matches the original model's (surgery keeps the dtype)."""
    saved = {t.dtype for t in data["state_dict"].values() if t.is_floating_point()}
    own = model_dtype(original)
    if len(saved) == 1 and own is not None and (dtype := saved.pop()) != own:
        name = _dtype_name(dtype)
        raise SerializationError(
            f"{path} holds a {name} model, but the original model is {_dtype_name(own)}: convert the original "
            f"first (`original.to(torch.{name})`), then load; convert the result afterwards if you need another dtype."
        )


def load(path: str | os.PathLike[str], original_model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """Rebuild the model saved at ``path`` from ``original_model`` (the architecture it was shrunk from,
    with any weights) and load the stored weights into it; returns a new GraphModule.

    ``example_inputs`` default to tensors of the shapes and dtypes stored in the file. Raises
    :class:`SerializationError` for a missing, truncated, corrupted or foreign file, and for a file
    whose widths or tensor shapes do not fit ``original_model``.
    """
    from fxmorph.analysis.plan import WidthPlan
    from fxmorph.api.analyze import resize

    if not isinstance(path, str | os.PathLike):
        raise SerializationError(f"load: path must be a str or pathlib.Path, got {type(path).__name__}.")
    path = Path(path)
    data = _read(path)
    if not isinstance(original_model, nn.Module):
        raise SerializationError(f"load expects the original torch.nn.Module, got {type(original_model).__name__}.")
    _check_dtype(data, original_model, path)
    inputs = _inputs(data, example_inputs, path)
    cg = _analyze(original_model, inputs, data["factors"], path)
    state: dict[str, torch.Tensor] = data["state_dict"]
    derived = _group_widths(cg, data["shapes"])
    # A file saved without the original or a report stores none: measured from the stored shapes.
    widths = dict(data["widths"]) or derived
    _check_widths(cg, widths, derived, path)
    bias_deltas = _bias_deltas(cg, state, path)
    plan = WidthPlan(WidthPlan.from_widths(cg, widths), bias_deltas=bias_deltas)
    try:
        small = resize(cg, plan)
    except FxmorphError as exc:
        raise SerializationError(
            f"the widths stored in {path} do not fit the original model ({str(exc).splitlines()[0]}): it was "
            "saved from another architecture."
        ) from exc
    # Checked first for a message that names the tensor; strict loading below is the backstop.
    _check_state(small.state_dict(), state, path)
    small.load_state_dict(state, strict=True)
    small.train(data["training"])
    logger.info("loaded %s from %s (%d group widths)", type(original_model).__name__, path, len(widths))
    return small


def _check_widths(cg: ChannelGraph, widths: dict[int, int], derived: dict[int, int], path: Path) -> None:
    """Every stored group exists in the original model and agrees with the widths its tensors have."""
    for gid, width in widths.items():
        if not 0 <= gid < len(cg.groups):
            raise SerializationError(
                f"{path} names channel group {gid}, but the original model has {len(cg.groups)} groups: "
                "it was saved from another architecture or other example inputs."
            )
        if gid in derived and derived[gid] != width:
            raise SerializationError(
                f"{path} gives group {gid} width {width} but its tensors have width {derived[gid]}: the file is "
                "corrupted or was saved from another architecture."
            )


def _bias_deltas(cg: ChannelGraph, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Zero biases for the layers the file gives a bias they lack (a dead-channel fold adds one); the
    stored values are loaded over them."""
    bias_deltas = {}
    for owner in _added_biases(cg.gm, state):  # a dead-channel fold can give a layer a bias it lacked
        try:
            module = cg.gm.get_submodule(owner)
        except AttributeError:
            raise SerializationError(f"{path} holds '{owner}.bias', but the original model has no '{owner}'.") from None
        size = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
        if not isinstance(size, int):
            kind = type(module).__name__
            raise SerializationError(f"{path} adds a bias to '{owner}' ({kind}), which cannot have one.")
        # A zero delta makes surgery create the bias; load_state_dict fills in the stored values.
        bias_deltas[owner] = torch.zeros(size, dtype=state[f"{owner}.bias"].dtype)
    return bias_deltas


def _check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """The stored tensors are exactly the rebuilt model's, by name, shape and dtype."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SerializationError(
            f"the tensors in {path} do not match the rebuilt model: {len(missing)} missing ({missing[:3]}), "
            f"{len(unexpected)} unexpected ({unexpected[:3]}): it was saved from another architecture."
        )
    wrong = [(k, list(state[k].shape), list(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        name, got, want = wrong[0]
        raise SerializationError(
            f"{len(wrong)} tensor(s) in {path} have the wrong shape, first '{name}': {got} in the file, {want} in "
            "the model rebuilt from its widths: the file is corrupted or was saved from another architecture."
        )
    other = [(k, state[k].dtype, v.dtype) for k, v in expected.items() if state[k].dtype != v.dtype]
    if other:
        name, got, want = other[0]
        raise SerializationError(
            f"tensor '{name}' is {got} in {path} but {want} in the rebuilt model: convert the original model to "
            f"{got} first (for example `original.to({got})`)."
        )
