"""Model-level (prompt) deltas through the engine, on real models: SmolLM2-135M (causal LM, GQA) and MiniLM
(sequence classification). Each output is checked against the base model run by hand, the row alone, or the
delta's defining property; PEFT parity lives in test_prompt_peft.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close

import deltatune as dt
from deltatune.engine.prompt import PROMPT

PROMPTS = ["Hello, my name is", "The capital of France is Paris, and"]  # the first row left-padded


@pytest.fixture(scope="session")
def _smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune import assets

    path = assets.smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


@pytest.fixture
def smollm2(_smollm2):
    return copy.deepcopy(_smollm2[0])


@pytest.fixture(scope="session")
def lm_batch(_smollm2):
    tok = _smollm2[1]
    tok.padding_side = "left"
    return dict(tok(PROMPTS, padding=True, return_tensors="pt"))


def randomise(dm, name: str = "default", seed: int = 0) -> None:
    """Trained-looking prompt parameters (the init of some is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.prompts[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def greedy_loop(dm, batch: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache), positions as generate() counts them (from the mask)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = dm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


# --- defining properties -------------------------------------------------------------------------------
def test_prompt_tuning_is_the_base_model_on_concatenated_embeddings(smollm2, lm_batch):
    base = copy.deepcopy(smollm2)
    dm = dt.inject(smollm2, dt.make_config("prompt_tuning", num_virtual_tokens=5))
    labels = lm_batch["input_ids"].masked_fill(lm_batch["attention_mask"] == 0, -100)
    out = dm(**lm_batch, labels=labels)
    E = dm.prompts["default"].prompt_embeddings
    embeds = torch.cat([E[None].expand(2, -1, -1), base.get_input_embeddings()(lm_batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, 5, dtype=torch.long), lm_batch["attention_mask"]], 1)
    ref = base(inputs_embeds=embeds, attention_mask=mask, labels=torch.cat([torch.full((2, 5), -100), labels], 1))
    assert out.logits.shape == (2, 5 + lm_batch["input_ids"].shape[1], base.config.vocab_size)  # virtual kept, as PEFT
    assert_close(out.logits, ref.logits)
    assert_close(out.loss, ref.loss)


def test_prefix_is_the_base_model_with_its_keys_and_values_cached(smollm2, lm_batch):
    from transformers import DynamicCache

    base = copy.deepcopy(smollm2)
    dm = dt.inject(smollm2, dt.make_config("p_tuning_v2", num_virtual_tokens=3))
    randomise(dm)
    P = dm.prompts["default"].prefix_embedding.view(3, 2 * 30, 3, 64)  # (l, 2L, kv_heads, head_dim): PEFT's layout
    kv = [(P[:, 2 * i].transpose(0, 1)[None].expand(2, -1, -1, -1), P[:, 2 * i + 1].transpose(0, 1)[None].expand(2, -1, -1, -1))
          for i in range(30)]
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), lm_batch["attention_mask"]], 1)
    ref = base(input_ids=lm_batch["input_ids"], attention_mask=mask, cache=DynamicCache(kv)).logits
    out = dm(**lm_batch).logits
    assert out.shape == ref.shape == (2, lm_batch["input_ids"].shape[1], base.config.vocab_size)
    assert_close(out, ref)
    with dm.disabled():
        assert_close(dm(**lm_batch).logits, base(**lm_batch).logits)


def test_prefix_on_minilm_is_attention_over_its_keys_and_values(make_minilm, minilm_batch):
    """By hand, without a Cache: an attention function that puts each layer's prefix before the keys and values
    (and unmasks it); real tokens at positions l.., as BERT counts them after a cache of l entries."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    dm = dt.inject(make_minilm(), dt.make_config("p_tuning_v2", num_virtual_tokens=3))
    randomise(dm)
    B, T = minilm_batch["input_ids"].shape
    kv = dm.prompts["default"].kv_prefix(B)

    def with_prefix(module, query, key, value, attention_mask, **kwargs):
        k, v = kv[module.layer_idx]
        attention_mask = torch.cat([attention_mask.new_ones(*attention_mask.shape[:-1], 3), attention_mask], -1)
        return sdpa_attention_forward(module, query, torch.cat([k, key], 2), torch.cat([v, value], 2),
                                      attention_mask, **kwargs)

    AttentionInterface.register("test_prefix", with_prefix)
    AttentionMaskInterface.register("test_prefix", sdpa_mask)
    ref = make_minilm()
    ref.set_attn_implementation("test_prefix")
    positions = torch.arange(3, 3 + T)[None].expand(B, -1)
    assert_close(dm(**minilm_batch).logits, ref(**minilm_batch, position_ids=positions).logits)


@pytest.mark.parametrize("method,count", [
    ("prompt_tuning", lambda n, d, kv, L, h: n * d),
    ("p_tuning_v2", lambda n, d, kv, L, h: 2 * L * n * kv),
    ("prefix_tuning", lambda n, d, kv, L, h: n * kv + (kv * h + h) + (h * 2 * L * kv + 2 * L * kv)),
])
def test_parameter_count_and_gradients_only_in_the_prompt(smollm2, lm_batch, method, count):
    options = {"encoder_hidden_size": 16} if method == "prefix_tuning" else {}
    dm = dt.inject(smollm2, dt.make_config(method, num_virtual_tokens=4, **options))
    assert dm.trainable_parameters() == count(4, 576, 3 * 64, 30, 16)
    assert [r["layer"] for r in dm.parameter_table()] == [PROMPT]
    dm(**lm_batch).logits.float().pow(2).mean().backward()
    assert all(p.grad is None for p in dm.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dm.prompts["default"].parameters())


def test_fold_keeps_outputs_and_leaves_the_prefix_alone(smollm2, lm_batch, tmp_path):
    dm = dt.inject(smollm2, dt.make_config("prefix_tuning", num_virtual_tokens=4, encoder_hidden_size=16))
    before = dm(**lm_batch).logits
    dm.fold_prompt()
    assert dm.prompts["default"].prefix_mlp is None
    assert dm.trainable_parameters() == 2 * 30 * 4 * 192  # P itself
    assert_close(dm(**lm_batch).logits, before)
    dm.save(tmp_path)  # the folded form saves and loads as such
    assert torch.equal(dt.load(copy.deepcopy(smollm2), tmp_path)(**lm_batch).logits, dm(**lm_batch).logits)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_save_load_round_trip_is_exact(smollm2, lm_batch, tmp_path, method):
    fresh = copy.deepcopy(smollm2)
    dm = dt.inject(smollm2, dt.make_config(method, num_virtual_tokens=4))
    randomise(dm)
    dm.save(tmp_path)
    loaded = dt.load(fresh, tmp_path)
    assert torch.equal(loaded(**lm_batch).logits, dm(**lm_batch).logits)
    assert loaded.adapters["default"].config == dm.adapters["default"].config


def test_prefix_with_lora_is_the_prefix_on_the_lora_merged_model(smollm2, lm_batch):
    lora = dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    merged = dt.inject(copy.deepcopy(smollm2), lora)
    torch.manual_seed(3)
    for p in merged.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    dm = dt.inject(smollm2, dt.make_config("p_tuning_v2", num_virtual_tokens=3), name="prefix")
    randomise(dm, "prefix")
    dm.add_adapter("lora", lora)
    dm.load_adapter_state_dict(merged.adapter_state_dict(), "lora")
    dm.set_active(["prefix", "lora"])
    assert dm.trainable_parameters() == sum(p.numel() for p in merged.parameters() if p.requires_grad) + 2 * 30 * 3 * 192
    ref = dt.inject(merged.merge_and_unload(), dt.make_config("p_tuning_v2", num_virtual_tokens=3))
    ref.load_adapter_state_dict(dm.adapter_state_dict("prefix"))
    assert_close(dm(**lm_batch).logits, ref(**lm_batch).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be merged"):
        dm.merge()
    dm.merge(["lora"])  # the weight adapter alone merges; the prefix still applies
    assert_close(dm(**lm_batch).logits, ref(**lm_batch).logits, rtol=1e-4, atol=1e-4)


def test_mixed_batch_rows_equal_each_row_alone_on_smollm2(smollm2, lm_batch):
    dm = dt.inject(smollm2, dt.make_config("prompt_tuning", num_virtual_tokens=5), name="prompt")
    dm.add_adapter("prefix", dt.make_config("p_tuning_v2", num_virtual_tokens=3))
    dm.add_adapter("lora", dt.LoRAConfig(r=4, targets=["q_proj"]))
    randomise(dm, "prefix")
    names = ["prompt", "prefix", "__base__", "lora", "prefix", "prompt"]
    batch = {k: v.repeat(3, 1) for k, v in lm_batch.items()}
    mixed = dm(**batch, adapter_names=names).logits
    T = batch["input_ids"].shape[1]
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        alone = dm(**row, adapter_names=[name]).logits
        virtual = 5 if name == "prompt" else 0
        assert alone.shape[1] == virtual + T
        assert_close(mixed[i:i + 1, :virtual + T], alone, rtol=1e-4, atol=1e-4, msg=name)
    with dm.disabled():
        assert_close(dm(**batch, adapter_names=names).logits, dm.model(**batch).logits)


def test_mixed_batch_rows_equal_each_row_alone_on_minilm(make_minilm, minilm_batch):
    dm = dt.inject(make_minilm(), dt.make_config("prompt_tuning", num_virtual_tokens=4), name="prompt",
                   train_modules=["classifier"])
    dm.add_adapter("prefix", dt.make_config("p_tuning_v2", num_virtual_tokens=2))
    randomise(dm, "prefix")
    names = ["prompt", "prefix", "__base__", "prefix"]
    mixed = dm(**minilm_batch, adapter_names=names).logits
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in minilm_batch.items()}
        assert_close(mixed[i:i + 1], dm(**row, adapter_names=[name]).logits, msg=name)
    base = make_minilm()
    assert_close(mixed[2], base(**minilm_batch).logits[2])
    for name in ("prompt", "prefix"):  # disabled() works on sequence classification (PEFT's raises)
        dm.set_active(name)
        with dm.disabled():
            assert_close(dm(**minilm_batch).logits, base(**minilm_batch).logits)
        assert (dm(**minilm_batch).logits - base(**minilm_batch).logits).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_v2"])
def test_generate_with_the_cache_equals_a_greedy_loop_without_it(smollm2, lm_batch, method):
    dm = dt.inject(smollm2, dt.make_config(method, num_virtual_tokens=4))
    randomise(dm)
    if method == "prompt_tuning":
        with torch.no_grad():
            dm.prompts["default"].prompt_embeddings.mul_(0.1)
    with torch.no_grad():
        got = dm.generate(**lm_batch, max_new_tokens=4, do_sample=False)
        want = greedy_loop(dm, lm_batch, 4)
    assert torch.equal(got, want)
    with torch.no_grad(), dm.disabled():
        assert not torch.equal(dm.generate(**lm_batch, max_new_tokens=4, do_sample=False), got)
    sampled = dm.generate(**lm_batch, max_new_tokens=3, do_sample=True, top_k=50)
    assert sampled.shape == (2, lm_batch["input_ids"].shape[1] + 3)
    assert torch.equal(sampled[:, :lm_batch["input_ids"].shape[1]], lm_batch["input_ids"])


def test_embed_hook_changes_the_real_tokens_in_forward_and_every_generate_step(smollm2, lm_batch):
    """DePT's hook: `embed` sees every real token's embedding, also those generate() feeds one by one; with LoRA
    on the embedding table the tokens go through it first."""
    base = copy.deepcopy(smollm2)
    dm = dt.inject(smollm2, dt.make_config("prompt_tuning", num_virtual_tokens=3), name="prompt")
    dm.add_adapter("lora", dt.LoRAConfig(r=2, targets=["embed_tokens"]))
    with torch.no_grad():
        dm.prompts["prompt"].prompt_embeddings.mul_(0.05)
        dm.model.get_input_embeddings().deltas["lora"].lora_B.normal_(std=0.05)
    dm.set_active(["prompt", "lora"])
    shift = torch.randn(576) * 0.02
    dm.prompts["prompt"].embed = lambda ids, embeds, positions: embeds + shift
    table = dm.model.get_input_embeddings()  # LoRA-adapted
    real = table(lm_batch["input_ids"]) + shift
    embeds = torch.cat([dm.prompts["prompt"].prompt_embeddings[None].expand(2, -1, -1), real], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), lm_batch["attention_mask"]], 1)
    assert_close(dm(**lm_batch).logits, base(inputs_embeds=embeds, attention_mask=mask).logits)
    with torch.no_grad():
        assert torch.equal(dm.generate(**lm_batch, max_new_tokens=3, do_sample=False), greedy_loop(dm, lm_batch, 3))


def test_delete_and_activation_rules(smollm2, lm_batch):
    dm = dt.inject(smollm2, dt.make_config("prompt_tuning", num_virtual_tokens=2), name="a")
    dm.add_adapter("b", dt.make_config("p_tuning_v2", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot be active together"):
        dm.set_active(["a", "b"])
    dm.add_adapter("lora", dt.LoRAConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="not inside composition blocks"):
        dm.set_active(dt.Parallel("a", "lora"))
    dm.delete_adapter("lora")
    dm.set_active("b")
    assert not any(p.requires_grad for p in dm.prompts["a"].parameters())
    assert all(p.requires_grad for p in dm.prompts["b"].parameters())
    with pytest.warns(UserWarning, match="activated 'a'"):
        dm.delete_adapter("b")
    assert list(dm.prompts) == ["a"] and dm.active == ("a",)
    with pytest.raises(ValueError, match="token_mask"):
        dm(**lm_batch, token_mask=lm_batch["attention_mask"])


def test_bad_input_is_named(smollm2, make_synthetic):
    with pytest.raises(ValueError, match="remove targets"):
        dt.make_config("prompt_tuning", targets=["q_proj"])
    with pytest.raises(ValueError, match="greater than 0"):
        dt.make_config("p_tuning_v2", num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_text and tokenizer"):
        dt.make_config("prompt_tuning", init="text")
    with pytest.raises(ValueError, match="get_input_embeddings"):
        dt.inject(make_synthetic(), dt.make_config("prompt_tuning"))
    with pytest.raises(ValueError, match="vocabulary"):
        dt.inject(smollm2, dt.make_config("prompt_tuning", init="text", init_token_ids=[10**6]))
