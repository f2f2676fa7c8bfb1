"""Checks of a model's structure that fxmorph cannot keep through tracing and surgery: wrappers
(DataParallel, DDP, ``torch.compile``), derived weights other than ``parametrizations.weight_norm``, and hooks
torch.fx would drop. Every entry point that traces runs them (:func:`fxmorph.capture.trace.trace`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from fxmorph.capture.parametrized import check_parametrizations
from fxmorph.errors import InputError

__all__ = ["check_hooks", "check_reshapable", "check_unwrapped"]


def check_unwrapped(model: nn.Module) -> None:
    """``model`` is not a DataParallel, DistributedDataParallel or ``torch.compile`` wrapper (fx cannot trace those)."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        raise InputError(
            f"the model is wrapped in {type(model).__name__}, which torch.fx cannot trace: pass the wrapped model "
            "itself (`model.module`), and wrap the result again if you need to."
        )
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise InputError(
            "the model is a torch.compile wrapper, which torch.fx cannot trace: pass the original model "
            "(`model._orig_mod`), and compile the result again if you need to."
        )


def check_reshapable(model: nn.Module) -> None:
    """No layer of ``model`` derives its weights in a way fxmorph cannot reshape: a parametrization other than
    ``torch.nn.utils.parametrizations.weight_norm`` (whose ``g`` and ``v`` are sliced and kept registered, see
    :mod:`fxmorph.capture.parametrized`), or the hook-based ``weight_norm`` / ``spectral_norm``. (Tied weights,
    one Parameter held by two modules, are fine: the analysis makes every name of a tied tensor index the same
    channels, and surgery slices it once.)"""
    check_parametrizations(model)
    for name, module in model.named_modules():
        # the legacy weight_norm and spectral_norm are forward pre-hooks, not parametrizations
        for hook in module._forward_pre_hooks.values():
            _refuse_norm_hook(name or type(model).__name__, hook)


def _refuse_norm_hook(name: str, hook: Any) -> None:
    """Refuse the hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` of layer ``name``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    # the parametrization form of weight_norm is kept (g and v sliced): the fix may switch to it
    switch = (
        " (or, to keep it, apply torch.nn.utils.parametrizations.weight_norm instead, which fxmorph reshapes "
        "with its g and v)"
    )
    for kind, remove, alternative in (
        (WeightNorm, "remove_weight_norm", switch),
        (SpectralNorm, "remove_spectral_norm", ""),
    ):
        if isinstance(hook, kind):
            raise InputError(
                f"layer '{name}' uses the hook-based torch.nn.utils.{remove.removeprefix('remove_')} (it recomputes "
                f"'{hook.name}' before every call), and fxmorph reshapes stored weights only: remove it first with "
                f"`torch.nn.utils.{remove}(layer)`{alternative}."
            )


def check_hooks(model: nn.Module, leaves: Iterable[str]) -> None:
    """No module that torch.fx inlined (the root, or any module not called as a graph leaf) carries forward or
    backward hooks: the traced graph would silently drop them."""
    leaves = tuple(leaves)
    for name, module in model.named_modules():
        if name and any(name == leaf or name.startswith(leaf + ".") for leaf in leaves):
            continue  # a leaf is called as a module, so its hooks (and those of its children) still run
        kinds = [k for k, d in _HOOK_DICTS if getattr(module, d, None)]
        if kinds:
            where = f"submodule '{name}'" if name else f"the model itself ({type(model).__name__})"
            raise InputError(
                f"{where} has {' and '.join(kinds)} hooks, which torch.fx cannot keep as hooks when it inlines the "
                f"module's forward (it drops them or bakes one trace of them in): {_hook_fix(name)}."
            )


def _hook_fix(name: str) -> str:
    """The fix for hooks on submodule ``name`` (``""``: the root, which cannot be made a leaf)."""
    if not name:
        return "remove them (`handle.remove()`) and register them on the result instead"
    return f"remove them, or name the submodule in `leaf_modules=[{name!r}]` so it stays one call and keeps its hooks"


# (kind named in the error, the nn.Module attribute holding hooks of that kind)
_HOOK_DICTS = (
    ("forward", "_forward_hooks"),
    ("forward-pre", "_forward_pre_hooks"),
    ("backward", "_backward_hooks"),
    ("backward-pre", "_backward_pre_hooks"),
)
