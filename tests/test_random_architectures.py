"""Random small architectures (drawn by :mod:`tests.random_arch`): removal obeys the mask oracle,
growth keeps the function, and the analysis is deterministic.

Each property draws an architecture (see :mod:`tests.random_arch` for the blocks) and applies plans to
its channel graph directly: a random removal plan must match the mask oracle in float64 (and the cost
model's FLOPs), a random growth plan must keep the outputs, and analysing the same model three times
(also a deep copy) must give the same groups, pins and explanation. Each property draws a derandomized
sample in the default run and the larger one it was written with under ``-m slow`` (``*_thorough``).
The public entry points with random budgets are fuzzed in ``test_fuzz_budgets.py``. Regressions found
by either file follow, each named after its bug.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxmorph
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.testing import random_plan
from tests.conftest import assert_close_trees, check_grow, check_prune
from tests.random_arch import SETTINGS, architectures, build, thorough


def _analyse(arch: dict[str, Any]) -> tuple[nn.Module, torch.Tensor, Any]:
    model, x = build(arch)
    return model, x, fxmorph.analyze(model, (x,))


def _check_random_growth(arch: dict[str, Any], data: st.DataObject) -> None:
    """Add 0 to 3 channels (drawn) to every growable group: the function must be kept."""
    _, x, cg = _analyse(arch)
    growable = [g for g in cg.groups if g.growable]
    news = data.draw(st.lists(st.integers(0, 3), min_size=len(growable), max_size=len(growable)), label="new")
    plan = WidthPlan({g.id: GroupPlan(tuple(range(g.size)), new=k) for g, k in zip(growable, news, strict=True) if k})
    check_grow(cg, plan, x)


# -- properties -------------------------------------------------------------------------------------


REMOVAL = {
    "arch": architectures(),
    "plan_seed": st.integers(0, 2**16),
    "bounds": st.sampled_from([(0.3, 0.7), (0.0, 0.2), (0.5, 1.0), (0.1, 0.9), (1.0, 1.0)]),
}
GROWTH = {"arch": architectures(), "data": st.data()}
NEW_REMOVAL = {"arch": architectures(new_blocks=2), "plan_seed": st.integers(0, 2**16)}
NEW_GROWTH = {"arch": architectures(new_blocks=2), "data": st.data()}


@settings(max_examples=100, **SETTINGS)
@given(**REMOVAL)
def test_random_removal_obeys_mask_oracle(arch: dict[str, Any], plan_seed: int, bounds: tuple[float, float]) -> None:
    _, x, cg = _analyse(arch)
    plan = random_plan(cg, seed=plan_seed, low=bounds[0], high=bounds[1])
    check_prune(cg, plan, x, allow_zero=True)  # a drawn model's masked outputs may all die (ReLU, identity head)


@settings(max_examples=60, **SETTINGS)
@given(**GROWTH)
def test_random_growth_keeps_function(arch: dict[str, Any], data: st.DataObject) -> None:
    _check_random_growth(arch, data)


@settings(max_examples=100, **SETTINGS)
@given(**NEW_REMOVAL)
def test_new_blocks_removal_obeys_mask_oracle(arch: dict[str, Any], plan_seed: int) -> None:
    """The blocks added for issue 18 (parameters used through ``matmul``/``F.linear``, functional norms,
    norm-activation subclasses, ``nn.TransformerEncoderLayer``), two per architecture among the others."""
    _, x, cg = _analyse(arch)
    check_prune(cg, random_plan(cg, seed=plan_seed), x, allow_zero=True)


@settings(max_examples=50, **SETTINGS)
@given(**NEW_GROWTH)
def test_new_blocks_growth_keeps_function(arch: dict[str, Any], data: st.DataObject) -> None:
    _check_random_growth(arch, data)


_NEW_BLOCKS = {
    "matmul": ("param_product", {"cout": 6, "mode": "matmul"}),
    "f_linear": ("param_product", {"cout": 6, "mode": "linear"}),
    "param_first_dim": ("param_product", {"cout": 6, "mode": "rmatmul"}),
    "f_batch_norm": ("functional_norm", {"kind": "batch_norm", "groups": 1}),
    "f_group_norm": ("functional_norm", {"kind": "group_norm", "groups": 2}),
    "f_layer_norm": ("functional_norm", {"kind": "layer_norm", "groups": 1}),
    "norm_act": ("norm_act", {"cout": 6, "act": "silu"}),
    **{
        f"encoder_{'pre' if nf else 'post'}_{'batch' if bf else 'seq'}_first": (
            "encoder",
            {"heads": 2, "head_dim": 4, "ffn": 12, "norm_first": nf, "batch_first": bf, "activation": "gelu"},
        )
        for nf in (False, True)
        for bf in (False, True)
    },
}


@pytest.mark.parametrize("block", sorted(_NEW_BLOCKS))
def test_new_block_is_free(block: str) -> None:
    """Issue 18: one op without a rule pinned whole timm models. Between a convolution and a head, each
    new block leaves every group its parameters touch free, and obeys the mask oracle."""
    arch = {
        "blocks": [
            ("conv", {"cout": 8, "k": 3, "bn": True}),
            _NEW_BLOCKS[block],
            ("conv", {"cout": 8, "k": 1, "bn": False}),
        ],
        "head": ("gap_linear", {"out": 3}),
        "container": "tuple",
        "seed": 0,
    }
    _, x, cg = _analyse(arch)
    touched = [g for g in cg.groups if any(p.name.startswith("blocks.1.") for p in g.params)]
    assert touched, cg.explain()
    pinned = [g for g in touched if g.pins]
    assert not pinned, cg.explain()
    check_prune(cg, random_plan(cg, seed=1), x)


def _summary(cg: Any) -> list[tuple[Any, ...]]:
    return [
        (
            g.id,
            g.size,
            [str(p) for p in g.pins],
            [str(p) for p in g.grow_pins],
            sorted((m.name, m.dim, m.role) for m in g.params),
            sorted((m.name, m.dim) for m in g.tensors),
        )
        for g in cg.groups
    ]


@settings(max_examples=30, **SETTINGS)
@given(arch=architectures())
def test_analysis_is_deterministic(arch: dict[str, Any]) -> None:
    model, x, first = _analyse(arch)
    second = fxmorph.analyze(model, (x,))
    third = fxmorph.analyze(copy.deepcopy(model), (x.clone(),))
    assert _summary(first) == _summary(second) == _summary(third)
    assert first.explain(all_groups=True) == second.explain(all_groups=True) == third.explain(all_groups=True)


# The samples the properties were written with, under ``-m slow``: the default run draws enough to meet
# every block kind many times over.
test_random_removal_thorough = thorough(test_random_removal_obeys_mask_oracle, 200, **REMOVAL)
test_random_growth_thorough = thorough(test_random_growth_keeps_function, 120, **GROWTH)
test_new_blocks_removal_thorough = thorough(test_new_blocks_removal_obeys_mask_oracle, 250, **NEW_REMOVAL)
test_new_blocks_growth_thorough = thorough(test_new_blocks_growth_keeps_function, 100, **NEW_GROWTH)
test_analysis_is_deterministic_thorough = thorough(test_analysis_is_deterministic, 60, arch=architectures())


@pytest.mark.parametrize("seed", range(3))
def test_builder_covers_every_block(seed: int) -> None:
    """Every block of the generator builds, runs and traces (guards the generator itself)."""
    arch = {
        "blocks": [
            ("conv", {"cout": 8, "k": 3, "bn": True}),
            ("depthwise", {"mult": 2, "bn": True}),
            ("grouped", {"groups": 4, "cout": 8, "k": 3, "bn": False}),
            ("se", {"hidden": 4, "linear": True}),
            ("se", {"hidden": 3, "linear": False}),
            ("shuffle", {"groups": 2, "module": False}),
            ("shuffle", {"groups": 4, "module": True}),
            ("shuffle_unit", {}),
            ("tap", {"head": ("gap_linear", {"out": 3})}),
            ("reuse", {"residual": True}),
            ("pool", {"max": True}),
            ("residual", {"body": [("conv", {"cout": 6, "k": 3, "bn": True})], "proj": True, "proj_bn": True}),
            (
                "concat",
                {"branches": [[("conv", {"cout": 2, "k": 1, "bn": False})]] * 2, "identity": True, "nested": True},
            ),
            ("split", {"mode": "sizes", "arg": [3, 7], "sizes": [3, 7], "bodies": [[], []], "combine": "reverse"}),
            ("attention", {"heads": 2, "head_dim": 3, "ln": True, "sdpa": False}),
        ],
        "head": ("flatten_linear", {"out": 3}),
        "container": "dict",
        "seed": seed,
    }
    _, x, cg = _analyse(arch)
    check_prune(cg, random_plan(cg, seed=seed), x)
    check_grow(cg, WidthPlan({g.id: GroupPlan(tuple(range(g.size)), new=2) for g in cg.groups if g.growable}), x)


# -- regressions found by the properties above --------------------------------------------------------


class _ReusedOnInput(nn.Module):
    """One 3x3 convolution (3 -> 3 channels) called twice, first on the model input, then a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(F.relu(self.shared(x))))


def test_regression_module_reused_on_model_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(_ReusedOnInput().eval(), (x,))
    shared = [g for g in cg.groups if any(p.name == "shared.weight" for p in g.params)]
    assert all(g.pins for g in shared), "shared.weight's group must be pinned"
    check_prune(cg, random_plan(cg, seed=0), x)


class _ReusedAfterUnalignedAdd(nn.Module):
    """``y`` from a depthwise multiplier (2 stem channels x 2, so its channels move in pairs) plus the
    concatenation of a 1-channel and a 3-channel conv: the first pair straddles the boundary, so the add
    is pinned and its result has no channel layout; a 4 -> 4 conv is then called twice. (Plus a plain
    4-channel conv, the pairs line up: that conv's channels are regrouped in pairs.)"""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.dw = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.b, self.c = nn.Conv2d(4, 1, 1), nn.Conv2d(4, 3, 1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.a(x))
        return self.head(self.shared(self.shared(y + torch.cat([self.b(y), self.c(y)], 1))))


def test_regression_module_reused_after_unaligned_add() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(_ReusedAfterUnalignedAdd().eval(), (x,))
    shared = [g for g in cg.groups if any(p.name == "shared.weight" for p in g.params)]
    assert all(g.pins for g in shared), "shared.weight's group must be pinned"
    check_prune(cg, random_plan(cg, seed=0), x)


class _ChunkCountAboveSize(nn.Module):
    """``y.chunk(3)`` of 4 channels gives only two pieces of 2 (chunks of ceil(4 / 3) channels); a conv
    per piece, added."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b, self.c = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.a(x).chunk(3, dim=1)
        return self.b(p[0]) + self.c(p[1])


def test_regression_chunk_count_above_piece_count_grows() -> None:
    """Growing the chunked group would make chunk(3) cut 3 pieces instead of 2: it must be pinned."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(_ChunkCountAboveSize().eval(), (x,))
    chunked = next(g for g in cg.groups if any(p.name == "a.weight" for p in g.params))
    assert chunked.pinned is not None and "chunk" in chunked.pinned
    plan = WidthPlan({g.id: GroupPlan(tuple(range(g.size)), new=1) for g in cg.groups if g.growable})
    check_grow(cg, plan, x)


class _ChunkExact(nn.Module):
    """``y.chunk(2)`` of 4 channels: as many pieces as requested, a conv per piece, added."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b, self.c = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.a(x).chunk(2, dim=1)
        return self.b(p[0]) + self.c(p[1])


def test_chunk_with_requested_piece_count_stays_free() -> None:
    """The pin above is only for chunks with fewer pieces than requested: ``chunk(2)`` of 4 channels
    keeps one free, growable group for both pieces."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cg = fxmorph.analyze(_ChunkExact().eval(), (x,))
    chunked = next(g for g in cg.groups if any(p.name == "a.weight" for p in g.params))
    assert chunked.growable and chunked.size == 2
    check_prune(cg, WidthPlan({chunked.id: GroupPlan((1,))}), x)
    check_grow(cg, WidthPlan({chunked.id: GroupPlan((0, 1), new=2)}), x)


class _ConvAppliedTwice(nn.Module):
    """A 2 -> 2 convolution applied to its own output: its weight reads and makes the same group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1)
        self.shared = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(F.relu(self.shared(self.stem(x)))))


@pytest.mark.parametrize(("init", "with_data"), [("net2net", False), ("auto", False), ("net2net", True),
                                                 ("gradmax", True)])  # fmt: skip
@pytest.mark.parametrize("channels", [1, 6])
def test_regression_net2net_on_layer_applied_to_its_own_output(init: str, with_data: bool, channels: int) -> None:
    """Found by ``test_fuzz_budgets.py``: Net2Net split the shared weight's rows and columns with one
    spec per path, so growing by one channel changed the outputs by 5% and by more channels surgery
    failed on a shape mismatch. Splitting is refused there: the group falls back to ``zero`` without
    data, ``dual`` with data."""
    torch.manual_seed(0)
    model, x = _ConvAppliedTwice().eval(), torch.randn(2, 3, 8, 8)
    data = [(torch.randn(2, 3, 8, 8), torch.zeros(2, 1, 8, 8))] if with_data else None
    big, report = fxmorph.grow(model, (x,), channels=channels, init=init, data=data,
                               loss_fn=F.mse_loss if data else None, return_report=True)  # fmt: skip
    fxmorph.check(big, (x,))
    (row,) = [r for r in report.groups if "shared" in r["made_by"]]
    assert row["init"] == ("dual" if with_data else "zero") and row["after"] == row["before"] + channels
    with torch.no_grad():
        for inputs in (x, torch.randn(2, 3, 8, 8)):
            assert_close_trees(big(inputs), model(inputs), rtol=1e-5, what="growth equivalence")


class _ConstantGroup(nn.Module):
    """``a`` has zero weights, so each of its ``width`` channels is the constant ``relu(bias)``, which
    ``remove-dead`` folds into ``b``'s bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.act, self.b = nn.Conv2d(4, width, 1), nn.ReLU(), nn.Conv2d(width, 2, 1)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.bias.uniform_(0.5, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(F.relu(self.stem(x)))))


@pytest.mark.parametrize("width", [1, 2])
def test_regression_remove_dead_folds_only_channels_it_removes(width: int) -> None:
    """Found by ``test_fuzz_budgets.py``: when every channel of a group was constant, ``remove-dead``
    folded all of them into the consumer's bias but kept one (a group keeps a channel), so the kept
    channel counted twice and the outputs moved (by 20% to 45% here)."""
    torch.manual_seed(0)
    model, x = _ConstantGroup(width).eval(), torch.randn(2, 3, 8, 8)
    small, report = fxmorph.shrink(model, 1.0, (x,), round_to=1, return_report=True)
    fxmorph.check(small, (x,))
    assert report.passes[0]["modified"]
    with torch.no_grad():
        assert_close_trees(small(x), model(x), rtol=1e-6, what="remove-dead equivalence")
