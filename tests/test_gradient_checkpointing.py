"""Gradient checkpointing (`dt.enable_gradient_checkpointing`, recipe key train.gradient_checkpointing) changes
no gradient: for every weight-delta method of the registry on a tiny Llama built from its config (float32,
and NF4 / int8 bases through bitsandbytes), for the activation adapters on MiniLM, for a plain nn.Module's blocks, for the per-call layer state (mixed-adapter rows,
token masks, disabled()), and on real SmolLM2. Each test also counts the recomputed forwards, so a run in
which checkpointing silently did nothing fails.
"""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import fresh, randomise
from helpers import assert_close, perturb
from test_all_methods import CASES, METHODS, Net
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import assets

ACTIVATION_ADAPTERS = [s.name for s in dt.list_methods() if s.family == "adapters" and s.name != "adapter_fusion"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, rectangular (16 x 32: 2 kv heads) and 32 x 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def counting_forwards(dm) -> list[int]:
    """A one-item list counting the calls of dm's first DeltaLayer, or for a model with none (prompt adapters) of
    its first block's first submodule (the recompute calls the block's forward, not the block), recomputes
    included."""
    from deltatune.engine.checkpointing import blocks

    calls = [0]
    first = next((layer for _, layer in dm.layers()), None) or next(blocks(dm.model)[0].children())
    first.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def gradients(dm, loss_fn, step: int = 0) -> dict[str, torch.Tensor]:
    """Every trainable gradient of one training step, from the same RNG state (dropout, noise, rank draws)."""
    dm.zero_grad(set_to_none=True)
    dm.train()
    torch.manual_seed(7)
    dm.on_train_step(step)
    (loss_fn() + dm.regularization_loss()).backward()
    grads = {n: p.grad.clone() for n, p in dm.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads, "no gradient reached the adapter"
    return grads


def assert_same_gradients_with_checkpointing(dm, loss_fn, tol: float = 1e-5, enable=dt.enable_gradient_checkpointing
                                             ) -> None:
    calls = counting_forwards(dm)
    plain = gradients(dm, loss_fn)
    once = calls[0]
    enable(dm)
    checkpointed = gradients(dm, loss_fn)
    assert calls[0] - once == 2 * once, "the blocks' forwards were not recomputed in backward"
    assert checkpointed.keys() == plain.keys()
    for name, g in plain.items():
        assert_close(checkpointed[name], g, rtol=tol, atol=tol, msg=name)


def llama_config(method: str):
    options = dict(CASES[method].options)
    if method == "ia3":
        options["feedforward"] = ["down_proj"]
    return dt.get_method(method).config(targets=LLAMA_TARGETS, **options)


@pytest.mark.parametrize("method", METHODS)
def test_every_weight_delta_method_gets_the_same_gradients_with_checkpointing(method):
    dm = dt.inject(tiny_llama(), llama_config(method))
    perturb(dm, std=0.1)  # deltas away from their init, so every factor's gradient is non-trivial
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_same_gradients_with_checkpointing(dm, lambda: dm(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_quantized_base_gets_the_same_gradients_with_checkpointing(method, scheme):
    dm = dt.inject(dt.quantize(tiny_llama(), scheme), llama_config(method))  # bitsandbytes' CPU kernels
    perturb(dm, std=0.1)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_same_gradients_with_checkpointing(dm, lambda: dm(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"])
def test_prompt_methods_get_the_same_gradients_with_checkpointing(method):
    # transformers' checkpointed layers drop a cache; the engine's prefix cache is only read in a training forward,
    # so it is kept (a prefix silently dropped would still give gradients, to the prompt's MLP: none)
    dm = dt.inject(tiny_llama(), dt.make_config(method, num_virtual_tokens=3), name=method)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_same_gradients_with_checkpointing(dm, lambda: dm(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("method", ACTIVATION_ADAPTERS)
def test_activation_adapters_get_the_same_gradients_with_checkpointing(method, minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config(method), name=method)
    randomise(dm)
    assert_same_gradients_with_checkpointing(dm, lambda: dm(**batch).last_hidden_state.square().mean())


def test_a_fusion_of_two_adapters_gets_the_same_gradients_with_checkpointing(minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("pfeiffer"), name="a")
    dm.add_adapter("b", dt.make_config("pfeiffer", reduction_factor=8))
    dm.add_fusion("a", "b")
    dm.set_active(dt.Fuse("a", "b"))
    randomise(dm)
    assert_same_gradients_with_checkpointing(dm, lambda: dm(**batch).last_hidden_state.square().mean())


def test_plain_modules_are_checkpointed_block_by_block():
    dm = dt.inject(Net(), dt.make_config("lora", r=2, targets=["up", "down"], dropout=0.2))
    perturb(dm, std=0.1)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))
    assert_same_gradients_with_checkpointing(dm, lambda: dm(x).square().mean())


@pytest.mark.parametrize("enable", [dt.enable_gradient_checkpointing, lambda dm: dm.gradient_checkpointing_enable(),
                                    lambda dm: dm.gradient_checkpointing_enable({"use_reentrant": False})],
                         ids=["dt", "transformers-name", "transformers-name-with-kwargs"])
def test_the_per_call_layer_state_is_replayed_in_the_recompute(enable):
    # mixed-adapter rows, a token mask and a disabled() forward are set on the layers for one call only:
    # the recompute in backward runs after that call returned, and must see them again; transformers' own
    # method name on the DeltaModel goes through the engine too (reaching the model's would skip the replay)
    dm = dt.inject(tiny_llama(), dt.make_config("lora", r=2, targets=LLAMA_TARGETS), name="a")
    dm.add_adapter("b", dt.make_config("lora", r=3, targets=LLAMA_TARGETS))
    dm.set_active(["a", "b"])
    perturb(dm, std=0.1)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) > 0.5

    def loss():
        routed = dm(input_ids=ids, adapter_names=["a", dt.BASE, "b"]).logits
        masked = dm(input_ids=ids, token_mask=mask).logits
        with dm.disabled():  # recomputed too (the embeddings' output requires grad once checkpointing is on)
            base = dm(input_ids=ids).logits
        return routed.square().mean() + (masked - routed).square().mean() + (masked - base).square().mean()

    assert_same_gradients_with_checkpointing(dm, loss, enable=enable)


def test_checkpointing_a_model_without_blocks_is_a_clear_error():
    dm = dt.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.make_config("lora", r=2, targets=["0"]))
    with pytest.raises(ValueError, match="has no repeated blocks to checkpoint"):
        dt.enable_gradient_checkpointing(dm)


def test_real_smollm2_lora_gets_the_same_gradients_with_checkpointing():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["The capital of France is Paris.", "Two and two make four, said the teacher."],
                     padding=True, return_tensors="pt"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    dm = dt.inject(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                   dt.make_config("lora", r=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"]))
    perturb(dm, std=0.02)
    assert_same_gradients_with_checkpointing(dm, lambda: dm(**batch, labels=labels).loss, tol=1e-4)
