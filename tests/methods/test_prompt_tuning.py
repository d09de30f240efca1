"""prompt_tuning's initialisations (PEFT's PromptEmbedding rules) on MiniLM's real vocabulary."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt


def prompt_of(model, **options) -> torch.Tensor:
    return dt.inject(model, dt.make_config("prompt_tuning", **options)).prompts["default"].prompt_embeddings


def test_token_ids_are_repeated_then_cut_to_l(make_minilm):
    model = make_minilm()
    E = model.get_input_embeddings().weight
    got = prompt_of(model, num_virtual_tokens=5, init="text", init_token_ids=[101, 2023, 102])
    assert torch.equal(got, E[[101, 2023, 102, 101, 2023]])
    got = prompt_of(make_minilm(), num_virtual_tokens=2, init="text", init_token_ids=[7, 8, 9])
    assert torch.equal(got, E[[7, 8]])


def test_text_init_is_peft_s(make_minilm):
    peft = pytest.importorskip("peft")
    from deltatune import assets

    path, text = str(assets.minilm_path()), "Classify the sentiment of this review"
    ours = prompt_of(make_minilm(), num_virtual_tokens=12, init="text", init_text=text, tokenizer=path)
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=12, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=text, tokenizer_name_or_path=path)
    theirs = peft.get_peft_model(make_minilm(), config).prompt_encoder["default"].embedding.weight
    assert torch.equal(ours, theirs)


def test_sample_vocab_rows_are_vocabulary_embeddings_and_random_is_standard_normal(make_minilm):
    model = make_minilm()
    E = model.get_input_embeddings().weight
    got = prompt_of(model, num_virtual_tokens=6, init="sample_vocab")
    assert all((E == row).all(1).any() for row in got)
    rand = prompt_of(make_minilm(), num_virtual_tokens=200, init="random")
    assert 0.9 < rand.std().item() < 1.1 and abs(rand.mean().item()) < 0.05  # N(0, 1) over 76,800 draws
