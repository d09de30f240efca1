"""Structured pruning of encoder heads and FFN neurons: exact equivalence with zeroed units, counts, reload."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from deltatune.compression.lowrank import factorize
from deltatune.compression.report import count_parameters
from deltatune.compression.structured import (
    channel_units,
    gradient_importance,
    head_units,
    load_pruned,
    magnitude_importance,
    prune_channels,
    prune_heads,
    remove_channels,
    remove_heads,
    structure_summary,
)

D, HEAD, FFN = 384, 32, 1536  # MiniLM: hidden size, head size, FFN width
PER_HEAD = 3 * (D * HEAD + HEAD) + D * HEAD  # q, k, v rows with their biases, and the output columns
PER_NEURON = (D + 1) + D  # an up row with its bias, and a down column


def zero_outputs(model, heads: dict[int, list[int]], channels: dict[int, list[int]]) -> None:
    """Silence units without removing them: zero the consumer columns that read them."""
    with torch.no_grad():
        for units, chosen in ((head_units(model), heads), (channel_units(model), channels)):
            for layer, removed in chosen.items():
                u = units[layer]
                for unit in removed:
                    u.consumer.weight[:, unit * u.size : (unit + 1) * u.size] = 0


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=8, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


TINY_BATCH = {"input_ids": torch.tensor([[1, 5, 7, 9, 2], [1, 8, 3, 2, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]), "labels": torch.tensor([1, 0])}


# --- removal is exact -------------------------------------------------------------------------------
def test_removing_heads_and_neurons_equals_zeroing_them_on_minilm(make_minilm, minilm_batch):
    heads = {0: [1, 5], 3: [0, 7, 11], 5: [2]}
    channels = {1: list(range(0, 1536, 3)), 4: [10, 20, 30]}
    reference = make_minilm()
    zero_outputs(reference, heads, channels)
    model = make_minilm()
    before = count_parameters(model)
    remove_heads(model, heads)
    remove_channels(model, channels)
    assert before - count_parameters(model) == 6 * PER_HEAD + (512 + 3) * PER_NEURON
    assert_close(model(**minilm_batch).logits, reference(**minilm_batch).logits)
    summary = structure_summary(model)
    assert summary["heads"] == [10, 12, 12, 9, 12, 11]
    assert summary["ffn_neurons"] == [FFN, FFN - 512, FFN, FFN, FFN - 3, FFN]
    attention = model.bert.encoder.layer[3].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (9, 288, 288)
    assert type(attention.query) is torch.nn.Linear  # sliced in place, not rebuilt
    assert model.config.intermediate_size == FFN  # widths differ per layer: the config cannot say one


def test_the_remaining_units_keep_their_weights(make_minilm):
    model, original = make_minilm(), make_minilm()
    remove_heads(model, {2: [0]})
    kept = original.bert.encoder.layer[2].attention.self.value.weight[HEAD:]
    assert torch.equal(model.bert.encoder.layer[2].attention.self.value.weight, kept)


def test_pruning_by_fraction_removes_that_many_units_per_layer(make_minilm, minilm_batch):
    model = make_minilm()
    before = count_parameters(model)
    removed_heads = prune_heads(model, 0.25)
    removed_channels = prune_channels(model, 0.5)
    assert all(len(v) == 3 for v in removed_heads.values()) and len(removed_heads) == 6
    assert all(len(v) == 768 for v in removed_channels.values())
    assert before - count_parameters(model) == 6 * (3 * PER_HEAD + 768 * PER_NEURON)
    assert model.config.intermediate_size == 768  # uniform width: the config follows
    assert torch.isfinite(model(**minilm_batch).logits).all()


# --- importance -----------------------------------------------------------------------------------------
def test_magnitude_importance_is_the_norm_of_the_weights_a_unit_owns():
    model = tiny_bert()
    units = head_units(model)[0]  # 4 heads of size 4
    q, k, v = units.producers
    h = 2
    rows = slice(h * 4, (h + 1) * 4)
    by_hand = (q.weight[rows].pow(2).sum() + k.weight[rows].pow(2).sum() + v.weight[rows].pow(2).sum()
               + units.consumer.weight[:, rows].pow(2).sum()).sqrt()
    assert magnitude_importance(units)[h].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_the_weakest_head_is_the_one_removed():
    model = tiny_bert()
    units = head_units(model)[1]
    with torch.no_grad():
        for linear in units.producers:
            linear.weight[4:8] *= 0.01  # head 1 of layer 1
        units.consumer.weight[:, 4:8] *= 0.01
    assert prune_heads(model, 0.25)[1] == [1]


def test_gradient_importance_is_zero_for_a_silent_head_and_needs_labels():
    model = tiny_bert()
    zero_outputs(model, {0: [3]}, {1: [5]})
    heads, channels = (gradient_importance(model, units(model), [TINY_BATCH]) for units in (head_units, channel_units))
    assert heads[0][3] == 0 and (heads[0][:3] > 0).all()
    assert channels[1][5] == 0 and channels[1].sum() > 0
    assert prune_heads(model, 0.25, importance="gradient", batches=[TINY_BATCH])[0] == [3]
    unlabelled = {k: v for k, v in TINY_BATCH.items() if k != "labels"}
    with pytest.raises(ValueError, match="labelled batches"):
        gradient_importance(model, head_units(model), [unlabelled])
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_heads(model, 0.25, importance="gradient")


def test_gradient_importance_is_the_sum_of_per_example_gate_gradients():
    model = tiny_bert()
    both = gradient_importance(model, head_units(model), [TINY_BATCH])
    halves = [{k: v[i : i + 1] for k, v in TINY_BATCH.items()} for i in range(2)]
    # the loss is a batch mean, so one example alone has twice the weight of the same example in a pair
    separate = gradient_importance(model, head_units(model), halves)
    for b, s in zip(both, separate):
        assert_close(2 * b, s, rtol=1e-4, atol=1e-6)


# --- errors -----------------------------------------------------------------------------------------------
def test_bad_requests_are_refused(tiny_llama):
    model = tiny_bert()
    with pytest.raises(ValueError, match="keep at least one"):
        remove_heads(model, {0: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="out of range"):
        remove_heads(model, {5: [0]})
    with pytest.raises(ValueError, match="out of range"):
        remove_channels(model, {0: [8]})
    with pytest.raises(ValueError, match="fraction"):
        prune_heads(model, 0.1)  # rounds to no head of 4
    with pytest.raises(ValueError, match="'llama'"):
        prune_heads(tiny_llama, 0.25)
    factorize(model, rank=1)
    with pytest.raises(ValueError, match="before a low-rank factorisation"):
        prune_heads(model, 0.25)


# --- save and reload ----------------------------------------------------------------------------------------
def test_a_head_and_neuron_pruned_minilm_saves_and_reloads(make_minilm, minilm_batch, tmp_path):
    model = make_minilm()
    prune_heads(model, 0.25)
    remove_channels(model, {0: [1, 2, 3]})
    model.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)
    assert structure_summary(reloaded) == structure_summary(model)
    assert_close(reloaded(**minilm_batch).logits, model(**minilm_batch).logits, rtol=1e-5, atol=1e-6)


def test_uniform_neuron_pruning_reloads_with_from_pretrained(tmp_path):
    model = tiny_bert()
    prune_channels(model, 0.5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: v for k, v in TINY_BATCH.items() if k != "labels"}
    assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)
