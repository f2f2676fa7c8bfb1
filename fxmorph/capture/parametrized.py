"""Parametrized weights: which ``torch.nn.utils.parametrize`` parametrizations fxmorph keeps, and how capture
shows them.

``torch.nn.utils.parametrizations.weight_norm`` (Wav2Vec2's positional convolution, many vocoders) stores a
layer's weight as two tensors, ``parametrizations.weight.original0`` (``g``, the magnitude: the weight's shape
with every dim but ``dim`` of size one; a scalar for ``dim=None``) and ``original1`` (``v``, the direction, the
weight's shape), and derives ``weight = g * v / ||v||`` (the norm over every dim but ``dim``) on every access.
The tracer enters such a layer instead of keeping it whole, so the graph holds the stored tensors (``get_attr``)
and the derivation (``torch._weight_norm(v, g, dim)``, the call ``torch.export`` records as
``aten._weight_norm``): the analysis binds ``g`` and ``v`` to the channels of the weight they make, surgery
slices them, and write-back puts them back in the user's layer with its parametrization still registered.

Every other parametrization (``spectral_norm``, ``orthogonal``, a ``register_parametrization`` of the user's,
weight_norm stacked with another on one tensor) derives its weight in a way the analysis cannot slice, and is
refused (:func:`check_parametrizations`).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from fxmorph.errors import InputError

__all__ = ["check_parametrizations", "entered", "is_weight_norm"]


def is_weight_norm(chain: nn.Module) -> bool:
    """Whether ``chain`` (a ``ParametrizationList``) is exactly one ``parametrizations.weight_norm``."""
    return (
        isinstance(chain, parametrize.ParametrizationList)
        and len(chain) == 1
        and isinstance(chain[0], _WeightNorm)
        and not chain.is_tensor  # weight_norm stores two tensors (g and v), never one
        and getattr(chain, "ntensors", 0) == 2
    )


def entered(module: nn.Module) -> bool:
    """Whether the tracer enters ``module`` rather than keeping it one call: a layer whose tensors are all kept
    parametrizations (:func:`is_weight_norm`), its ``ParametrizationList`` and the ``_WeightNorm`` inside. Kept
    whole, the derived weight would be an attribute no surgery can slice; entered, the graph shows the stored
    tensors and the derivation. (A recurrent layer stays whole: fx cannot trace its forward, and it has no channel
    rule anyway, so its channels keep their widths.)"""
    if isinstance(module, _WeightNorm):
        return True
    if isinstance(module, parametrize.ParametrizationList):
        return is_weight_norm(module)
    if isinstance(module, nn.RNNBase):
        return False  # its forward reads a list of its weights under Python conditions, which fx cannot trace
    return parametrize.is_parametrized(module) and all(is_weight_norm(c) for c in module.parametrizations.values())


def check_parametrizations(model: nn.Module) -> None:
    """Refuse every parametrization but ``parametrizations.weight_norm`` on one tensor (see the module
    docstring), naming the layer, the tensor, the parametrization and the fix."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        where = name or type(model).__name__
        for tensor, chain in module.parametrizations.items():
            if is_weight_norm(chain):
                continue
            kinds = " + ".join(type(p).__name__.lstrip("_") for p in chain)
            raise InputError(
                f"layer '{where}' has a parametrization of '{tensor}' ({kinds}) that fxmorph cannot reshape (of the "
                "parametrizations it keeps only torch.nn.utils.parametrizations.weight_norm, alone on a tensor; "
                "the others derive weights it cannot slice): remove it first with "
                f"`torch.nn.utils.parametrize.remove_parametrizations(layer, {tensor!r})`, and register it again "
                "on the result if you need it."
            )
