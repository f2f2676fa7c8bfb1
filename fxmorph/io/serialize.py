"""Save a shrunk model and load it back without pickling any code.

A model made by :func:`fxmorph.shrink` or :func:`fxmorph.resize` (the user's class, or a
``torch.fx.GraphModule``) holds Python code and module classes that ``torch.save`` would have to pickle,
and whose loading would then run arbitrary code. :func:`save` instead stores only plain containers (dicts, lists, ints,
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

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxmorph.analysis import ChannelGraph, Role
from fxmorph.errors import FxmorphError
from fxmorph.io.serialize_format import (
    _DTYPES,
    FORMAT,
    FORMAT_VERSION,
    SerializationError,
    _checksum,
    _dtype_name,
    _read,
    _write,
)
from fxmorph.meta import FACTORS_KEY, INTERFACE_KEY, REGIONS_KEY, REPORT_KEY, metadata
from fxmorph.validate import check_model, check_out_path, model_dtype

__all__ = ["FORMAT", "FORMAT_VERSION", "SerializationError", "load", "save"]

logger = logging.getLogger(__name__)


def _input_spec(model: nn.Module, example_inputs: Any) -> list[dict[str, Any]]:
    """Shapes and dtypes of the example inputs: given, or read from the model's traced interface."""
    if example_inputs is not None:
        values = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(t, torch.Tensor) for t in values):
            raise SerializationError("example_inputs must be a tensor or a tuple of tensors.")
        return [{"shape": [int(s) for s in t.shape], "dtype": _dtype_name(t.dtype)} for t in values]
    spec: list[dict[str, Any]] = []
    if REGIONS_KEY in metadata(model):
        return []  # the recorded interface is the regions' arguments, not the model's inputs
    recorded = metadata(model).get(INTERFACE_KEY)
    if not isinstance(model, fx.GraphModule) and recorded:  # a result given back as the user's class
        if not all(isinstance(x, tuple) and isinstance(x[1], torch.dtype) for x in recorded[0]):
            return []
        return [{"shape": [int(d) for d in shape], "dtype": _dtype_name(dtype)} for shape, dtype in recorded[0]]
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


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once: a module the model holds under two names (``self.alias =
    self.block``) appears in ``state_dict`` under both, and the graph, which load rebuilds, knows one."""
    seen: set[int] = set()
    unique = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            unique[key] = value
    return unique


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
    state = {k: v.detach().cpu().clone().contiguous() for k, v in _unique_state(model).items()}
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
        report = metadata(model).get(REPORT_KEY)
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
    return sorted(metadata(model).get(FACTORS_KEY, {}))


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


def load(
    path: str | os.PathLike[str],
    original_model: nn.Module,
    example_inputs: Any = None,
    *,
    keep_class: bool | None = None,
) -> nn.Module:
    """Rebuild the model saved at ``path`` from ``original_model`` (the architecture it was shrunk from,
    with any weights) and load the stored weights into it; returns a new model of ``original_model``'s
    class where it is proven equal to the rebuilt graph (``keep_class`` as in :func:`fxmorph.shrink`),
    else a GraphModule.

    ``example_inputs`` default to tensors of the shapes and dtypes stored in the file. Raises
    :class:`SerializationError` for a missing, truncated, corrupted or foreign file, and for a file
    whose widths or tensor shapes do not fit ``original_model``.
    """
    from fxmorph.analysis.plan import WidthPlan
    from fxmorph.api.analyze import resize
    from fxmorph.api.deliver import deliver

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
        small = resize(cg, plan, keep_class=False)
    except FxmorphError as exc:
        raise SerializationError(
            f"the widths stored in {path} do not fit the original model ({str(exc).splitlines()[0]}): it was "
            "saved from another architecture."
        ) from exc
    graph_keys = set(small.state_dict())
    # Checked first for a message that names the tensor; strict loading below is the backstop. Tensors of modules
    # the traced forward never reaches (GoogLeNet's aux heads) are in a file saved from the user's class only.
    _check_state(small.state_dict(), {k: v for k, v in state.items() if k in graph_keys}, path)
    small.load_state_dict({k: v for k, v in state.items() if k in graph_keys}, strict=True)
    model, _ = deliver(original_model, small, keep_class=keep_class, entry="load")
    _load_unreached(model, {k: v for k, v in state.items() if k not in graph_keys}, path)
    model.train(data["training"])  # the mode it was saved in (write-back took the original's flags)
    logger.info("loaded %s from %s (%d group widths)", type(original_model).__name__, path, len(widths))
    return model


def _load_unreached(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load the stored tensors of modules outside the traced graph into the model's own, where it has them."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape or v.dtype != own[k].dtype]
    if wrong:
        raise SerializationError(
            f"tensor '{wrong[0]}' in {path} (a module the traced forward never runs) does not fit the original "
            "model's: it was saved from another architecture."
        )
    with torch.no_grad():
        for key, value in usable.items():
            own[key].copy_(value)


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
