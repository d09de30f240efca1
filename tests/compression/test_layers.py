"""ShortGPT layer removal: Block Influence by hand, removal keeps a working (and reloadable) model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from deltatune.compression.layers import (
    block_influence,
    cosine_sums,
    find_blocks,
    influence_from_states,
    layers_to_remove,
    remove_layers,
    shortgpt,
)


def llama(n_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def make_identity(model: LlamaForCausalLM, index: int) -> None:
    """Zero the two residual-branch outputs of block `index`, so it returns its input unchanged."""
    block = model.model.layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


# --- Block Influence -------------------------------------------------------------------------------
def test_block_influence_of_a_hand_made_state_sequence():
    x0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, T=2, D=2)
    x1 = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])  # cos with x0: 1 and 1/sqrt(2)
    x2 = torch.tensor([[[0.0, 3.0], [-1.0, -1.0]]])  # cos with x1: 0 and -1
    assert influence_from_states([x0, x1, x2]) == pytest.approx([1 - (1 + 1 / math.sqrt(2)) / 2, 1 - (-1 / 2)])
    # a masked token does not count: only the first token is left
    assert influence_from_states([x0, x1, x2], torch.tensor([[1, 0]])) == pytest.approx([0.0, 1.0])
    assert cosine_sums(x0, x1, torch.tensor([[0, 1]])) == pytest.approx((1 / math.sqrt(2), 1))


def test_block_influence_reads_each_block_input_and_output_over_real_tokens(batch):
    model = llama()
    model.model.norm = torch.nn.Identity()  # then hidden_states[-1] is the last block's raw output
    states = model(**batch, output_hidden_states=True).hidden_states
    expected = influence_from_states(states, batch["attention_mask"])
    assert block_influence(model, [batch]) == pytest.approx(expected, abs=1e-6)
    # padding excluded: counting every token gives other numbers
    assert influence_from_states(states) != pytest.approx(expected, abs=1e-6)


def test_block_influence_is_token_weighted_over_batches(batch):
    model = llama()
    first = {k: v[:1] for k, v in batch.items()}
    second = {k: v[1:] for k, v in batch.items()}
    assert block_influence(model, [first, second]) == pytest.approx(block_influence(model, [batch]), abs=1e-6)


def test_an_identity_block_has_zero_influence_and_shortgpt_removes_it(batch):
    model = llama()
    make_identity(model, 2)
    influence = block_influence(model, [batch])
    assert influence[2] == pytest.approx(0.0, abs=1e-6) and min(influence[:2] + influence[3:]) > 1e-4
    result = shortgpt(model, [batch], 1)
    assert result.removed == [2] and len(model.model.layers) == 3


# --- removal ---------------------------------------------------------------------------------------
def test_find_blocks_finds_the_block_list_of_llama_and_bert(make_minilm):
    path, blocks = find_blocks(llama())
    assert path == "model.layers" and len(blocks) == 4
    path, blocks = find_blocks(make_minilm())
    assert path == "bert.encoder.layer" and len(blocks) == 6
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_blocks(torch.nn.Linear(2, 2))


def test_removing_identity_blocks_keeps_the_function_and_the_kv_cache_working(batch, tmp_path):
    model = llama()
    make_identity(model, 1)
    make_identity(model, 3)
    reference = model(**batch).logits
    assert remove_layers(model, [3, 1]) == [1, 3]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1]
    assert_close(model(**batch).logits, reference)  # identity blocks contribute nothing
    prompt = batch["input_ids"][:1, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(reloaded.model.layers) == 2 and reloaded.config.num_hidden_layers == 2
    assert_close(reloaded(**batch).logits, reference)


def test_per_layer_config_lists_follow_the_removed_layers():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg.sliding_window = 4
    model = Qwen2ForCausalLM(cfg).eval()
    remove_layers(model, [0, 3])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False))


def test_bert_layers_are_removed_too(make_minilm, minilm_batch):
    model = make_minilm()
    remove_layers(model, [0, 5])
    assert model.config.num_hidden_layers == 4 and len(model.bert.encoder.layer) == 4
    assert model(**minilm_batch).logits.shape == (4, 2)


@pytest.mark.parametrize(
    ("indices", "message"), [([4], "out of range"), ([-1], "out of range"), ([0, 1, 2, 3], "keep at least one")]
)
def test_bad_indices_are_refused(indices, message):
    with pytest.raises(ValueError, match=message):
        remove_layers(llama(), indices)


def test_how_many_layers_to_remove():
    assert layers_to_remove(30, 4, None) == 4
    assert layers_to_remove(30, None, 0.25) == 8  # round(7.5) is 8
    for n, fraction in ((None, None), (2, 0.1), (30, None), (None, 1.0), (None, 0.01)):
        with pytest.raises(ValueError):
            layers_to_remove(30, n, fraction)


# --- the real model ----------------------------------------------------------------------------------
def test_shortgpt_on_smollm2_removes_layers_and_still_generates(tmp_path):
    from transformers import AutoTokenizer

    from deltatune import assets

    path = assets.smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(["The capital of France is Paris.", "Water boils at 100 degrees."],
                           padding=True, return_tensors="pt"))
    result = shortgpt(model, [batch], 3)
    assert len(result.influence) == 30 and len(result.removed) == 3
    # the removed blocks are the three with the lowest influence
    assert sorted(result.removed) == sorted(sorted(range(30), key=result.influence.__getitem__)[:3])
    assert model.config.num_hidden_layers == 27
    prompt = tokenizer("Hello, my name is", return_tensors="pt")["input_ids"]
    cached = model.generate(prompt, max_new_tokens=3, do_sample=False)  # greedy, with a KV cache
    # one uncached forward over the same tokens predicts each generated token from the ones before it
    predicted = model(cached[:, :-1], use_cache=False).logits.argmax(-1)[:, prompt.shape[1] - 1 :]
    assert torch.equal(predicted, cached[:, prompt.shape[1] :])
