"""Hugging Face's Conv1D (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): ``torch.addmm(bias, x, w)`` with its weight
stored (in, out), read as ``aten.addmm`` under torch.export and as ``torch.addmm`` under symbolic tracing. Its
channels are free, its weight is sliced along the right dims, its FLOPs are what FlopCounterMode counts, its
``nf`` is restated on write-back, and GPT-2's tied embedding and output head stay one tensor. GPT-2's query, key
and value come from one ``split(self.split_size)``, which stays one size where the pieces keep equal widths.

GPT-2's attention heads are not asserted on here (their rule is tested with the attention rules).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmorph
from fxmorph.analysis import ChannelGraph
from fxmorph.analysis.cost import CostModel
from fxmorph.analysis.ops import module_facts
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from fxmorph.testing import masked_reference, random_plan
from tests.conftest import _run_float64_in_place, assert_close_trees, check_prune, written_back

VOCAB, HIDDEN, MLP = 128, 64, 256


def _group_of(cg: ChannelGraph, name: str, dim: int) -> Any:
    """The group whose channels index dim ``dim`` of parameter ``name``."""
    return next(g for g in cg.groups if any(m.name == name and m.dim == dim for m in g.params))


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, VOCAB, (1, 16))


@pytest.fixture(scope="module")
def shrunk(gpt2: tuple[nn.Module, torch.Tensor]) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    """GPT-2 shrunk to half its FLOPs through export, with its state before the call."""
    model, ids = gpt2
    before = copy.deepcopy(model.state_dict())
    small, report = fxmorph.shrink(model, "50%", (ids,), capture="export", round_to=1, return_report=True)
    return small, report, before


def test_gpt2_shrinks_through_export_to_half_and_comes_back_as_its_class(
    gpt2: tuple[nn.Module, torch.Tensor], shrunk: tuple[nn.Module, Any, dict[str, torch.Tensor]]
) -> None:
    model, ids = gpt2
    small, report, _ = shrunk
    assert report.capture == "export"
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert fxmorph.count_flops(small, (ids,)) == report.flops_after  # what FlopCounterMode counts
    assert type(small) is type(model), report.delivery
    hidden = small.transformer.wte.weight.shape[1]
    for block in small.transformer.h:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        # weights (in, out), sliced along both dims; nf (read by the forward) and nx restated
        assert fc.nf < MLP and fc.weight.shape == (hidden, fc.nf) and fc.bias.shape == (fc.nf,)
        assert proj.weight.shape == (fc.nf, hidden) and proj.bias.shape == (hidden,)
        assert (fc.nx, proj.nx, proj.nf) == (hidden, fc.nf, hidden)
    with torch.no_grad():
        assert small(ids).logits.shape == model(ids).logits.shape == (1, 16, VOCAB)
    assert small.generate(ids[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 6)


def test_gpt2_tied_embedding_and_head_stay_one_tensor(
    gpt2: tuple[nn.Module, torch.Tensor], shrunk: tuple[nn.Module, Any, dict[str, torch.Tensor]]
) -> None:
    model, _ = gpt2
    small, _, _ = shrunk
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.lm_head.weight.shape[0] == VOCAB  # the vocabulary (token ids, logits) keeps its width
    assert small.lm_head.in_features == small.transformer.wte.embedding_dim == small.lm_head.weight.shape[1]
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_the_users_model_is_unchanged(
    gpt2: tuple[nn.Module, torch.Tensor], shrunk: tuple[nn.Module, Any, dict[str, torch.Tensor]]
) -> None:
    model, _ = gpt2
    _, _, before = shrunk
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for block in model.transformer.h:
        assert (block.mlp.c_fc.nf, block.mlp.c_fc.nx, block.attn.c_attn.nf) == (MLP, HIDDEN, 3 * HIDDEN)
        assert block.attn.split_size == HIDDEN


def test_gpt2_conv1d_channels_are_free_and_obey_the_mask_oracle(gpt2: tuple[nn.Module, torch.Tensor]) -> None:
    model, ids = gpt2
    cg = fxmorph.analyze(model, (ids,), capture="export")
    assert CostModel(cg).flops() == fxmorph.count_flops(model, (ids,))
    for i in range(2):
        mlp = _group_of(cg, f"transformer.h.{i}.mlp.c_fc.weight", 1)
        assert mlp.size == MLP and not mlp.pins, mlp.pins
        # the bias and the next layer's input rows are the same channels
        assert {(m.name, m.dim) for m in mlp.params} >= {
            (f"transformer.h.{i}.mlp.c_fc.bias", 0),
            (f"transformer.h.{i}.mlp.c_proj.weight", 0),
        }
    # the residual stream: the embedding's columns, each Conv1D's input rows and the tied head's columns
    hidden = _group_of(cg, "transformer.h.0.mlp.c_fc.weight", 0)
    assert hidden is _group_of(cg, "transformer.wte.weight", 1) and not hidden.pins, hidden.pins
    plan = random_plan(cg, seed=0)  # every free group loses 30 to 70% of its channels
    small = fxmorph.resize(cg, plan, keep_class=False)
    fxmorph.check(small, (ids,))
    assert small.meta["fxmorph.flops"] == CostModel(cg).flops({g: p.width for g, p in plan.items()})
    assert small.meta["fxmorph.flops"] == fxmorph.count_flops(small, (ids,))
    expected = masked_reference(cg, plan, ids)
    assert_close_trees(_run_float64_in_place(small, ids), expected, what="mask oracle")


# -- symbolic tracing: a Conv1D-style module -----------------------------------------------------------
class Conv1DStyle(nn.Module):
    """GPT-2's Conv1D, its sizes written out: ``torch.addmm`` with a weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return rows.view(x.size(0), x.size(1), self.nf)


class Mlp(nn.Module):
    """A transformer MLP of two Conv1D-style layers, a residual and a head."""

    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.c_fc, self.c_proj = Conv1DStyle(hidden, width), Conv1DStyle(width, hidden)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(h + self.c_proj(F.gelu(self.c_fc(h))))


def test_addmm_under_symbolic_tracing_frees_the_channels_and_restates_nf() -> None:
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(2, 5, 16)
    cg = fxmorph.analyze(model, (x,), capture="fx")
    inner = _group_of(cg, "c_fc.weight", 1)
    assert not inner.pins and {(m.name, m.dim) for m in inner.params} == {
        ("c_fc.weight", 1), ("c_fc.bias", 0), ("c_proj.weight", 0),
    }  # fmt: skip
    residual = _group_of(cg, "c_fc.weight", 0)
    assert not residual.pins and residual is _group_of(cg, "c_proj.weight", 1) is _group_of(cg, "inp.weight", 0)
    assert CostModel(cg).flops() == fxmorph.count_flops(model, (x,))
    for seed in range(2):  # mask oracle, FLOPs counted, and written back into Mlp (nf set)
        check_prune(cg, random_plan(cg, seed=seed), x)
    small = fxmorph.shrink(model, "50%", (x,), capture="fx", round_to=1)
    assert type(small) is Mlp
    for layer in (small.c_fc, small.c_proj):
        assert layer.nf == layer.weight.shape[1]  # found by write-back's search (nx, never read, is left alone)
    assert small.c_fc.nf < 64 and small(x).shape == (2, 5, 4)


class SplitBySize(nn.Module):
    """GPT-2's query/key/value split: one split size, read from an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.split_size = nn.Linear(6, 24), 8
        self.out = nn.ModuleList(nn.Linear(8, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.split_size, dim=-1)
        return self.out[0](q) + self.out[1](k) + self.out[2](v)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_split_by_one_size_stays_one_size_where_the_pieces_keep_equal_widths(capture: str) -> None:
    torch.manual_seed(0)
    model, x = SplitBySize().eval(), torch.randn(2, 6)
    cg = fxmorph.analyze(model, (x,), capture=capture)
    pieces = [g for g in cg.free_groups if any(m.name == "qkv.weight" for m in g.params)]
    assert len(pieces) == 3
    small = check_prune(cg, WidthPlan({g.id: GroupPlan(tuple(range(5))) for g in pieces}), x)
    assert written_back(cg, small).split_size == 5  # type: ignore[union-attr]


def test_transformers_conv1d_states_its_sizes_in_the_op_table() -> None:
    """Keyed by name (fxmorph does not import transformers): write-back restates nf and nx from the weight."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(24, 8)
    facts = module_facts(type(layer))
    assert facts is not None
    layer.weight = nn.Parameter(layer.weight[:5, :7].detach())
    assert {a.name: a.value(layer) for a in facts.shape_attrs} == {"nf": 7, "nx": 5}


def test_transformers_conv1d_under_symbolic_tracing() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.c_fc, self.c_proj = nn.Linear(16, 16), pytorch_utils.Conv1D(64, 16), nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(F.gelu(self.c_fc(self.inp(x))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 16)
    # symbolic tracing sees ``x.view(x.size()[:-1] + (self.nf,))``: one tuple built in the forward, whose nf cannot
    # be rewritten, so Conv1D's output keeps its width (pinned, with the reason) and the rest still shrinks
    cg = fxmorph.analyze(model, (x,), capture="fx")
    pinned = [g for g in cg.groups if g.size == 64 and g.pins]
    assert pinned and "cannot be located" in str(pinned[0].pins[0])
    small = fxmorph.shrink(model, "80%", (x,), capture="fx", round_to=1)
    assert type(small) is Net and small.c_fc.nf == small.c_fc.weight.shape[1] == 64
    assert small.inp.out_features < 16
