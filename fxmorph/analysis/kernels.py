"""Kernels: the runtime operations a latency model measures, described by everything but their widths.

A channel rule that knows which runtime kernel will run its op (a convolution, a product with a weight) records a
:class:`Kernel` beside the op's FLOPs (``RuleContext.cost(..., kernel=..., axes=...)``): the fixed sizes (batch,
spatial size, kernel size, stride, padding, groups) and, as the term's ``axes``, the widths that vary (input and
output channels). The latency model (:mod:`fxmorph.analysis.latency`) prices the op from a table measured for its
kernel over those widths; one table serves every op of the same kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["Kernel", "KernelKind", "conv_kernel", "gemm_kernel", "norm_kernel"]


class KernelKind(Enum):
    """What a kernel computes, and so what its table's axes are."""

    CONV = "conv"
    """A dense or grouped convolution: axes (input channels, output channels); ``groups`` stays fixed."""
    DEPTHWISE = "depthwise"
    """One input channel per group: axis (input channels,); ``groups`` holds the channel multiplier."""
    GEMM = "gemm"
    """A product with a weight matrix (``Linear``, ``addmm``): axes (in features, out features); ``batch`` rows."""


@dataclass(frozen=True)
class Kernel:
    """One runtime kernel with every size fixed but its widths (its table's axes, see :class:`KernelKind`).

    ``spatial`` is the input's spatial size; ``padding`` lists the padding at the start of each spatial dim, then
    at its end (ONNX's ``pads``)."""

    kind: KernelKind
    batch: int
    spatial: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def axes(self) -> int:
        """How many widths the kernel's table spans."""
        return 1 if self.kind is KernelKind.DEPTHWISE else 2

    def key(self) -> str:
        """A stable text key (the on-disk cache's)."""
        sizes = (self.batch, self.spatial, self.kernel, self.stride, self.padding, self.dilation, self.groups)
        return f"{self.kind.value}:" + ";".join(str(s) for s in sizes)


def _tuple(value: object, n: int) -> tuple[int, ...] | None:
    """``value`` as ``n`` ints (one int repeated), or None when it is not ints."""
    if not isinstance(value, int | list | tuple):  # a graph value (a size computed at run time): not a fixed kernel
        return None
    items = [value] * n if isinstance(value, int) else list(value)
    if len(items) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return None
    return tuple(int(v) for v in items)


def _pads(
    padding: int | str | Sequence[int], kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...] | None:
    """ONNX ``pads`` (starts, then ends) of a convolution's ``padding`` argument (ints, ``"same"`` or ``"valid"``)."""
    n = len(kernel)
    if padding == "valid":
        return (0,) * (2 * n)
    if padding == "same":  # torch pads the extra position of an odd total at the end
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return (*(t // 2 for t in totals), *(t - t // 2 for t in totals))
    if isinstance(padding, str):
        return None
    each = _tuple(padding, n)
    return None if each is None else (*each, *each)


def conv_kernel(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: int | Sequence[int],
    padding: int | str | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
) -> Kernel | None:
    """The kernel of a 2-d convolution of an input of ``x_shape`` with a weight of ``w_shape`` (None for other
    dimensions and for settings that are not plain numbers: those ops are priced by their FLOPs)."""
    if len(x_shape) != 4 or len(w_shape) != 4 or not isinstance(groups, int):
        return None
    kernel = tuple(int(k) for k in w_shape[2:])
    strides, dilations = _tuple(stride, 2), _tuple(dilation, 2)
    pads = None if dilations is None else _pads(padding, kernel, dilations)
    if strides is None or dilations is None or pads is None:
        return None
    cin_g, cout = int(w_shape[1]), int(w_shape[0])
    depthwise = groups > 1 and cin_g == 1
    return Kernel(
        KernelKind.DEPTHWISE if depthwise else KernelKind.CONV,
        batch=int(x_shape[0]),
        spatial=tuple(int(s) for s in x_shape[2:]),
        kernel=kernel,
        stride=strides,
        padding=pads,
        dilation=dilations,
        groups=cout // groups if depthwise else groups,
    )


def norm_kernel(x_shape: Sequence[int]) -> Kernel | None:
    """The kernel a CPU runtime runs a batch norm of a 4-d input as where it cannot fold the norm into a convolution
    before it: a depthwise 1x1 convolution (onnxruntime's blocked one, the ReLU after it fused), whose time follows
    the channels as well as the elements; None for other dimensions."""
    if len(x_shape) != 4:
        return None
    return Kernel(
        KernelKind.DEPTHWISE, int(x_shape[0]), tuple(int(s) for s in x_shape[2:]), (1, 1), (1, 1), (0,) * 4, (1, 1), 1
    )


def gemm_kernel(rows: int) -> Kernel:
    """The kernel of a product of ``rows`` rows with a weight matrix."""
    return Kernel(KernelKind.GEMM, batch=int(rows))
