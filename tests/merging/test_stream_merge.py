"""merge_adapter_streaming: layer by layer from the base checkpoint, equal to the in-memory merge_and_unload.

Real MiniLM (a sequence classifier over a base saved as BertModel: the 'bert.' prefix, a new head trained as a
train module) and real SmolLM2 (a causal LM with tied embeddings), each saved in several small shards.
"""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch
from helpers import assert_close, perturb
from test_all_methods import CASES
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import deltatune as dt
from deltatune import assets
from deltatune.bench.measure import PeakRSS
from deltatune.merging.checkpoint import INDEX_NAME, CheckpointReader, save_checkpoint
from deltatune.merging.stream_merge import merge_adapter_streaming

TEXTS = ["A warm, funny film.", "Dull and far too long."]
# the five the issue names, two more with shared or structured deltas; the rest run in the slow sweep below
METHODS = {"lora": {"r": 4}, "dora": {"r": 4}, "ia3": {"feedforward": ["value"]}, "oft": {"block_size": 32},
           "vera": {"r": 16}, "vblora": {"r": 2, "num_vectors": 16, "vector_length": 32}, "lokr": {"r": 2}}


@pytest.fixture(scope="module")
def minilm_base(tmp_path_factory):
    """MiniLM's encoder saved as BertModel in shards of at most 20 MB, with its tokenizer."""
    folder = tmp_path_factory.mktemp("minilm-base")
    AutoModel.from_pretrained(assets.minilm_path()).save_pretrained(folder, max_shard_size="20MB")
    AutoTokenizer.from_pretrained(assets.minilm_path()).save_pretrained(folder)
    return folder


def classifier_adapter(base, method, options, folder, train_modules=("classifier",)):
    """(DeltaModel, its saved folder): `method` on query/value of a 2-label classifier, trained-looking weights."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    dm = dt.inject(model, dt.make_config(method, targets=["query", "value"], **options),
                   train_modules=list(train_modules) or None)
    perturb(dm, std=0.02)
    dm.eval().save(folder)
    return dm, folder


def assert_same_model(merged, reference, batch):
    """Every tensor and the outputs of `merged` equal those of the in-memory merge."""
    got, want = merged.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    with torch.no_grad():
        assert_close(merged(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_streaming_merge_equals_the_in_memory_merge_on_minilm(method, minilm_base, tmp_path):
    dm, adapter = classifier_adapter(minilm_base, method, METHODS[method], tmp_path / "adapter")
    out = merge_adapter_streaming(minilm_base, adapter, tmp_path / "merged", max_shard_size="20MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    assert "bert.encoder.layer.0.attention.self.query.weight" in index["weight_map"]  # the task model's names
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # transformers alone
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    assert merged.config.num_labels == 2
    assert_same_model(merged, dm.merge_and_unload().eval(), batch)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in CASES if dt.get_method(m).delta.mergeable])
def test_every_mergeable_method_streams_exactly(method, minilm_base, tmp_path):
    options = {"feedforward": ["value"]} if method == "ia3" else CASES[method].options
    dm, adapter = classifier_adapter(minilm_base, method, options, tmp_path / "adapter")
    out = merge_adapter_streaming(minilm_base, adapter, tmp_path / "merged", max_shard_size="20MB")
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    assert_same_model(AutoModelForSequenceClassification.from_pretrained(out).eval(),
                      dm.merge_and_unload().eval(), batch)


IDS = torch.tensor([[1, 42, 7, 99, 1000, 5]])


def smollm2_adapter(targets, folder):
    """(DeltaModel, adapter folder): LoRA r=8 with trained-looking weights on real SmolLM2-135M."""
    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_path(), dtype=torch.float32)
    dm = dt.inject(model, dt.make_config("lora", r=8, targets=targets))
    perturb(dm, std=0.02)
    dm.eval().save(folder)
    return dm, folder


def test_smollm2_merge_keeps_tied_embeddings_as_in_memory(tmp_path):
    """LoRA on SmolLM2's tied embedding: the merged table serves both ends, as merge_and_unload leaves it."""
    dm, adapter = smollm2_adapter(["embed_tokens", "q_proj"], tmp_path / "adapter")
    out = merge_adapter_streaming(assets.smollm2_path(), adapter, tmp_path / "merged", max_shard_size="100MB")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert "lm_head.weight" not in json.loads((out / INDEX_NAME).read_text())["weight_map"]
    reference = dm.merge_and_unload().eval()
    assert_close(merged.model.embed_tokens.weight, reference.model.embed_tokens.weight, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert_close(merged(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_smollm2_streaming_merge_never_holds_the_model(tmp_path):
    """LoRA on all seven projections of every SmolLM2 block: the merge's peak memory above its start stays under
    half the base's bytes (it holds one layer and its ΔW, a block of a copied tensor, the adapter), and the
    merged model computes what base + adapter computes."""
    dm, adapter = smollm2_adapter(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  tmp_path / "adapter")
    with torch.no_grad():
        want = dm(input_ids=IDS).logits
    del dm
    gc.collect()
    base = assets.smollm2_path()
    with PeakRSS() as rss:
        out = merge_adapter_streaming(base, adapter, tmp_path / "merged", max_shard_size="100MB")
    base_bytes = CheckpointReader(base).nbytes
    assert rss.excess < base_bytes / 2, f"peak {rss.excess / 1e6:.0f} MB above start, base {base_bytes / 1e6:.0f} MB"
    assert len(list(out.glob("model-*.safetensors"))) >= 5
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
    assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["houlsby", "sira"])
def test_an_activation_adapter_is_refused(method, minilm_base, tmp_path):
    """A bottleneck adapter (family 'adapters', at BERT's default sites) and SiRA's routed experts."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_base, num_labels=2)
    options = {"targets": ["query", "value"], **CASES["sira"].options} if method == "sira" else {"bottleneck": 8}
    dt.inject(model, dt.make_config(method, **options), train_modules=["classifier"]).save(tmp_path / "adapter")
    with pytest.raises(ValueError, match=f"\\({method}\\) changes activations, not weights, so it cannot be merged"):
        merge_adapter_streaming(minilm_base, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_base_lacking_a_targets_tensors_is_refused(minilm_base, tmp_path):
    _, adapter = classifier_adapter(minilm_base, "lora", {"r": 4}, tmp_path / "adapter")
    reader = CheckpointReader(minilm_base)
    lacking = tmp_path / "lacking"
    save_checkpoint(lacking, {k: reader.read(k) for k in reader.keys() if k != "encoder.layer.3.attention.self.value.weight"})
    shutil.copyfile(minilm_base / "config.json", lacking / "config.json")
    with pytest.raises(ValueError, match=r"lacks tensors of the adapted layer 'bert.encoder.layer.3.attention.self.value'"):
        merge_adapter_streaming(lacking, adapter, tmp_path / "merged")


def test_another_base_is_refused_by_fingerprint(minilm_base, tmp_path):
    _, adapter = classifier_adapter(minilm_base, "lora", {"r": 4}, tmp_path / "adapter")
    reader = CheckpointReader(minilm_base)
    other = tmp_path / "other"
    save_checkpoint(other, {k: reader.read(k) * (1.5 if "layer.0.attention.self.query" in k else 1) for k in reader.keys()})
    shutil.copyfile(minilm_base / "config.json", other / "config.json")
    with pytest.raises(ValueError, match="was saved for another base model.*layer 'bert.encoder.layer.0.attention.self.query'"):
        merge_adapter_streaming(other, adapter, tmp_path / "merged")


def test_a_new_head_the_adapter_does_not_hold_is_refused(minilm_base, tmp_path):
    """Without train_modules the classifier exists only as a random init in memory: nothing to stream it from."""
    _, adapter = classifier_adapter(minilm_base, "lora", {"r": 4}, tmp_path / "adapter", train_modules=())
    with pytest.raises(ValueError, match=r"lacks 2 tensors .*classifier.*--no-stream"):
        merge_adapter_streaming(minilm_base, adapter, tmp_path / "merged")


def test_two_adapted_layers_sharing_a_tied_tensor_are_refused(tiny_llama, tmp_path):
    tiny_llama.config.tie_word_embeddings = True
    tiny_llama.tie_weights()
    tiny_llama.save_pretrained(tmp_path / "base")
    dm = dt.inject(tiny_llama, dt.make_config("lora", r=2, targets=["embed_tokens", "lm_head"]))
    dm.save(tmp_path / "adapter")
    with pytest.raises(ValueError, match="share the tensor 'model.embed_tokens.weight' .*--no-stream"):
        merge_adapter_streaming(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
