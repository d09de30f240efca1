"""Prompt tuning and prefix tuning against the real peft 0.21: files both ways (same weights), same logits, same
greedy tokens on SmolLM2-135M; same logits on MiniLM sequence classification (its head in modules_to_save).

peft 0.21.2 on transformers 5.24 drops a prefix inside generate() (its prepare_inputs_for_generation looks for
`past_key_values`, which transformers now calls `cache`: PEFT's tokens equal the base model's), and cannot run
prefix tuning on BERT at all ("Model does not support past key values"); so prefix tokens are compared with a
greedy loop over PEFT's forward, whose logits are right, and MiniLM prefix parity is left out."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from test_prompt import _smollm2, greedy_loop, lm_batch, randomise, smollm2  # noqa: F401  (fixtures)

import deltatune as dt

peft = pytest.importorskip("peft")


def peft_model(model, config):
    torch.manual_seed(0)
    return peft.get_peft_model(model, config).eval()


def perturb_peft(pm) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_prompt_tuning_matches_peft_both_ways_on_smollm2(smollm2, lm_batch, tmp_path):  # noqa: F811
    pm = peft_model(copy.deepcopy(smollm2), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(0.05)  # PEFT's N(0, 1) makes the LM babble
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(copy.deepcopy(smollm2), tmp_path / "peft")
    assert torch.equal(dm.prompts["default"].prompt_embeddings, pm.prompt_encoder["default"].embedding.weight)
    with torch.no_grad():
        assert_close(dm(**lm_batch).logits, pm(**lm_batch).logits)
        want = pm.generate(**lm_batch, max_new_tokens=4, do_sample=False)
        assert torch.equal(dm.generate(**lm_batch, max_new_tokens=4, do_sample=False), want)
        length = lm_batch["input_ids"].shape[1] + 2  # a total length counts the real tokens only, as in PEFT
        assert torch.equal(dm.generate(**lm_batch, max_length=length, do_sample=False), want[:, :length])
    dm.export_peft(tmp_path / "ours")  # and back: PEFT loads ours
    back = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(back.prompt_encoder["default"].embedding.weight, dm.prompts["default"].prompt_embeddings)
        assert_close(back(**lm_batch).logits, dm(**lm_batch).logits)


@pytest.mark.parametrize("projection", [True, False], ids=["prefix_tuning", "p_tuning_v2"])
def test_prefix_tuning_matches_peft_both_ways_on_smollm2(smollm2, lm_batch, tmp_path, projection):  # noqa: F811
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                     encoder_hidden_size=16)
    pm = peft_model(copy.deepcopy(smollm2), config)
    perturb_peft(pm)
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(copy.deepcopy(smollm2), tmp_path / "peft")
    assert dm.adapters["default"].method == ("prefix_tuning" if projection else "p_tuning_v2")
    assert torch.equal(dm.prompts["default"].prefix_embedding, pm.get_prompt_embedding_to_save("default"))
    with torch.no_grad():
        assert_close(dm(**lm_batch).logits, pm(**lm_batch).logits)
        assert torch.equal(dm.generate(**lm_batch, max_new_tokens=4, do_sample=False), greedy_loop(pm, lm_batch, 4))
    dm.export_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(**lm_batch).logits, dm(**lm_batch).logits)


def test_unfolded_prefix_tuning_exports_its_mlp_output(smollm2, lm_batch, tmp_path):  # noqa: F811
    dm = dt.inject(smollm2, dt.make_config("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=16))
    dm.export_peft(tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(dm.model), tmp_path).eval()
    with torch.no_grad():
        assert_close(back(**lm_batch).logits, dm(**lm_batch).logits)


def test_prompt_tuning_matches_peft_on_minilm_classification(make_minilm, minilm_batch, tmp_path):
    pm = peft_model(make_minilm(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    perturb_peft(pm)
    with torch.no_grad():
        pm.base_model.classifier.modules_to_save["default"].weight.add_(0.5)  # a trained head
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(make_minilm(), tmp_path / "peft")
    assert dm.adapters["default"].train_modules == ["classifier"]
    with torch.no_grad():
        assert_close(dm(**minilm_batch).logits, pm(**minilm_batch).logits)
    dm.export_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(**minilm_batch).logits, dm(**minilm_batch).logits)
