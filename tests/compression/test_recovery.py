"""PERP recovery: masked LoRA keeps the pruned entries at exactly zero through training, merging and saving, and
perp_recover lowers the loss of a pruned model (tiny Llama / GPT-2, and a real MiniLM) without touching its mask."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Holder, assert_close, max_diff, perturb
from torch import nn
from torch.func import functional_call

import deltatune as dt
from deltatune import assets
from deltatune.compression.pruning import prune, prune_targets
from deltatune.compression.recovery import norm_layers, perp_recover
from deltatune.engine.layer import DeltaLayer

R = 4


def pruned_linear() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    keep = prune(Holder(layer), "magnitude", 0.5, targets=["layer"])["layer"]
    return layer, keep, torch.randn(4, 12)


def random_batches(vocab: int = 100, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def loss_on(model: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


def zeros_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    return all(bool((model.get_submodule(p).weight[~keep] == 0).all()) for p, keep in masks.items())


# --- the masked_lora method ------------------------------------------------------------------------
def test_masked_lora_trains_only_A_and_B_and_holds_the_mask_as_a_bool_buffer():
    layer, keep, _ = pruned_linear()
    dm = dt.inject(Holder(layer), dt.make_config("masked_lora", r=R, targets=["layer"]))
    assert dm.trainable_parameters() == R * (12 + 10)
    delta = dm.model.layer.deltas["default"]
    assert delta.lora_mask.dtype == torch.bool and not delta.lora_mask.requires_grad
    assert torch.equal(delta.lora_mask, keep)
    assert set(dm.adapter_state_dict()) == {"layer.lora_A", "layer.lora_B", "layer.lora_mask"}


def test_masked_lora_output_is_the_pruned_base_plus_the_masked_delta():
    layer, keep, x = pruned_linear()
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    dm = dt.inject(Holder(layer), dt.make_config("masked_lora", r=R, alpha=8.0, targets=["layer"]))
    with torch.no_grad():
        assert torch.equal(dm(x), functional_call(nn.Linear(12, 10), {"weight": W0, "bias": b0}, (x,)))  # B = 0
    perturb(dm, std=0.3)
    delta = dm.model.layer.deltas["default"]
    expected_W = W0 + (8.0 / R) * (delta.lora_B @ delta.lora_A) * keep
    with torch.no_grad():
        reference = functional_call(nn.Linear(12, 10), {"weight": expected_W, "bias": b0}, (x,))
        assert_close(dm(x), reference)
        plain = torch.nn.functional.linear(x, W0 + (8.0 / R) * delta.lora_B @ delta.lora_A, b0)
        assert max_diff(dm(x), plain) > 1e-2  # the mask matters


def test_fused_single_pass_equals_the_two_pass_form_in_output_and_gradients():
    layer, keep, x = pruned_linear()
    config = dt.make_config("masked_lora", r=R, bias="lora_only", targets=["layer"])
    fused = dt.inject(Holder(copy.deepcopy(layer)), config)
    perturb(fused, std=0.3)
    delta = fused.model.layer.deltas["default"]
    assert not delta.uses_base_output  # no dropout: the engine runs the layer once, with W0 + dW
    # the two-pass form: what a second delta stacked on top (or a mixed batch) gets
    two_pass = delta(fused.model.layer, x, layer(x))
    one_pass = fused(x)
    assert_close(one_pass, two_pass)
    grads = []
    for y in (one_pass, two_pass):
        delta.zero_grad()
        (y * torch.arange(10.0)).sum().backward()
        grads.append([p.grad.clone() for p in (delta.lora_A, delta.lora_B, delta.lora_bias)])
    for a, b in zip(*grads):
        assert_close(a, b)


def test_on_a_dense_layer_masked_lora_equals_lora():
    torch.manual_seed(0)
    layer, x = nn.Linear(12, 10), torch.randn(4, 12)
    masked = dt.inject(Holder(copy.deepcopy(layer)), dt.make_config("masked_lora", r=R, targets=["layer"]))
    plain = dt.inject(Holder(copy.deepcopy(layer)), dt.make_config("lora", r=R, targets=["layer"]))
    perturb(plain, std=0.3)
    masked.load_adapter_state_dict({**plain.adapter_state_dict(), "layer.lora_mask": torch.ones(10, 12, dtype=bool)})
    with torch.no_grad():
        assert_close(masked(x), plain(x))


def train_steps(dm: nn.Module, batches: list[dict], steps: int = 4, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        dm(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_after_training_merging_keeps_pruned_entries_exactly_zero_and_the_output(tiny_llama):
    masks = prune(tiny_llama, "magnitude", 0.5)
    W0 = {p: tiny_llama.get_submodule(p).weight.detach().clone() for p in masks}
    batches = random_batches()
    dm = dt.inject(tiny_llama, dt.make_config("masked_lora", r=R, targets=list(masks)))
    train_steps(dm, batches)
    assert any(dm.model.get_submodule(p).deltas["default"].lora_B.abs().sum() > 0 for p in masks)
    with torch.no_grad():
        unmerged = dm(**batches[0]).logits
        dm.merge()
        merged = dm(**batches[0]).logits
    assert_close(merged, unmerged, rtol=1e-3, atol=1e-4)
    assert zeros_kept(dm.model, masks)
    assert any(not torch.equal(dm.model.get_submodule(p).weight, W0[p]) for p in masks)  # it did learn something
    dm.unmerge()
    for p in masks:
        assert_close(dm.model.get_submodule(p).weight, W0[p], msg=p)


def test_gpt2_conv1d_layers_keep_their_zeros_through_merge_and_unload(tiny_gpt2):
    masks = prune(tiny_gpt2, "magnitude", 0.5)  # Conv1D weights are stored (d_in, d_out)
    batches = random_batches()
    dm = dt.inject(tiny_gpt2, dt.make_config("masked_lora", r=R, bias="lora_only", targets=list(masks)))
    perturb(dm, std=0.2)
    with torch.no_grad():
        unmerged = dm(**batches[0]).logits
        model = dm.merge_and_unload()
        assert_close(model(**batches[0]).logits, unmerged, rtol=1e-3, atol=1e-4)
    assert zeros_kept(model, masks)


def test_masked_lora_saves_and_loads_through_the_engine(tiny_llama, tmp_path):
    masks = prune(tiny_llama, "magnitude", 0.5)
    fresh = copy.deepcopy(tiny_llama)
    dm = dt.inject(tiny_llama, dt.make_config("masked_lora", r=R, targets=list(masks)))
    perturb(dm, std=0.2)
    dm.save(tmp_path / "adapter")
    loaded = dt.load(fresh, tmp_path / "adapter")
    state, again = dm.adapter_state_dict(), loaded.adapter_state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert again["model.layers.0.mlp.up_proj.lora_mask"].dtype == torch.bool
    batch = random_batches()[0]
    with torch.no_grad():
        assert max_diff(loaded(**batch).logits, dm(**batch).logits) == 0


# --- perp_recover ----------------------------------------------------------------------------------
def test_perp_recover_lowers_the_loss_and_keeps_the_mask(tiny_llama):
    masks = prune(tiny_llama, "magnitude", 0.5)
    norms = {p: tiny_llama.get_submodule(p).weight.detach().clone() for p in norm_layers(tiny_llama)}
    assert "model.norm" in norms and "model.layers.0.input_layernorm" in norms
    batches = random_batches()
    before = loss_on(tiny_llama, batches)
    rng = torch.random.get_rng_state()
    model = perp_recover(tiny_llama, batches, steps=30, lr=1e-2, rank=R)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded on a forked RNG
    assert model is tiny_llama and not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert loss_on(model, batches) < before - 0.1
    assert zeros_kept(model, masks)
    assert all(not torch.equal(model.get_submodule(p).weight, w) for p, w in norms.items())  # norms trained
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # as it came


def test_perp_recover_without_biases_and_norms_trains_only_the_masked_lora(tiny_gpt2):
    masks = prune(tiny_gpt2, "magnitude", 0.5)
    frozen = {k: v.clone() for k, v in tiny_gpt2.state_dict().items() if k.endswith("bias") or ".ln_" in k}
    model = perp_recover(tiny_gpt2, random_batches(), steps=5, lr=1e-2, rank=R, train_biases_and_norms=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert zeros_kept(model, masks)
    with_biases = perp_recover(model, random_batches(), steps=5, lr=1e-2, rank=R)
    assert any(not torch.equal(with_biases.state_dict()[k], v) for k, v in frozen.items() if k.endswith("attn.bias"))
    assert zeros_kept(with_biases, masks)


def test_perp_recover_bad_input_leaves_the_model_as_it_was(tiny_llama):
    with pytest.raises(ValueError, match="at least one batch"):
        perp_recover(tiny_llama, [])
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in random_batches()]
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="need labels"):
        perp_recover(tiny_llama, unlabeled, steps=2)
    assert not any(isinstance(m, DeltaLayer) for m in tiny_llama.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert perp_recover(tiny_llama, random_batches(), steps=0) is tiny_llama


def test_perp_recovers_a_pruned_minilm_on_rotten_tomatoes(make_minilm, minilm_tokenizer):
    model = make_minilm()
    rows = assets.rotten_tomatoes()
    rows = rows[:8] + rows[-8:]  # both labels
    batches = []
    for i in range(0, 16, 8):
        chunk = rows[i: i + 8]
        enc = minilm_tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=32,
                               return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([r["label"] for r in chunk])})
    masks = prune(model, "magnitude", 0.5)
    assert set(masks) == set(prune_targets(model)) and len(masks) == 6 * 6
    pruned = loss_on(model, batches)
    model = perp_recover(model, batches, steps=8, lr=2e-3, rank=R)
    assert loss_on(model, batches) < pruned
    assert zeros_kept(model, masks)
