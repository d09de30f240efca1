"""The chunked causal-LM loss (training/chunked_loss.py, recipe key train.chunked_loss): the same loss and gradients
as transformers' own, for any chunk size, with padding labels, prompt adapters, mixed-adapter rows through an
adapted lm_head and gradient checkpointing; no (tokens x vocabulary) tensor saved for backward; the refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, perturb
from test_gradient_checkpointing import LLAMA_TARGETS, gradients, tiny_llama
from transformers import LlamaForCausalLM

import deltatune as dt
from deltatune.training.chunked_loss import chunked_causal_lm_loss

VOCAB = 64  # tiny_llama's


def batch(rows: int = 3, length: int = 11, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt not counted
    labels[1, -3:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_same_loss_and_gradients(dm, b: dict, chunk: int) -> None:
    reference = dm(**b).loss.detach()
    expected = gradients(dm, lambda: dm(**b).loss)
    chunked = chunked_causal_lm_loss(dm, b, chunk).detach()
    got = gradients(dm, lambda: chunked_causal_lm_loss(dm, b, chunk))
    assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert_close(got[name], g, msg=name)


@pytest.mark.parametrize("chunk", [1, 7, 12, 1000])  # one position per chunk, uneven, two rows' worth, all at once
def test_the_chunked_loss_equals_transformers_loss_and_gradients(chunk):
    dm = dt.inject(tiny_llama(), dt.make_config("lora", r=2, targets=LLAMA_TARGETS))
    perturb(dm, std=0.1)
    assert_same_loss_and_gradients(dm, batch(), chunk)


def test_the_output_layer_is_back_after_the_loss_and_after_an_error():
    dm = dt.inject(tiny_llama(), dt.make_config("lora", r=2, targets=LLAMA_TARGETS))
    head = dm.model.get_output_embeddings()
    chunked_causal_lm_loss(dm, batch(), 8).backward()
    assert dm.model.get_output_embeddings() is head and "forward" not in vars(head) and not dm.model._forward_pre_hooks
    with pytest.raises(ValueError, match=r"labels of shape \(batch, sequence\)"):
        chunked_causal_lm_loss(dm, {**batch(), "labels": torch.zeros(3, dtype=torch.long)}, 8)
    broken = {**batch(), "input_ids": torch.full((3, 11), VOCAB + 5)}  # fails inside the forward
    with pytest.raises(IndexError):
        chunked_causal_lm_loss(dm, broken, 8)
    assert dm.model.get_output_embeddings() is head and "forward" not in vars(head) and not dm.model._forward_pre_hooks
    assert "lm_head.weight" in dm.model.state_dict()


def test_no_vocabulary_sized_tensor_is_saved_for_backward():
    # the point of chunking: the plain loss saves (tokens x vocab) fp32 log-probabilities, the chunked one saves
    # only the hidden states each chunk recomputes from
    model = LlamaForCausalLM(tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(), "vocab_size": 4096}))
    dm = dt.inject(model, dt.make_config("lora", r=2, targets=LLAMA_TARGETS))
    b = {k: v % 4096 if k == "input_ids" else v for k, v in batch(rows=4, length=16).items()}
    vocab_sized = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == 4096 and t.numel() > 4096 * 32:  # the lm_head weight is 4096 x 32
            vocab_sized.append(tuple(t.shape))
        return t

    for loss, expect_saved in ((lambda: dm(**b).loss, True), (lambda: chunked_causal_lm_loss(dm, b, 16), False)):
        vocab_sized.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = loss()
        assert bool(vocab_sized) == expect_saved, vocab_sized
        value.backward()


def test_a_prompt_adapter_s_virtual_tokens_are_not_counted():
    # the engine extends the labels over the virtual tokens (-100) before the base model runs: the chunks read
    # those labels, not the caller's shorter ones
    dm = dt.inject(tiny_llama(), dt.make_config("prompt_tuning", num_virtual_tokens=3))
    perturb(dm, std=0.1)
    assert_same_loss_and_gradients(dm, batch(), 5)


def test_mixed_adapter_rows_through_an_adapted_lm_head():
    # the lm_head runs after the DeltaModel call returned: each row must still get its own adapter there
    targets = [*LLAMA_TARGETS, "lm_head"]
    dm = dt.inject(tiny_llama(), dt.make_config("lora", r=2, targets=targets), name="a")
    dm.add_adapter("b", dt.make_config("lora", r=3, targets=targets))
    dm.set_active(["a", "b"])
    perturb(dm, std=0.1)
    b = {**batch(), "adapter_names": ["a", dt.BASE, "b"]}
    assert_same_loss_and_gradients(dm, b, 4)


def test_the_chunked_loss_with_gradient_checkpointing():
    dm = dt.inject(tiny_llama(), dt.make_config("lora", r=2, targets=[*LLAMA_TARGETS, "lm_head"]))
    perturb(dm, std=0.1)
    b = batch()
    expected = gradients(dm, lambda: dm(**b).loss)
    dt.enable_gradient_checkpointing(dm)
    got = gradients(dm, lambda: chunked_causal_lm_loss(dm, b, 6))
    for name, g in expected.items():
        assert_close(got[name], g, msg=name)


def test_a_batch_without_labelled_tokens_gives_zero_and_backward_runs():
    dm = dt.inject(tiny_llama(), dt.make_config("lora", r=2, targets=LLAMA_TARGETS))
    b = {**batch(), "labels": torch.full((3, 11), -100)}
    loss = chunked_causal_lm_loss(dm, b, 8)
    loss.backward()
    assert loss.item() == 0.0


def test_models_the_chunks_cannot_reproduce_are_refused(minilm):
    softcapped = tiny_llama()
    softcapped.config.final_logit_softcapping = 30.0
    dm = dt.inject(softcapped, dt.make_config("lora", r=2, targets=LLAMA_TARGETS))
    with pytest.raises(ValueError, match="final_logit_softcapping.*turn train.chunked_loss off"):
        chunked_causal_lm_loss(dm, batch(), 8)
    from transformers import AutoModel

    encoder = dt.inject(AutoModel.from_pretrained(minilm[0]), dt.make_config("lora", r=2, targets=["query"]))
    with pytest.raises(ValueError, match="needs a Hugging Face causal LM with an output layer"):
        chunked_causal_lm_loss(encoder, {**minilm[1], "labels": minilm[1]["input_ids"]}, 8)
    cpt = dt.inject(tiny_llama(), dt.make_config("cpt", token_ids=[5, 6, 7]))
    with pytest.raises(ValueError, match="cpt computes its own loss"):
        chunked_causal_lm_loss(cpt, batch(), 8)


def test_the_smollm2_recipe_trains_the_same_with_the_chunked_loss(tmp_path):
    # the recipe key end to end on the real model: the same training losses and adapter as transformers' loss
    from test_training_precision import SMOLLM2, SMOLLM2_SHORT

    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    results = {}
    for chunk in ("null", "40"):  # 4 rows x 48 tokens: 5 chunks of 10 positions
        trainer = Trainer(load_recipe(SMOLLM2, [*SMOLLM2_SHORT, f"train.chunked_loss={chunk}",
                                                f"train.output_dir={tmp_path / chunk}"]))
        trainer.setup()
        losses = [trainer.train_step()[0] for _ in range(2)]
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[chunk] = losses, adapter
    (plain, plain_adapter), (chunked, chunked_adapter) = results["null"], results["40"]
    assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-5)
    for name, value in plain_adapter.items():
        assert_close(chunked_adapter[name], value, msg=name)


def test_the_recipe_key_refuses_a_classification_task():
    from test_training_precision import MINILM_SHORT

    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    trainer = Trainer(load_recipe(None, [*MINILM_SHORT, "train.chunked_loss=64"]))
    with pytest.raises(ValueError, match="train.chunked_loss is a causal LM's loss.*turn train.chunked_loss off"):
        trainer.setup()
