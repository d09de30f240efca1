"""Selection methods on real models: LN tuning and trainable tokens against the real `peft` package (both
directions), the tied lm_head, and BitFit training on Rotten Tomatoes / refusing a model without biases."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from helpers import assert_close, max_diff, perturb

import deltatune as dt

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(tied|Could not find a config|embedding).*")
        yield


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.tensor([[1, 7, 3, 9, 42, 7], [5, 3, 3, 60, 2, 11]])


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids).logits


def paths(dm, name="default"):
    return sorted(dm.adapters[name].paths)


# --- LN tuning -------------------------------------------------------------------------------------
def test_ln_tuning_default_targets_are_every_norm_the_same_as_peft_on_llama():
    dm = dt.inject(tied_llama(), dt.make_config("ln_tuning"))
    pm = peft.get_peft_model(tied_llama(), peft.LNTuningConfig(task_type="CAUSAL_LM"))  # PEFT's Llama default
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.ln_tuning.layer.LNTuningLayer))
    assert paths(dm) == theirs and len(theirs) == 2 * 2 + 1
    assert dm.trainable_parameters() == 5 * 32  # RMSNorm: a weight, no bias


def test_ln_tuning_minilm_peft_parity_both_ways(tmp_path, make_minilm, minilm_batch):
    # PEFT -> deltatune: a PEFT LN-tuning classifier (its trained copies and head) gives PEFT's logits here
    pm = peft.get_peft_model(make_minilm(), peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]))
    perturb(pm, 0.05)
    pm.eval()
    with torch.no_grad():
        theirs = pm(**minilm_batch).logits
        base = make_minilm()(**minilm_batch).logits
    assert max_diff(theirs, base) > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(make_minilm(), tmp_path / "peft")
    assert dm.adapters["default"].method == "ln_tuning" and dm.adapters["default"].train_modules == ["classifier"]
    assert len(paths(dm)) == 13  # embeddings + 2 per layer
    with torch.no_grad():
        assert_close(dm(**minilm_batch).logits, theirs)
    # deltatune -> PEFT: our own trained adapter (every norm by default) exported, PEFT gives our logits
    ours_dm = dt.inject(make_minilm(), dt.make_config("ln_tuning"), train_modules=["classifier"])
    assert paths(ours_dm) == paths(dm)
    assert ours_dm.trainable_parameters() == 13 * 2 * 384 + 384 * 2 + 2
    perturb(ours_dm, 0.05)
    ours_dm.eval()
    with torch.no_grad():
        ours = ours_dm(**minilm_batch).logits
    ours_dm.export_peft(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(again(**minilm_batch).logits, ours)
    ours_dm.merge()  # the change folds into the norms exactly as it ran
    with torch.no_grad():
        assert_close(ours_dm(**minilm_batch).logits, ours)


# --- trainable tokens ------------------------------------------------------------------------------
TOKENS = [42, 3, 17]


def test_trainable_tokens_on_a_tied_model_updates_the_lm_head_as_peft_does(tmp_path, monkeypatch):
    model = tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dm = dt.inject(model, dt.make_config("trainable_tokens", token_indices=TOKENS))
    assert paths(dm) == ["lm_head", "model.embed_tokens"]
    assert dm.trainable_parameters() == len(TOKENS) * 32  # one set of values for the tied pair
    assert torch.equal(logits(dm), logits(tied_llama()))
    perturb(dm, 0.5)
    for layer in dict(dm.layers()).values():  # the sparse paths: no vocabulary-sized ΔE (or lm_head ΔW) formed
        monkeypatch.setattr(layer.deltas["default"], "dense", None)
    ours = logits(dm)
    monkeypatch.undo()
    # the definition: the base model with those rows of the (one, tied) matrix changed
    ref = tied_llama()
    delta = dict(dm.layers())["model.embed_tokens"].deltas["default"]
    with torch.no_grad():
        ref.model.embed_tokens.weight[TOKENS] += delta.rows(dict(dm.layers())["model.embed_tokens"])
    assert_close(ours, logits(ref))
    # the lm_head moved too: other tokens' logits change through the embeddings, these ones also through the head
    lm = dict(dm.layers())["lm_head"].deltas["default"]
    assert lm.value("weight") is delta.value("weight") and not list(lm.parameters())
    dm.train()
    dm(input_ids=IDS).logits.square().mean().backward()
    grads = [(n, p) for n, p in dm.named_parameters() if p.grad is not None]
    assert [n for n, _ in grads] == ["model.model.embed_tokens.deltas.default.values.weight"]
    dm.zero_grad()
    dm.eval()
    w0 = model.model.embed_tokens.base_layer.weight.clone()
    dm.merge()  # merged once into the shared tensor, not twice
    assert_close(logits(dm), ours)
    dm.unmerge()
    assert torch.equal(model.model.embed_tokens.base_layer.weight, w0)
    dm.save(tmp_path / "native")
    assert_close(logits(dt.load(tied_llama(), tmp_path / "native")), ours)
    # PEFT loads our export (its tied lm_head layer included) and gives our logits; its save loads back here
    dm.export_peft(tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "peft").eval()
    assert_close(logits(pm), ours)
    pm.save_pretrained(tmp_path / "again")
    assert_close(logits(dt.load_peft(tied_llama(), tmp_path / "again")), ours)


def test_trainable_tokens_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="repeats ids \\[3\\]"):
        dt.make_config("trainable_tokens", token_indices=[3, 5, 3])
    with pytest.raises(ValueError, match="token_indices is empty"):
        dt.make_config("trainable_tokens", token_indices=[])
    with pytest.raises(ValueError, match="out of range.*resize_token_embeddings"):
        dt.inject(tied_llama(), dt.make_config("trainable_tokens", token_indices=[5, 100]))


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    from deltatune import assets

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_path()).eval()
    return lambda: copy.deepcopy(model)


@pytest.mark.slow
def test_smollm2_trainable_tokens_and_ln_tuning_peft_parity_both_ways(tmp_path, smollm2):
    ids = torch.tensor([[1, 504, 3458, 314, 260, 49151], [2, 1204, 30, 49000, 7, 504]])
    base = logits(smollm2(), ids)
    tokens = [49151, 504, 7]  # a late id (chat tokens) and two in the text
    for peft_cfg, method, options in [
        (peft.TrainableTokensConfig(token_indices=tokens), "trainable_tokens", {"token_indices": tokens}),
        (peft.LNTuningConfig(task_type="CAUSAL_LM"), "ln_tuning", {}),
    ]:
        pm = peft.get_peft_model(smollm2(), peft_cfg)
        perturb(pm, 0.05)
        theirs = logits(pm.eval(), ids)
        assert max_diff(theirs, base) > 1e-3
        pm.save_pretrained(tmp_path / method / "peft")
        dm = dt.load_peft(smollm2(), tmp_path / method / "peft")
        assert dm.adapters["default"].method == method
        assert_close(logits(dm, ids), theirs)
        ours_dm = dt.inject(smollm2(), dt.make_config(method, **options))
        assert paths(ours_dm) == paths(dm)
        perturb(ours_dm, 0.05)
        ours = logits(ours_dm.eval(), ids)
        ours_dm.export_peft(tmp_path / method / "ours")
        again = peft.PeftModel.from_pretrained(smollm2(), tmp_path / method / "ours").eval()
        assert_close(logits(again, ids), ours)


# --- BitFit on real models -------------------------------------------------------------------------
def test_bitfit_on_a_bias_free_llama_says_so_and_what_to_use():
    with pytest.raises(ValueError, match="no parameter.*BitFit trains biases.*ln_tuning"):
        dt.inject(tied_llama(), dt.make_config("bitfit"))


@pytest.mark.slow  # about 10 s alone, 25 s on a loaded machine
def test_bitfit_trains_minilm_on_rotten_tomatoes_and_the_loss_goes_down(make_minilm, minilm_tokenizer):
    from deltatune import assets

    rows = assets.rotten_tomatoes()
    random.Random(0).shuffle(rows)
    batches = [rows[i:i + 8] for i in range(0, 16, 8)]  # 16 reviews, fitted by the biases alone

    def encode(batch):
        enc = minilm_tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=32,
                               return_tensors="pt")
        return dict(enc), torch.tensor([r["label"] for r in batch])

    dm = dt.inject(make_minilm(), dt.make_config("bitfit", targets=["bert.*.bias"]), train_modules=["classifier"])
    biases = [n for n, p in dm.named_parameters() if p.requires_grad and ".deltas." in n and "classifier" not in n]
    assert biases and all(n.endswith("values.bias") for n in biases)
    trained = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    held = [encode(b) for b in batches]

    def held_loss():
        dm.eval()
        with torch.no_grad():
            return sum(dm(**x, labels=y).loss.item() for x, y in held) / len(held)

    before = held_loss()
    bias_before = {n: p.detach().clone() for n, p in dm.named_parameters() if n in biases}
    dm.train()
    for _ in range(8):
        for x, y in held:
            opt.zero_grad()
            dm(**x, labels=y).loss.backward()
            opt.step()
    after = held_loss()
    assert after < 0.9 * before, (before, after)
    moved = {n: max_diff(p, bias_before[n]) for n, p in dm.named_parameters() if n in biases}
    assert all(v > 0 for v in moved.values())  # every bias trained, not only the head
