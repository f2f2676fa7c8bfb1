"""Small ONNX graphs that run one kernel or one memory-bound op ``copies`` times, for timing a runtime by wall clock.

Each graph has one input (the activations, random at run time) and the op's weights as initializers, so that the
runtime sees what it sees in an exported model: a ``Conv`` with constant weights (which onnxruntime repacks into its
blocked layout at load time, as it does for a whole model), a ``Gemm`` for a product with a weight.

A graph of ``copies`` ops less one of one op is what ``copies - 1`` ops cost inside a model, without what an isolated
op pays once per run (the session's overhead, the layout reorders a blocked convolution needs at the graph's input
and output). Ops that keep their input's shape run in a chain; kernels that change it run side by side on the same
input, their outputs summed into the next copy (onnxruntime fuses the sum into the convolution, as it fuses a
residual add; a ``Gemm`` takes it as its ``C``), so every copy's output stays inside the graph as in a model. On
a CPU where onnxruntime runs no blocked convolutions (below AVX2) the sum is not fused, and a convolution's time
includes that of an add of its output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxmorph.analysis.kernels import Kernel, KernelKind
from fxmorph.analysis.latency import MemoryClass

__all__ = ["MEMORY_OPS", "input_shapes", "kernel_graph", "memory_graph", "onnx_model", "product_graph"]

_OPSET = 17
_RNG = np.random.default_rng(0)


def _weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((_RNG.standard_normal(shape) * 0.05).astype(np.float32), name)


def onnx_model(
    nodes: list[onnx.NodeProto], inputs: list[tuple[str, tuple[int, ...]]], inits: list[onnx.TensorProto]
) -> bytes:
    """The serialised model of ``nodes`` reading float inputs ``inputs`` and writing ``y``."""
    graph = helper.make_graph(
        nodes,
        "fxmorph_profile",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8  # what every onnxruntime since 1.10 loads
    return model.SerializeToString()


def input_shapes(kernel: Kernel, widths: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The input shapes of :func:`kernel_graph` for ``kernel`` at ``widths``."""
    if kernel.kind is KernelKind.GEMM:
        return [(kernel.batch, widths[0])]
    return [(kernel.batch, widths[0], *kernel.spatial)]


def kernel_graph(kernel: Kernel, widths: tuple[int, ...], copies: int = 1) -> bytes:
    """A model running ``kernel`` at ``widths`` (its table's axes, see :class:`~fxmorph.analysis.kernels.Kernel`)
    ``copies`` times side by side on one input, each copy with its own weights (identical copies would be merged by
    the runtime's common subexpression elimination) and each adding its output to the previous copy's."""
    shape = input_shapes(kernel, widths)[0]
    if kernel.kind is KernelKind.GEMM:
        fan_in, out = widths
        inits, nodes = [_weight("b", (out,))], []
        for i in range(copies):
            inits.append(_weight(f"w{i}", (fan_in, out)))
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}", f"y{i - 1}" if i else "b"], [_out(i, copies)]))
        return onnx_model(nodes, [("x", shape)], inits)
    if kernel.kind is KernelKind.DEPTHWISE:
        channels = widths[0]
        groups, cin, cout = channels, channels, channels * kernel.groups  # groups holds the multiplier
    else:
        cin, cout, groups = widths[0], widths[1], kernel.groups
    inits, nodes = [], []
    for i in range(copies):
        inits += [_weight(f"w{i}", (cout, cin // groups, *kernel.kernel)), _weight(f"b{i}", (cout,))]
        conv = helper.make_node(
            "Conv",
            ["x", f"w{i}", f"b{i}"],
            [f"c{i}" if i else _out(0, copies)],
            kernel_shape=list(kernel.kernel),
            strides=list(kernel.stride),
            pads=list(kernel.padding),
            dilations=list(kernel.dilation),
            group=groups,
        )
        nodes.append(conv)
        if i:  # fused by the runtime into the convolution (its sum input), as a residual add is
            nodes.append(helper.make_node("Add", [f"y{i - 1}", f"c{i}"], [_out(i, copies)]))
    return onnx_model(nodes, [("x", shape)], inits)


def _out(i: int, copies: int) -> str:
    """The output name of copy ``i`` of ``copies``: the last one is the graph's ``y``."""
    return "y" if i == copies - 1 else f"y{i}"


def product_graph(batch: int, m: int, k: int, n: int, copies: int = 1) -> tuple[bytes, list[tuple[int, ...]], int]:
    """A model running ``copies`` batched products of two activations in a chain, ``(batch, m, k) @ (batch, k, n)``,
    each followed by ``@ (batch, n, k)`` back to the input's shape where ``n != k`` (an attention's two products):
    its bytes, its input shapes and the FLOPs of one copy."""
    back = n != k
    inputs = [("x", (batch, m, k)), ("z", (batch, k, n))] + ([("v", (batch, n, k))] if back else [])
    nodes, prev = [], "x"
    for i in range(copies):
        out = _out(i, copies)
        if back:
            nodes.append(helper.make_node("MatMul", [prev, "z"], [f"s{i}"]))
            nodes.append(helper.make_node("MatMul", [f"s{i}", "v"], [out]))
        else:
            nodes.append(helper.make_node("MatMul", [prev, "z"], [out]))
        prev = out
    flops = 2 * batch * m * k * n * (2 if back else 1)
    return onnx_model(nodes, inputs, []), [s for _, s in inputs], flops


MEMORY_OPS: dict[MemoryClass, str] = {
    MemoryClass.ELEMENTWISE: "Add",
    MemoryClass.ACTIVATION: "Sigmoid",
    MemoryClass.BATCH_NORM: "BatchNormalization",
    MemoryClass.NORM: "LayerNormalization",
    MemoryClass.COPY: "Concat",
    MemoryClass.POOL: "MaxPool",
    MemoryClass.OTHER: "Softmax",
}
"""The ONNX op that stands for each class of memory-bound ops when profiling."""


def memory_graph(
    kind: MemoryClass, channels: int, side: int, copies: int = 1
) -> tuple[bytes, list[tuple[int, ...]], int]:
    """A model running the op of ``kind`` ``copies`` times in a chain on a ``(1, channels, side, side)`` tensor:
    its bytes, its input shapes and the element count of one op's output."""
    shape = (1, channels, side, side)
    elements = channels * side * side
    op = MEMORY_OPS[kind]
    inputs: list[tuple[str, tuple[int, ...]]] = [("x", shape)]
    inits: list[onnx.TensorProto] = []
    operands: list[str] = []
    attrs: dict[str, object] = {}
    if kind is MemoryClass.ELEMENTWISE:
        inputs.append(("z", shape))
        operands = ["z"]
    elif kind is MemoryClass.COPY:
        # joined with an empty tensor, a Concat copies every element, as joining two halves does, and keeps the shape
        inits = [numpy_helper.from_array(np.zeros((1, 0, side, side), np.float32), "e")]
        operands, attrs = ["e"], {"axis": 1}
    elif kind is MemoryClass.BATCH_NORM:
        inits = [_weight(n, (channels,)) for n in ("scale", "bias", "mean")]
        inits.append(numpy_helper.from_array(np.ones(channels, dtype=np.float32), "var"))
        operands = ["scale", "bias", "mean", "var"]
    elif kind is MemoryClass.NORM:  # over the last dim, as transformers normalise tokens
        inits = [_weight("scale", (side,)), _weight("bias", (side,))]
        operands, attrs = ["scale", "bias"], {"axis": -1}
    elif kind is MemoryClass.POOL:
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    elif kind is MemoryClass.OTHER:
        attrs = {"axis": -1}
    nodes, prev = [], "x"
    for i in range(copies):
        nodes.append(helper.make_node(op, [prev, *operands], [_out(i, copies)], **attrs))
        prev = _out(i, copies)
    return onnx_model(nodes, inputs, inits), [s for _, s in inputs], elements
