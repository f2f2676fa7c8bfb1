"""Hugging Face configs that state a shrunk model (issue 16): with ``uniform_blocks``, the groups one config field
sizes keep one width (BERT's ``hidden_size`` sizes its residual stream and, through the head width it derives, its
heads), so ``save_pretrained``/``from_pretrained`` rebuilds the result; a tensor the trace never reads pins the
channels its field sizes (Wav2Vec2's ``masked_spec_embed``), so the result still trains."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fxmorph
from fxmorph.analysis.cost import CostModel
from fxmorph.capture.config_sizes import config_sizes
from fxmorph.errors import WriteBackWarning
from fxmorph.passes.uniform import same_role_classes
from tests.test_hf_transformers import whisper

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))


def _bert() -> tuple[nn.Module, tuple[Any, ...]]:
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config), (IDS,)


def _vit() -> tuple[nn.Module, tuple[Any, ...]]:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config), (torch.randn(1, 3, 32, 32),)


def _gpt2() -> tuple[nn.Module, tuple[Any, ...]]:
    # n_inner unset: the MLP is 4 * n_embd wide, so one field sizes the stream, the heads and the MLP
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=8, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config), (IDS,)


def _wav2vec2(**overrides: Any) -> tuple[nn.Module, tuple[Any, ...]]:
    config = transformers.Wav2Vec2Config(**{
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4, **overrides,
    })  # fmt: skip
    return transformers.Wav2Vec2ForSequenceClassification(config), (torch.randn(1, 400),)


def _built(make: Callable[[], tuple[nn.Module, tuple[Any, ...]]]) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    model, inputs = make()
    return model.eval(), inputs


def _logits(model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits


def _reloaded(model: nn.Module) -> nn.Module:
    """``model`` saved and loaded back by its class. The loaded tensors are copied into memory of their own: a
    memory-mapped tensor's alignment can change a matmul's summation order in the last bit (ViT: 1.5e-8)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = type(model).from_pretrained(folder).eval()
    for p in loaded.parameters():
        p.data = p.data.clone()
    return loaded


def test_config_sizes_name_the_fields_that_size_each_dim() -> None:
    model, _ = _built(_bert)
    sizes = config_sizes(model)
    assert sizes is not None and sizes.class_name == "BertForSequenceClassification"
    # BERT derives its head width from hidden_size / num_attention_heads: hidden_size sizes the heads too
    assert sizes.fields_of("bert.encoder.layer.0.attention.self.query.weight", 0) == {"hidden_size"}
    assert sizes.fields_of("bert.embeddings.word_embeddings.weight", 1) == {"hidden_size"}
    assert sizes.fields_of("bert.encoder.layer.1.intermediate.dense.weight", 0) == {"intermediate_size"}
    assert sizes.fields_of("classifier.weight", 0) == frozenset()  # num_labels is not an integer field
    assert not sizes.unread
    assert config_sizes(nn.Linear(2, 2)) is None  # no config, nothing probed


def test_the_stream_and_the_heads_one_field_sizes_are_one_unit_in_proportion() -> None:
    model, inputs = _built(_bert)
    cg = fxmorph.analyze(model, inputs)
    cost = CostModel(cg)
    classes = same_role_classes(cg)
    heads = [g.id for g in cg.free_groups if g.span == 16]
    stream = [c for c in classes if set(heads) <= set(c)]
    assert len(stream) == 1 and len(stream[0]) > len(heads)  # the heads of both layers, with the stream
    tied = cost.tied(classes)
    unit = int(tied.unit_of[heads[0]])
    assert tied.sizes[unit] == 4 and tied.spans[unit] == 16  # the unit counts heads
    assert {int(tied.ratio[g]) for g in stream[0]} == {1, 16}  # a head, or 16 channels of the stream
    rng = np.random.default_rng(0)
    for _ in range(5):
        units = rng.integers(1, tied.sizes + 1)
        assert tied.flops(units) == cost.flops(tied.expand(units))
        assert tied.params(units) == cost.params(tied.expand(units))


FAMILIES = {"bert": _bert, "vit": _vit, "gpt2": _gpt2, "wav2vec2": lambda: _wav2vec2(mask_time_prob=0.0)}


@pytest.mark.parametrize("family", FAMILIES)
def test_with_uniform_blocks_the_config_states_the_result_and_from_pretrained_rebuilds_it(family: str) -> None:
    model, inputs = _built(FAMILIES[family])
    before = model.config.to_dict()
    small, report = fxmorph.shrink(model, "50%", inputs, round_to=1, uniform_blocks=True, return_report=True)
    assert type(small) is type(model) and report.delivery.config_note is None, report.delivery
    assert report.flops_after <= report.budget_flops
    if family != "gpt2":  # GPT-2's one field moves its stream, heads and MLP in steps of a head (1/8 of each)
        assert 0.99 * report.budget_flops <= report.flops_after
    changed = {line.split(":")[0] for line in report.delivery.config}
    hidden = "n_embd" if family == "gpt2" else "hidden_size"
    assert hidden in changed, report.delivery.config  # the stream shrank, and with it the heads it sizes
    assert model.config.to_dict() == before  # the user's config is untouched
    loaded = _reloaded(small)
    assert torch.equal(_logits(loaded, inputs), _logits(small, inputs))


def test_a_tensor_the_trace_never_reads_pins_the_channels_its_field_sizes() -> None:
    # Wav2Vec2's masked_spec_embed (hidden_size wide) is read only by SpecAugment's masking, in train mode
    model, inputs = _built(_wav2vec2)
    cg = fxmorph.analyze(model, inputs)
    assert cg.gm.meta["fxmorph.config_sizes"].unread == {"hidden_size": "wav2vec2.masked_spec_embed"}
    by_param = {m.name: g for g in cg.groups for m in g.params if m.dim == 0}
    for name in ("wav2vec2.feature_projection.projection.weight", "wav2vec2.encoder.layers.0.attention.q_proj.weight"):
        assert any("masked_spec_embed" in pin.reason for pin in by_param[name].pins), name  # stream, heads
    assert not by_param["wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"].pins
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WriteBackWarning)  # the two layers' MLPs kept different widths
        small = fxmorph.shrink(model, "60%", inputs, round_to=1)
    assert small.wav2vec2.masked_spec_embed.shape == (small.config.hidden_size,) == (32,)
    assert small.wav2vec2.encoder.layers[0].feed_forward.intermediate_dense.out_features < 64
    small.train()  # masks 10-frame spans of a 20-frame clip (two at least) with masked_spec_embed
    assert small(torch.randn(2, 4000)).logits.shape == (2, 2)


def test_a_field_that_also_sizes_a_pinned_stream_keeps_the_heads_it_sizes() -> None:
    # Whisper derives its head width from d_model, and its encoder's output (a model output) is d_model wide:
    # under uniform_blocks the heads keep their count and only the MLPs, which their own fields size, shrink
    model, inputs = whisper()
    small, report = fxmorph.shrink(model, "80%", inputs, round_to=1, uniform_blocks=True, return_report=True)
    assert type(small) is type(model) and report.delivery.config_note is None, report.delivery
    assert small.config.encoder_ffn_dim < 128 and small.model.encoder.layers[0].self_attn.q_proj.out_features == 64
    assert torch.equal(_logits(_reloaded(small), inputs), _logits(small, inputs))
