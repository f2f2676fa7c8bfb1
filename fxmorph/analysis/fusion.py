"""What a CPU runtime runs an exported graph's ops as: the ops it fuses into a convolution, and the batch norms it
runs as a kernel of their own.

onnxruntime's CPU provider folds a batch norm into the convolution before it, runs ReLU, Clip, Sigmoid, Tanh,
LeakyReLU and HardSigmoid as a convolution's activation, and adds a residual as its blocked kernel's sum
(:attr:`~fxmorph.analysis.facts.OpFacts.fuses`). A batch norm it cannot fold (one after a ReLU or a concatenation, as
in densenet121's layers) it runs as a blocked depthwise 1x1 convolution, with the ReLU after it fused: its time
follows the channels as well as the elements, so a norm priced by its elements alone costs twice its price on a late
7x7 map of 1024 channels and half of it on an early 56x56 map of 256 (``benchmarks/RESULTS.md``, session 22).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.graph import ChannelGraph
from fxmorph.analysis.kernels import Kernel, KernelKind, norm_kernel
from fxmorph.analysis.ops import OpKind, node_facts
from fxmorph.meta import tensor_shape

__all__ = ["Fusion", "fusion"]

_CALLS = ("call_module", "call_function", "call_method")

Fusion = tuple[set[str], dict[str, tuple[Kernel, Layout | int]]]
"""The nodes fused into a kernel, and the batch norms run as a kernel of their own with their channels' layout (or
their count, where no group holds them: a model's input)."""


def fusion(cg: ChannelGraph, tabled: Callable[[Kernel], bool] = lambda kernel: True) -> Fusion:
    """One pass over the graph in its order. An op that fuses is fused where this op alone reads its operand, and
    that is a convolution or, but for a batch norm (which folds only into a convolution), a norm run as a kernel or
    an op fused into one. A batch norm of a 4-d tensor that is not fused
    runs as its kernel (:func:`~fxmorph.analysis.kernels.norm_kernel`) where ``tabled(kernel)``; without a table it
    is priced by its memory, and nothing fuses into it."""
    kernels = {t.node for t in cg.costs if t.kernel is not None and t.kernel.kind is not KernelKind.GEMM}
    fused: set[str] = set()
    norms: dict[str, tuple[Kernel, Layout | int]] = {}
    for node in cg.gm.graph.nodes:
        if node.op not in _CALLS:
            continue
        facts = node_facts(node, cg.gm)
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        runs_in = [a.name for a in operands if len(a.users) == 1]
        # a norm folds only into the convolution right before it (an activation between them is not linear); the
        # other ops run inside a kernel as its activation or its sum, after whatever runs inside it already
        folds = facts.kind is OpKind.BATCH_NORM
        if facts.fuses and any(a in kernels or (not folds and (a in fused or a in norms)) for a in runs_in):
            fused.add(node.name)
        elif facts.kind is OpKind.BATCH_NORM:
            norm = _norm(cg, node)
            if norm is not None and tabled(norm[0]):
                norms[node.name] = norm
    return fused, norms


def _norm(cg: ChannelGraph, node: fx.Node) -> tuple[Kernel, Layout | int] | None:
    """The kernel of a batch norm of a 4-d tensor and its channels' layout (their count where no group holds them)."""
    shape = tensor_shape(node)
    kernel = None if shape is None else norm_kernel(shape)
    if shape is None or kernel is None:  # no shape recorded, or not 4-d
        return None
    spaces = cg.spaces.get(node.name)
    layout = spaces.get(1) if isinstance(spaces, dict) else None
    return kernel, int(shape[1]) if layout is None else layout
