"""torch.nn container layers that the tracer enters instead of keeping them as leaves.

``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``, ``nn.TransformerDecoderLayer``,
``nn.TransformerDecoder`` and ``nn.Transformer`` are torch.nn layers, so torch.fx keeps them whole by
default, and one opaque node pins every channel of the model. Their forwards cannot be traced as they
are: a fast path is chosen by Python conditions on the input tensors. In eval mode the fast path
computes the same function as the plain ("slow") path written out below, which calls only modules
that have channel rules (``nn.MultiheadAttention``, ``nn.Linear``, ``nn.LayerNorm``, dropout) and the
layer's activation. The one difference in results: ``nn.TransformerEncoder`` given a
``src_key_padding_mask`` may run on nested tensors, which return zeros at padded positions; such a
call is kept as a leaf (its channels pinned) rather than traced along a path that differs.

A model that is itself one of these layers is traced taking its tensors only (``src``; ``tgt, memory``;
``src, tgt``), without masks. Masks are passed on unchanged (``nn.MultiheadAttention`` canonicalises
them itself), and ``is_causal`` stays a hint, as in the originals; the channel rule of an attention
given a mask pins its channels.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["through_forward", "through_root", "traced_through"]


def _encoder_layer(
    self: nn.TransformerEncoderLayer,
    src: Tensor,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    # The slow path of nn.TransformerEncoderLayer.forward (torch 2.x), without the fast-path checks.
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + self._ff_block(self.norm2(x))
    else:
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = self.norm2(x + self._ff_block(x))
    return x


def _encoder(
    self: nn.TransformerEncoder,
    src: Tensor,
    mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool | None = None,
) -> Tensor:
    # The original resolves is_causal=None by comparing the mask with a causal one, a data-dependent test
    # fx cannot trace; as a hint, None means False (the mask itself is still applied).
    output = src
    for mod in self.layers:
        output = mod(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return self.norm(output) if self.norm is not None else output


def _decoder(
    self: nn.TransformerDecoder,
    tgt: Tensor,
    memory: Tensor,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Tensor:
    # As _encoder: tgt_is_causal is taken as a hint, never detected from the mask's values.
    output = tgt
    for mod in self.layers:
        output = mod(
            output,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal,
        )
    return self.norm(output) if self.norm is not None else output


def _transformer(
    self: nn.Transformer,
    src: Tensor,
    tgt: Tensor,
    src_mask: Tensor | None = None,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    src_is_causal: bool | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Tensor:
    # nn.Transformer.forward without its argument checks (they only raise on mismatched shapes).
    memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return self.decoder(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
    )


# Layer -> forward to trace instead (``None``: its own forward traces as it is; the decoder layer has no
# fast path).
_THROUGH: dict[type[nn.Module], Callable[..., Any] | None] = {
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
    nn.TransformerDecoderLayer: None,
    nn.TransformerDecoder: _decoder,
    nn.Transformer: _transformer,
}


def layer_sizes(m: nn.Module) -> dict[str, int]:
    """The width attributes of a layer of the table that its own forward checks but the plain path never
    reads, as its submodules state them now: ``nn.Transformer``'s ``d_model`` and ``nhead`` (its forward
    refuses inputs whose width is not ``d_model``). Write-back sets them on a result given back as the
    user's class, whose layers run their own forward."""
    if _base(m) is nn.Transformer and isinstance(m, nn.Transformer):
        attention = m.encoder.layers[0].self_attn  # every layer of the stock Transformer has one width
        return {"d_model": int(attention.embed_dim), "nhead": int(attention.num_heads)}
    return {}


def _base(m: nn.Module) -> type[nn.Module] | None:
    """The table entry ``m`` is an instance of, if ``m``'s class keeps that entry's forward."""
    for base in _THROUGH:
        # a subclass with its own forward is user code: traced like any other module, not replaced
        if isinstance(m, base) and type(m).forward is base.forward:
            return base
    return None


def traced_through(m: nn.Module) -> bool:
    """True if the tracer enters ``m`` (a layer of the table, or a subclass keeping its forward)."""
    return _base(m) is not None


def _keeps_padded_zeros(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True for an ``nn.TransformerEncoder`` call given a key padding mask (it may use nested tensors)."""
    if not isinstance(m, nn.TransformerEncoder):
        return False
    mask = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)  # forward(src, mask, padding)
    return mask is not None


def through_forward(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any] | None:
    """The forward the tracer should enter for this call of ``m``, or ``None`` to keep the call a leaf."""
    base = _base(m)
    if base is None or _keeps_padded_zeros(m, args, kwargs):
        return None
    replacement = _THROUGH[base]
    return functools.partial(replacement, m) if replacement is not None else m.forward


def _root_encoder_layer(self: nn.TransformerEncoderLayer, src: Tensor) -> Tensor:
    return _encoder_layer(self, src)


def _root_encoder(self: nn.TransformerEncoder, src: Tensor) -> Tensor:
    return _encoder(self, src)


def _root_decoder_layer(self: nn.TransformerDecoderLayer, tgt: Tensor, memory: Tensor) -> Tensor:
    # the twin's class overrides forward, so the layer's own forward is kept under another name
    return self._orig_forward(tgt, memory)  # type: ignore[operator]


def _root_decoder(self: nn.TransformerDecoder, tgt: Tensor, memory: Tensor) -> Tensor:
    return _decoder(self, tgt, memory)


def _root_transformer(self: nn.Transformer, src: Tensor, tgt: Tensor) -> Tensor:
    return _transformer(self, src, tgt)


# As the root, fx makes a graph input of every parameter of the forward, so masks left at None would
# become inputs: the roots take their tensors only.
_ROOTS: dict[type[nn.Module], Callable[..., Any]] = {
    nn.TransformerEncoderLayer: _root_encoder_layer,
    nn.TransformerEncoder: _root_encoder,
    nn.TransformerDecoderLayer: _root_decoder_layer,
    nn.TransformerDecoder: _root_decoder,
    nn.Transformer: _root_transformer,
}


def through_root(model: nn.Module) -> nn.Module:
    """``model``, or, when it is itself one of the layers (fx traces the root by its class's forward), a
    shallow twin sharing every submodule and tensor, whose class traces the plain path and takes the
    layer's tensors only (no masks). The user's model is not touched."""
    base = _base(model)
    if base is None:
        return model
    # A shallow copy shares the submodule, parameter and buffer dicts; only the twin's class changes, to a
    # subclass of the user's (isinstance checks and the class name still hold).
    twin = copy.copy(model)
    namespace: dict[str, Any] = {"forward": _ROOTS[base], "_orig_forward": base.forward}
    twin.__class__ = type(type(model).__name__, (type(model),), namespace)
    return twin
