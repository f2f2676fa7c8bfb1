"""Hugging Face transformers built from small configs (no download), shrunk through torch.export: whole heads
(by key/value group under grouped-query attention), the user's class back with its config, generate(), and the
save_pretrained/from_pretrained round trip."""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import pytest
import torch

import fxmorph
from fxmorph.errors import WriteBackWarning
from fxmorph.testing import random_plan
from tests.conftest import check_prune

transformers = pytest.importorskip("transformers")


def _llama(**overrides: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides,
    })  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _ids(length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(1))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_llama_prunes_whole_key_value_groups_and_comes_back_as_its_class() -> None:
    model, ids = _llama(), _ids()
    before = _state(model)
    small, report = fxmorph.shrink(model, "50%", (ids,), round_to=1, return_report=True)
    assert report.capture == "export"
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    head = model.config.head_dim
    for layer in small.model.layers:
        attn = layer.self_attn
        # rotary embeddings read the head width: it stays, and heads go whole
        assert attn.q_proj.out_features % head == 0 and attn.k_proj.out_features % head == 0
        # each key/value head keeps its two query heads: a whole group goes, the model stays valid
        assert attn.q_proj.out_features == 2 * attn.k_proj.out_features == 2 * attn.v_proj.out_features
    assert any(layer.self_attn.k_proj.out_features < 32 for layer in small.model.layers), "no head was pruned"
    assert small.model.norm.weight.shape[0] < 64  # the residual stream, through RMSNorm, shrinks too
    out = small.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched


def test_llama_drops_whole_heads_under_the_default_rounding() -> None:
    # a key/value group of heads is 32 channels of k_proj and 64 of q_proj: a step of the grid of 16 on its own
    model, ids = _llama(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4), _ids()
    cg = fxmorph.analyze(model, (ids,))
    assert sorted({g.span for g in cg.free_groups}) == [1, 16]
    small = fxmorph.shrink(model, "30%", (ids,))
    kept = [layer.self_attn.k_proj.out_features for layer in small.model.layers]
    assert min(kept) < 64 and all(k % 16 == 0 for k in kept)


def test_llama_obeys_the_mask_oracle_on_its_captured_graph() -> None:
    model, ids = _llama(), _ids()
    cg = fxmorph.analyze(model, (ids,))
    # the residual stream (RMSNorm's mean over channels), the MLP and the key/value groups of heads are free
    assert sorted(g.size for g in cg.free_groups) == [2, 2, 64, 128, 128]
    for seed in range(2):
        check_prune(cg, random_plan(cg, seed=seed), ids)


def test_llama_with_uniform_blocks_saves_and_loads_back_the_same_model() -> None:
    model, ids = _llama(hidden_size=128, intermediate_size=256).train(), _ids()
    small, report = fxmorph.shrink(model, "50%", (ids,), uniform_blocks=True, round_to=16, return_report=True)
    assert type(small) is type(model) and report.delivery.config_note is None, report.delivery
    assert small.training and model.training  # checking the config left both in the mode the user chose
    small.eval()
    assert small.config.intermediate_size == small.model.layers[0].mlp.up_proj.out_features < 256
    assert model.config.intermediate_size == 256  # the user's config is untouched
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        loaded = type(model).from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small(ids).logits)


def test_a_config_that_cannot_state_the_result_is_left_with_a_warning() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_labels=10,
    )  # fmt: skip
    model, x = transformers.ViTForImageClassification(config).eval(), torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, report = fxmorph.shrink(model, "50%", (x,), round_to=1, return_report=True)
    assert type(small) is type(model)
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    # without uniform_blocks the layers keep widths of their own, which one config field cannot state
    assert report.delivery.config_note is not None and small.config.hidden_size == 64
    assert any(issubclass(w.category, WriteBackWarning) and "config left" in str(w.message) for w in caught)


def test_bert_heads_go_whole_and_obey_the_mask_oracle() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    model, ids = transformers.BertForSequenceClassification(config).eval(), _ids()
    cg = fxmorph.analyze(model, (ids,))
    heads = [g for g in cg.free_groups if g.size == 4]
    assert len(heads) == 2  # one group of whole heads per layer, shared by query, key and value
    # the position ids are a table of positions: the rows the example does not read stay
    assert all(g.pins for g in cg.groups if any("position_ids" in m.name for m in g.tensors))
    check_prune(cg, random_plan(cg, seed=0), ids)


def whisper() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A one-layer Whisper (d_model 64, 4 heads) and its inputs: features, no mask, decoder ids."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config).eval(), (torch.randn(1, 16, 64), None, _ids(6))


def test_an_encoder_decoder_whisper_shrinks_and_comes_back_as_its_class() -> None:
    model, inputs = whisper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WriteBackWarning)  # its config cannot state per-layer head counts
        small, report = fxmorph.shrink(model, "50%", inputs, round_to=1, return_report=True)
    assert 0.99 * report.budget_flops <= report.flops_after <= report.budget_flops
    assert type(small) is type(model), report.delivery
    # whole heads: every attention's head count was set, its head width kept
    for attn in (small.model.encoder.layers[0].self_attn, small.model.decoder.layers[0].encoder_attn):
        assert attn.num_heads * attn.head_dim == attn.q_proj.out_features and attn.head_dim == 16
    with torch.no_grad():
        assert small(*inputs).logits.shape == model(*inputs).logits.shape
