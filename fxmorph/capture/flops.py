"""One FLOP counter for all of fxmorph: PyTorch's, made complete for attention on the CPU.

:class:`torch.utils.flop_counter.FlopCounterMode` counts matrix products, convolutions and the
CUDA attention kernels. Two gaps matter on the CPU: ``scaled_dot_product_attention`` runs a kernel
PyTorch does not count, and ``nn.MultiheadAttention`` in eval mode without grad takes a fused fast
path that counts nothing. fxmorph counts the first with PyTorch's own attention formula and turns the
fast path off while counting (restoring the setting after), so attention is always counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["flop_counter"]

# The CPU attention kernels PyTorch's counter has no formula for; the hasattr guard skips names that a
# given torch build does not register.
_CPU_ATTENTION = [
    getattr(torch.ops.aten, name)
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(torch.ops.aten, name)
]


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """PyTorch's own SDPA formula (the products ``q k^T`` and ``attn v``) for one CPU kernel call."""
    return int(sdpa_flop_count(tuple(query.shape), tuple(key.shape), tuple(value.shape)))


# FlopCounterMode hands a formula without this flag the shapes of its tensor arguments; with it, the
# tensors themselves, whose ``.shape`` the formula above reads.
_cpu_attention_flops._get_raw = True  # type: ignore[attr-defined]


class _GlobalOnly:
    """A stand-in for FlopCounterMode's module tracker that files every count under ``"Global"`` alone.

    fxmorph reads only the total. torch's tracker hooks every module call and registers a gradient hook on its
    inputs that require grad, which fails on a view that no_grad made of a parameter (timm's attention pooling
    runs ``self.latent.expand(...)`` into a layer: "Expected gradient function to be set"), and costs a hook
    per call besides."""

    parents: ClassVar[set[str]] = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@contextlib.contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """A FlopCounterMode (entered) that also counts CPU attention; read ``get_total_flops()``."""
    counter = FlopCounterMode(display=False, custom_mapping=dict.fromkeys(_CPU_ATTENTION, _cpu_attention_flops))
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]  # the total is all fxmorph reads
    # A process-wide switch: remember the user's setting so the finally clause puts it back.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
