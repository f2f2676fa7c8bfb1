"""Results come back as the user's own class, proven equal to the graph surgery made (``keep_class``).

The zoo and the generated architectures check write-back through ``tests.conftest.check_prune`` and
``check_grow`` (the user's class, bit-identical to the graph result, mask oracle); this file covers what
users rely on beyond that: the class's methods, saving, copying and training the result, aliases and
modules called twice, widths held in attributes, and the fallback when ``forward`` writes a width in its
source.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import fxmorph
from fxmorph.meta import REPORT_KEY
from fxmorph.testing import random_plan
from tests.conftest import SmallNet, assert_same_outputs, check_prune

X = torch.randn(2, 3, 8, 8)


class HardCoded(nn.Module):
    """Flattens with a width written in the source: no attribute can carry the new width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.fc(h.view(-1, 1024))  # the width, hard-coded


_lines, _first = inspect.getsourcelines(HardCoded)
HARD_CODED = f"test_write_back.py:{_first + next(i for i, s in enumerate(_lines) if '1024)' in s)}: `return self.fc("


class Described(nn.Module):
    """Reads its width from an attribute (``self.width * 64``), calls one block twice, uses a parameter
    directly, holds a module under two names, and has a method of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 16
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.alias = self.block  # the same module under a second name
        self.scale = nn.Parameter(torch.ones(1, 16, 1, 1))
        self.fc = nn.Linear(16 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(F.relu(self.stem(x)))
        h = self.alias(h) * self.scale  # the block again, then the parameter used directly
        return self.fc(h.reshape(x.shape[0], self.width * 64))

    def describe(self) -> str:
        return f"Described of width {self.width}"


def _graph_result(model: nn.Module, budget: float = 0.5, **kw: object) -> nn.Module:
    return fxmorph.shrink(model, budget, (X,), round_to=1, keep_class=False, **kw)


def test_the_users_class_comes_back_with_its_methods_and_attributes() -> None:
    torch.manual_seed(0)
    model = Described().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxmorph.shrink(model, 0.5, (X,), round_to=1)
    assert type(small) is Described and small is not model
    assert small.width < 16 and small.describe() == f"Described of width {small.width}"
    assert small.alias is small.block  # one module under two names stays one
    assert small.fc.in_features == small.width * 64 and small.stem.out_channels == small.width
    delivery = fxmorph.metadata(small)[REPORT_KEY].delivery
    assert delivery.kept_class and delivery.attributes == (f"width: 16 -> {small.width}",)
    graph = _graph_result(model)
    assert isinstance(graph, fx.GraphModule)
    with torch.no_grad():
        assert_same_outputs(small(X), graph(X), "user's class vs graph")
    # the user's model is as it was
    assert model.width == 16 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_result_saves_copies_and_trains() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    small = fxmorph.shrink(model, 0.5, (x,))
    assert type(small) is torchvision.models.ResNet
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole-module pickle: the user's class, no generated code
    twin = copy.deepcopy(small)
    with torch.no_grad():
        assert_same_outputs(loaded(x), small(x), "pickled and loaded")
        assert_same_outputs(twin(x), small(x), "deep copy")
    small.train()
    small(x).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())


def test_a_width_written_in_the_source_falls_back_with_a_warning_naming_the_line() -> None:
    torch.manual_seed(0)
    model = HardCoded().eval()
    with pytest.warns(fxmorph.WriteBackWarning) as warned:
        small = fxmorph.shrink(model, 0.5, (X,), round_to=1)
    assert HARD_CODED in str(warned[0].message)
    assert isinstance(small, fx.GraphModule)
    delivery = fxmorph.metadata(small)[REPORT_KEY].delivery
    assert not delivery.kept_class and "1024" in delivery.reason
    with pytest.raises(fxmorph.WriteBackError, match="1024") as raised:
        fxmorph.shrink(model, 0.5, (X,), round_to=1, keep_class=True)
    assert raised.value.line is not None and HARD_CODED in raised.value.line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keep_class=False: the GraphModule, without a word
        assert isinstance(fxmorph.shrink(model, 0.5, (X,), round_to=1, keep_class=False), fx.GraphModule)


def test_keep_class_must_be_a_bool_or_none() -> None:
    with pytest.raises(fxmorph.InputError, match="keep_class"):
        fxmorph.shrink(SmallNet().eval(), 0.5, (X,), keep_class="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", ["grow", "resize", "load"])
def test_every_entry_point_gives_the_class_back(entry: str, tmp_path: object) -> None:
    torch.manual_seed(0)
    model = Described().eval()
    if entry == "grow":
        result = fxmorph.grow(model, (X,), budget_flops="150%", round_to=1)
        assert result.width > 16
    elif entry == "resize":
        cg = fxmorph.analyze(model, (X,))
        group = next(g for g in cg.free_groups if any(p.name == "fc.weight" for p in g.params))
        result = fxmorph.resize(cg, {group.id: fxmorph.GroupPlan(keep=tuple(range(0, group.size, 2)))})
        assert result.width == group.size // 2
    else:
        path = tmp_path / "small.fxm"  # type: ignore[operator]
        small = fxmorph.shrink(model, 0.5, (X,), round_to=1)
        fxmorph.save(small, path)
        result = fxmorph.load(path, Described().eval())
        with torch.no_grad():
            assert_same_outputs(result(X), small(X), "loaded vs saved")
    assert type(result) is Described
    with torch.no_grad():
        result(X)


class TinyLM(nn.Module):
    """A language model whose output head is its embedding (tied), as every Hugging Face causal LM has."""

    def __init__(self, vocab: int = 50, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.norm(h))


class TiedPair(nn.Module):
    """Two layers sharing one weight, applied one after the other: their channels must become one set."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.fc2b = nn.Linear(32, 32)
        self.fc2b.weight = self.fc2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2b(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def test_a_tied_embedding_and_head_shrink_and_stay_tied() -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    cg = fxmorph.analyze(model, (ids,))
    # the vocabulary rows: the head's are logits, the embedding's are token ids; one slice cannot serve both
    reasons = [pin.reason for group in cg.groups for pin in group.pins]
    assert "'head.weight' is tied to 'embed.weight', which does not index its dim 0 by channels" in reasons
    assert "'head.weight' is tied to 'embed.weight'" in cg.explain()
    check_prune(cg, random_plan(cg, seed=3), ids)  # mask oracle, and the written-back class equals the graph
    small = fxmorph.shrink(model, 0.5, (ids,), round_to=1)
    assert type(small) is TinyLM and small.head.weight is small.embed.weight
    assert small.embed.embedding_dim == small.norm.normalized_shape[0] < 32
    assert fxmorph.count_params(small) < fxmorph.count_params(model)
    assert model.head.weight is model.embed.weight and model.embed.weight.shape == (50, 32)  # the user's


def test_layers_sharing_a_weight_are_cut_alike() -> None:
    torch.manual_seed(0)
    model = TiedPair().eval()
    x = torch.randn(4, 8)
    cg = fxmorph.analyze(model, (x,))
    check_prune(cg, random_plan(cg, seed=1), x)
    small = fxmorph.shrink(model, 0.4, (x,), round_to=1)
    assert type(small) is TiedPair and small.fc2b.weight is small.fc2.weight
    assert small.fc1.out_features == small.fc2.out_features == small.fc2b.in_features < 32
