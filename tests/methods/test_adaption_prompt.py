"""LLaMA-Adapter (adaption prompts): zero-init identity, the gated attention by hand, GQA, KV cache, mixed batches,
save/load, accounting, no merge, and PEFT parity on SmolLM2-135M (weights, logits, greedy tokens, both ways)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_close, assert_round_trip, assert_rows_match_each_adapter, max_diff, train_losses
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import deltatune as dt
from deltatune import assets

peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)  # GQA: two query heads per key/value head
IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def tiny(kind=LlamaForCausalLM, config=LlamaConfig, **kw):
    torch.manual_seed(0)
    return kind(config(**{**SMALL, **kw})).eval()


class Logits(nn.Module):
    """A causal LM as ids -> logits without a cache (the shape the shared test helpers compare)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, ids):
        return self.lm(ids, use_cache=False).logits


def lora_first(model, targets):
    """LoRA (non-zero B) on `targets` inside the attention (added before the adaption prompts here; the other
    order is test_lora_inside_a_wrapped_attention_either_order)."""
    dm = dt.inject(model, dt.LoRAConfig(r=2, targets=targets), name="lora")
    with torch.no_grad():
        for n, p in dm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return dm


def inject(model=None, name="default", dm=None, **options):
    config = dt.make_config("adaption_prompt", **{"adapter_len": 3, "adapter_layers": 2, **options})
    if dm is not None:
        dm.add_adapter(name, config)
        return dm
    return dt.inject(model if model is not None else tiny(), config, name=name)


def open_gates(dm, seed=0, name=None):
    """Non-zero gates (trained ones), different per layer, for the active adapter or `name`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in dm.named_parameters():
            if n.endswith("adaption_gate") and (p.requires_grad if name is None else f".{name}." in n):
                p.copy_(torch.randn(1, generator=g))


def by_hand(attn, P, g, h, cos, sin):
    """The paper's gated branch for one layer, written out head by head (llama rotary, GQA repeat)."""
    H, dh = attn.config.num_attention_heads, attn.head_dim
    B, T, _ = h.shape
    q = attn.q_proj(h).view(B, T, H, dh)
    q1, q2 = q[..., : dh // 2], q[..., dh // 2:]
    q = q * cos[:, :, None] + torch.cat([-q2, q1], -1) * sin[:, :, None]
    k, v = attn.k_proj(P).view(len(P), -1, dh), attn.v_proj(P).view(len(P), -1, dh)
    heads = []
    for i in range(H):
        j = i // (H // k.shape[1])  # the key/value head query head i shares
        s = torch.softmax(q[:, :, i] @ k[:, j].T / math.sqrt(dh), dim=-1)  # (B, T, l)
        heads.append(g * s @ v[:, j])
    return attn.o_proj(torch.cat(heads, -1))


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig), (MistralForCausalLM, MistralConfig),
                                         (Qwen2ForCausalLM, Qwen2Config)])
def test_default_targets_count_and_identity_at_init(kind, config):
    model = tiny(kind, config)
    base = model(IDS).logits
    dm = inject(model)
    assert [p for p, _ in dm.layers()] == ["model.layers.2.self_attn", "model.layers.3.self_attn"]  # the top L=2
    assert dm.trainable_parameters() == 2 * (3 * 32) + 2  # L·l·d + L gates
    assert torch.equal(dm(IDS).logits, base)  # the gate starts at 0: exactly the base model
    open_gates(dm)
    assert max_diff(dm(IDS).logits, base) > 1e-3
    every = inject(tiny(kind, config), adapter_layers=None)
    assert len(list(every.layers())) == 4


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_branch_equals_the_gated_attention_by_hand(kind, config):
    """Qwen2 adds q/k/v biases; GQA (4 heads, 2 kv heads) repeats each prompt key/value for two query heads."""
    dm = inject(tiny(kind, config))
    open_gates(dm)
    layer = dm.model.model.layers[3].self_attn
    delta = layer.deltas["default"]
    seen = {}
    hook = layer.register_forward_hook(lambda m, a, kw, out: seen.update(kw=dict(kw), out=out), with_kwargs=True)
    dm(IDS, use_cache=False)  # the layer runs again below: a cache would take its keys twice
    hook.remove()
    h, (cos, sin) = seen["kw"]["hidden_states"], seen["kw"]["position_embeddings"]
    with dm.disabled():
        plain = layer(**seen["kw"])[0]
    want = plain + by_hand(layer.base_layer, delta.adaption_prompt, delta.adaption_gate, h, cos, sin)
    assert_close(seen["out"][0], want)


def test_gradients_reach_prompt_and_gate_and_training_moves_the_loss():
    dm = inject()
    dm(IDS, labels=IDS).loss.backward()
    grads = {n.rsplit(".", 1)[-1]: p.grad for n, p in dm.named_parameters() if p.grad is not None}
    assert set(grads) == {"adaption_prompt", "adaption_gate"}
    # at init only the gate gets a gradient (the prompt's branch is multiplied by g = 0): the zero-init property
    layer = dm.model.model.layers[3].self_attn.deltas["default"]
    assert layer.adaption_gate.grad.abs().item() > 0 and torch.count_nonzero(layer.adaption_prompt.grad) == 0
    dm.zero_grad()
    losses = train_losses(dm, {"input_ids": IDS}, steps=4, lr=5e-2, labels=IDS)
    assert losses[-1] < losses[0]


def test_generate_with_kv_cache_equals_greedy_without_cache():
    dm = inject()
    open_gates(dm)
    ids = IDS[:2]
    cached = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):  # the prompt's keys/values stay out of the cache: recomputing everything gives the same
        seq = torch.cat([seq, dm(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)
    with dm.disabled():
        plain = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert not torch.equal(plain, cached)  # the adapter took part in generation


def test_mixed_batch_rows_equal_each_adapter_alone_and_with_lora():
    dm = lora_first(Logits(tiny()), ["q_proj", "k_proj"])
    inject(dm=dm, name="a")
    dm.set_active("a")
    open_gates(dm)
    inject(dm=dm, name="b", adapter_layers=3, adapter_len=2)
    open_gates(dm, seed=1, name="b")
    assert_rows_match_each_adapter(dm, IDS, ["a", "b", dt.BASE], rows_alone=True)
    assert_rows_match_each_adapter(dm, IDS, ["b", "lora", "a"])
    with pytest.raises(ValueError, match="token_mask"):
        dm(IDS, token_mask=torch.ones_like(IDS))


def test_stacked_with_lora_prompt_keys_go_through_the_adapted_projections():
    dm = lora_first(tiny(), ["k_proj"])
    inject(dm=dm, name="a")
    dm.set_active("a")
    open_gates(dm)
    dm.set_active(["a", "lora"])
    attn = dm.model.model.layers[3].self_attn
    P = attn.deltas["a"].adaption_prompt
    assert max_diff(attn.base_layer.k_proj(P), attn.base_layer.k_proj.base_layer(P)) > 1e-3  # LoRA changes K_p
    h = torch.randn(2, 5, 32)
    cos, sin = dm.model.model.rotary_emb(h, torch.arange(5)[None])
    got = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
    with dm.disabled():
        plain = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
    delta = attn.deltas["a"]
    with torch.no_grad():  # the plain attention of LoRA's k_proj, plus the branch with K_p = (W0 + ΔW) P
        branch = by_hand(attn.base_layer, delta.adaption_prompt, delta.adaption_gate, h, cos, sin)
    dm.set_active("lora")
    assert_close(got, attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0] + branch)
    assert max_diff(got, plain) > 1e-3


def test_save_load_round_trip_and_no_merge(tmp_path):
    dm = inject(Logits(tiny()))
    open_gates(dm)
    with torch.no_grad():
        dm.model.lm.model.layers[2].self_attn.deltas["default"].adaption_prompt.mul_(0.5)
    loaded = assert_round_trip(dm, Logits(tiny()), IDS, tmp_path / "a")
    assert [p for p, _ in loaded.layers()] == ["lm.model.layers.2.self_attn", "lm.model.layers.3.self_attn"]
    with pytest.raises(ValueError, match="cannot be merged"):
        dm.merge()


def test_fp32_prompts_on_a_bf16_base():
    model = tiny().to(torch.bfloat16)
    base = model(IDS).logits
    dm = inject(model)
    assert {p.dtype for p in dm.parameters() if p.requires_grad} == {torch.float32}  # bf16 updates would underflow
    assert torch.equal(dm(IDS).logits, base)
    open_gates(dm)
    dm(IDS, labels=IDS).loss.backward()
    prompt = dm.model.model.layers[3].self_attn.deltas["default"].adaption_prompt
    assert prompt.grad.dtype == torch.float32 and torch.count_nonzero(prompt.grad) > 0


def test_beside_an_activation_adapter_it_names_the_problem():
    dm = inject()
    dm.add_adapter("h", dt.make_config("houlsby", bottleneck=4, targets=["model.layers.3.self_attn"]))
    dm.set_active(["default", "h"])
    with pytest.raises(ValueError, match="activate it alone"):
        dm(IDS)


def test_bad_options_and_targets_fail_clearly():
    with pytest.raises(ValueError, match="adapter_layers=9 but the model has 4 layers"):
        inject(adapter_layers=9)
    with pytest.raises(ValueError, match="adapter_len"):
        dt.make_config("adaption_prompt", adapter_len=0)
    with pytest.raises(ValueError, match="llama-style attention"):
        inject(targets=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="no default for model type 'gpt2'"):
        from transformers import GPT2Config, GPT2LMHeadModel
        inject(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)))


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    dm = inject(targets=["model.layers.0.self_attn", "model.layers.2.self_attn"])
    with pytest.raises(ValueError, match="last adapter_layers modules"):
        dm.export_peft(tmp_path / "gap")
    with pytest.raises(ValueError, match="supports model types"):
        inject(tiny(Qwen2ForCausalLM, Qwen2Config)).export_peft(tmp_path / "qwen")


# --- PEFT parity on the real SmolLM2-135M (llama: 30 layers, 9 heads over 3 kv heads) -----------------------------
@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["The capital of France is", "Hello, my name"], return_tensors="pt", padding=True))
    return lambda: AutoModelForCausalLM.from_pretrained(path).eval(), batch


def _greedy(model, batch):
    return model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.slow
def test_peft_parity_both_ways_on_smollm2(smollm2, tmp_path):
    make, batch = smollm2
    torch.manual_seed(0)
    pm = peft.get_peft_model(make(), peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=3, task_type="CAUSAL_LM"))
    with torch.no_grad():  # trained gates (PEFT's start at 0)
        for n, p in pm.named_parameters():
            if n.endswith("adaption_gate"):
                p.fill_(0.8 if "27" in n else -0.5)
    pm.save_pretrained(tmp_path / "peft")
    want, want_tokens = pm(**batch).logits.detach(), _greedy(pm, batch)

    dm = dt.load_peft(make(), tmp_path / "peft")  # PEFT -> deltatune
    assert [p for p, _ in dm.layers()] == [f"model.layers.{i}.self_attn" for i in (27, 28, 29)]
    peft_state = {n: p for n, p in pm.named_parameters() if "adaption_" in n}
    for n, p in peft_state.items():
        path = n.split("base_model.model.", 1)[1].rsplit(".", 1)
        mine = getattr(dm.model.get_submodule(path[0]).deltas["default"], path[1])
        assert torch.equal(mine.reshape(p.shape), p.detach()), n
    assert_close(dm(**batch).logits, want)
    assert torch.equal(_greedy(dm, batch), want_tokens)
    with dm.disabled():
        assert max_diff(dm(**batch).logits, want) > 1e-2  # the gates are open: the adapter changes the logits

    dm.export_peft(tmp_path / "back")  # deltatune -> PEFT
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (written["target_modules"], written["adapter_len"], written["adapter_layers"]) == ("self_attn", 4, 3)
    again = peft.PeftModel.from_pretrained(make(), tmp_path / "back").eval()
    assert_close(again(**batch).logits, want)
    assert torch.equal(_greedy(again, batch), want_tokens)


def test_lora_inside_a_wrapped_attention_either_order(tmp_path):
    """LoRA added after the adaption prompts wrap self_attn still finds q_proj/v_proj inside it (user paths,
    no 'base_layer'), and the model equals the one built in the other order; delete and merge_and_unload unwrap
    both levels."""
    first = lora_first(tiny(), ["q_proj", "v_proj"])
    inject(dm=first, name="a")
    open_gates(first, name="a")
    first.set_active(["a", "lora"])
    later = inject(tiny(), name="a")
    later.add_adapter("lora", dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    assert later.adapters["lora"].paths == first.adapters["lora"].paths
    assert all("base_layer" not in p for p, _ in later.layers())
    later.load_adapter_state_dict(first.adapter_state_dict("lora"), "lora")
    later.load_adapter_state_dict(first.adapter_state_dict("a"), "a")
    later.set_active(["a", "lora"])
    with torch.no_grad():
        assert_close(later(IDS).logits, first(IDS).logits)
        later.set_active("a")
        assert max_diff(later(IDS).logits, first(IDS).logits) > 1e-3  # LoRA counted: the test can fail
    later.set_active("lora")
    later.delete_adapter("a")  # the outer wrapper goes, the LoRA layers inside stay
    only_lora = lora_first(tiny(), ["q_proj", "v_proj"])
    with torch.no_grad():
        assert_close(later(IDS).logits, only_lora(IDS).logits)
    plain = first.merge_and_unload(["lora"])
    assert not any(isinstance(m, dt.engine.layer.DeltaLayer) for m in plain.modules())
