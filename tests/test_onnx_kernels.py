"""The graphs the latency profile times: a graph of copies computes the ops it claims, and runs them as a model would
(the runtime fuses the sum of side-by-side convolutions into them, so the copies add no op of their own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fxmorph.analysis.kernels import Kernel, KernelKind
from fxmorph.analysis.latency import MemoryClass
from fxmorph.io.onnx_kernels import MEMORY_OPS, input_shapes, kernel_graph, memory_graph, product_graph

_CONV = Kernel(KernelKind.CONV, 1, (8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
_DEPTHWISE = Kernel(KernelKind.DEPTHWISE, 1, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), groups=1)
_GEMM = Kernel(KernelKind.GEMM, 4)


def _run(model: bytes, feeds: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds, strict=True)))[0]


def _optimized_ops(model: bytes, tmp_path: Path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize(("kernel", "widths"), [(_CONV, (16, 32)), (_DEPTHWISE, (16,)), (_GEMM, (24, 40))])
def test_copies_of_a_kernel_sum_their_outputs(kernel: Kernel, widths: tuple[int, ...]) -> None:
    """Three copies compute the sum of three ops, each with its own weights, on the one input."""
    x = np.random.default_rng(0).standard_normal(input_shapes(kernel, widths)[0]).astype(np.float32)
    three = onnx.load_from_string(kernel_graph(kernel, widths, 3))
    weights = {t.name: numpy_helper.to_array(t) for t in three.graph.initializer}
    singles = []
    for i in range(3):  # each copy alone: the one-op graph with copy i's weights
        one = onnx.load_from_string(kernel_graph(kernel, widths))
        for t in one.graph.initializer:
            name = f"{t.name[:-1]}{i}" if t.name.endswith("0") else t.name  # copy 0's names: w0, b0 (a Gemm's b)
            t.CopyFrom(numpy_helper.from_array(weights[name], t.name))
        singles.append(_run(one.SerializeToString(), [x]))
    total = singles[0] + singles[1] + singles[2]
    if kernel.kind is KernelKind.GEMM:  # the chain adds the bias once, in the first copy
        total -= 2 * weights["b"]
    np.testing.assert_allclose(_run(three.SerializeToString(), [x]), total, rtol=1e-4, atol=1e-4)


def test_the_sum_of_side_by_side_convolutions_is_fused_into_them(tmp_path: Path) -> None:
    """Copies of a blocked convolution add no op of their own: the runtime folds each sum into a convolution, as it
    folds a residual add, so five copies less one are four convolutions."""
    ops = _optimized_ops(kernel_graph(_CONV, (16, 32), 5), tmp_path)
    if "ReorderInput" not in ops:  # a CPU without the blocked kernels (AVX2 and up) runs no fused sum
        pytest.skip("onnxruntime runs no blocked convolutions on this CPU")
    assert ops.count("Conv") == 5 and "Add" not in ops


@pytest.mark.parametrize("kind", list(MemoryClass))
def test_memory_ops_chain_without_changing_the_shape(kind: MemoryClass, tmp_path: Path) -> None:
    """A memory-bound op's copies run in a chain on one shape, none merged or removed by the runtime."""
    model, shapes, elements = memory_graph(kind, 16, 7, 4)
    feeds = [np.random.default_rng(1).standard_normal(s).astype(np.float32) for s in shapes]
    assert _run(model, feeds).shape == shapes[0] and elements == 16 * 7 * 7
    # the runtime may run it in its blocked layout (reorders at the graph's ends, in the graph of one op too)
    assert _optimized_ops(model, tmp_path).count(MEMORY_OPS[kind]) == 4


def test_products_chain_back_to_their_input() -> None:
    """An attention's two products per copy bring the tensor back to its shape, and count both products' FLOPs."""
    model, shapes, flops = product_graph(2, 5, 4, 6, 3)
    x, z, v = (np.random.default_rng(2).standard_normal(s).astype(np.float32) for s in shapes)
    expected = x
    for _ in range(3):
        expected = expected @ z @ v
    np.testing.assert_allclose(_run(model, [x, z, v]), expected, rtol=1e-3)
    assert flops == 2 * (2 * 2 * 5 * 4 * 6)
