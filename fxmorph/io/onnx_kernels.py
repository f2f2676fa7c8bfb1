"""Small ONNX graphs that run one kernel or one memory-bound op, for profiling a runtime.

Each graph has one input (the activations, random at run time) and the op's weights as initializers, so that the
runtime sees what it sees in an exported model: a ``Conv`` with constant weights (which onnxruntime repacks into its
blocked layout at load time, as it does for a whole model), a ``MatMul`` and ``Add`` for a product with a weight.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxmorph.analysis.kernels import Kernel, KernelKind
from fxmorph.analysis.latency import MemoryClass

__all__ = ["MEMORY_OPS", "input_shapes", "kernel_graph", "memory_graph", "onnx_model"]

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


def kernel_graph(kernel: Kernel, widths: tuple[int, ...]) -> bytes:
    """A model running ``kernel`` at ``widths``, its table's axes (see :class:`~fxmorph.analysis.kernels.Kernel`)."""
    shape = input_shapes(kernel, widths)[0]
    if kernel.kind is KernelKind.GEMM:
        fan_in, out = widths
        nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
        return onnx_model(nodes, [("x", shape)], [_weight("w", (fan_in, out)), _weight("b", (out,))])
    if kernel.kind is KernelKind.DEPTHWISE:
        channels = widths[0]
        groups, cin, cout = channels, channels, channels * kernel.groups  # groups holds the multiplier
    else:
        cin, cout, groups = widths[0], widths[1], kernel.groups
    conv = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        kernel_shape=list(kernel.kernel),
        strides=list(kernel.stride),
        pads=list(kernel.padding),
        dilations=list(kernel.dilation),
        group=groups,
    )
    inits = [_weight("w", (cout, cin // groups, *kernel.kernel)), _weight("b", (cout,))]
    return onnx_model([conv], [("x", shape)], inits)


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


def memory_graph(kind: MemoryClass, channels: int, side: int) -> tuple[bytes, list[tuple[int, ...]], int]:
    """A model running the op of ``kind`` on a ``(1, channels, side, side)`` tensor: its bytes, its input shapes
    and the element count of its output."""
    shape = (1, channels, side, side)
    elements = channels * side * side
    op = MEMORY_OPS[kind]
    if kind is MemoryClass.ELEMENTWISE:
        return (
            onnx_model([helper.make_node(op, ["x", "z"], ["y"])], [("x", shape), ("z", shape)], []),
            [shape, shape],
            elements,
        )
    if kind is MemoryClass.COPY:  # two halves joined: the output has the elements of the input
        half = (1, channels // 2, side, side)
        node = helper.make_node(op, ["x", "z"], ["y"], axis=1)
        return onnx_model([node], [("x", half), ("z", half)], []), [half, half], elements
    inits: list[onnx.TensorProto] = []
    inputs = ["x"]
    attrs: dict[str, object] = {}
    if kind is MemoryClass.BATCH_NORM:
        inits = [_weight(n, (channels,)) for n in ("scale", "bias", "mean")]
        inits.append(numpy_helper.from_array(np.ones(channels, dtype=np.float32), "var"))
        inputs += ["scale", "bias", "mean", "var"]
    elif kind is MemoryClass.NORM:  # over the last dim, as transformers normalise tokens
        inits = [_weight("scale", (side,)), _weight("bias", (side,))]
        inputs += ["scale", "bias"]
        attrs = {"axis": -1}
    elif kind is MemoryClass.POOL:
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    elif kind is MemoryClass.OTHER:
        attrs = {"axis": -1}
    return onnx_model([helper.make_node(op, inputs, ["y"], **attrs)], [("x", shape)], inits), [shape], elements
