"""`deltatune prune` / `deltatune compress` end to end, their configs and data split, and the report metrics."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import max_diff
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from deltatune import assets
from deltatune.cli.compress import load_prune_data, split_held_out, text_records
from deltatune.cli.main import main
from deltatune.compression.config import (
    STEPS,
    LowRankStep,
    apply_indexed_override,
    load_prune_config,
    validate_prune_config,
)
from deltatune.compression.lowrank import LowRankLinear
from deltatune.compression.report import CompressionReport, ModelStats, accuracy, perplexity
from deltatune.compression.structured import load_pruned, structure_summary
from deltatune.training.recipe import builtin_recipe

EXAMPLE = builtin_recipe("prune_smollm2_wanda")


def run(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process `deltatune` call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "prune.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 4-block Llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- config -----------------------------------------------------------------------------------------
def test_the_example_config_is_valid_and_round_trips():
    cfg = load_prune_config(EXAMPLE)
    assert cfg.name == "prune_smollm2_wanda" and cfg.steps[0].method == "wanda" and cfg.steps[0].sparsity == 0.5
    assert validate_prune_config(yaml.safe_load(cfg.to_yaml())) == cfg
    changed = load_prune_config(EXAMPLE, ["steps.0.sparsity=0.3", "recover.steps=5", "calibration.n_samples=4"])
    assert (changed.steps[0].sparsity, changed.recover.steps, changed.calibration.n_samples) == (0.3, 5, 4)


def test_prune_help_lists_every_registered_step_method(capsys, monkeypatch):
    """The list comes from STEPS, so a step method registered later appears without touching the CLI."""
    assert main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    rows = [line.strip() for line in text.splitlines() if ": " in line and not line.strip().startswith("options")]
    listed = {name for row in rows for name in row.split(": ")[0].split(", ")}
    assert set(STEPS) <= listed
    assert "options: rank, energy, targets, exclude" in text  # each step type's own options
    monkeypatch.setitem(STEPS, "svd_new", LowRankStep)
    assert main(["prune", "--help"]) == 0
    assert "lowrank, svd_new: Replace linear layers" in capsys.readouterr().out


def test_indexed_overrides_reach_list_entries_and_fail_clearly():
    data = {"steps": [{"method": "magnitude"}, {"method": "shortgpt"}]}
    apply_indexed_override(data, "steps.1.n_layers=2")
    apply_indexed_override(data, "output.path=out")
    assert data == {"steps": [{"method": "magnitude"}, {"method": "shortgpt", "n_layers": 2}],
                    "output": {"path": "out"}}
    with pytest.raises(ValueError, match="no mapping at position 5"):
        apply_indexed_override(data, "steps.5.sparsity=0.1")


@pytest.mark.parametrize(("override", "message"), [
    ("steps.0.method=wandaa", "unknown method 'steps.0.method=wandaa'; did you mean 'wanda'?"),
    ("steps.0.sparsty=0.3", "unknown key 'steps.0.sparsty'; did you mean 'steps.0.sparsity'?"),
    ("calibraton.n_samples=4", "unknown key 'calibraton'; did you mean 'calibration'?"),
    ("evaluation.n_text=4", "unknown key 'evaluation.n_text'; did you mean 'evaluation.n_texts'?"),
    ("calibration.dataset=null", "step 0 (wanda) needs calibration data: set calibration.dataset"),
    ("steps.0.sparsity=1.5", "invalid value 1.5 for 'steps.0.sparsity'"),
])
def test_bad_configs_exit_2_with_the_fix(override, message):
    code, out, err = run("prune", str(EXAMPLE), override)
    assert code == 2 and message in err and "deltatune prune: error:" in err


def test_step_options_are_checked():
    base = {"calibration": {"dataset": "chatterbot"}}
    for step, message in (({"method": "shortgpt"}, "exactly one of n_layers or fraction"),
                          ({"method": "lowrank", "rank": 4, "energy": 0.9}, "exactly one of rank or energy"),
                          ({"method": "heads"}, "steps.0.fraction"),
                          ({"sparsity": 0.5}, "unknown method")):
        with pytest.raises(ValueError, match=message):
            validate_prune_config({**base, "steps": [step]})
    with pytest.raises(ValueError, match="recover.steps=3 trains on calibration data"):
        validate_prune_config({"steps": [{"method": "magnitude"}], "recover": {"steps": 3}})


# --- data -------------------------------------------------------------------------------------------
def test_calibration_and_evaluation_texts_never_overlap():
    records = [{"text": f"t{i % 50}"} for i in range(80)]  # 30 duplicates
    pool, held = split_held_out(records, None, 10, seed=0)
    assert len(held) == 10 and len(pool) == 40 and not {r["text"] for r in pool} & {r["text"] for r in held}
    assert split_held_out(records, None, 10, seed=0) == (pool, held)  # deterministic
    assert split_held_out(records, None, 10, seed=1)[1] != held
    other = [{"text": f"t{i}"} for i in range(5)] + [{"text": "new"}]
    pool, held = split_held_out(records, other, 6, seed=0)
    assert len(held) == 6 and not {r["text"] for r in pool} & {r["text"] for r in held} and len(pool) == 45
    with pytest.raises(ValueError, match="leaves no calibration data"):
        split_held_out(records, None, 50, seed=0)


def test_builtin_datasets_give_texts_and_labels():
    chat = text_records("chatterbot", "text", None)
    first = assets.chatterbot()[0]
    assert chat[0]["text"] == f"{first['prompt']}\n{first['response']}"
    cfg = validate_prune_config({"model": {"path": "minilm", "task": "classification"},
                                 "calibration": {"dataset": "rotten_tomatoes"}, "evaluation": {"n_texts": 100},
                                 "steps": [{"method": "heads", "fraction": 0.25}]})
    pool, held, labels = load_prune_data(cfg)
    assert labels == ["0", "1"] and len(held) == 100 and {r["label"] for r in held} == {0, 1}
    assert not {r["text"] for r in pool} & {r["text"] for r in held}
    with pytest.raises(ValueError, match="did you mean 'text'"):
        text_records("rotten_tomatoes", "txt", None)


# --- report metrics ------------------------------------------------------------------------------------
class FixedLogits(nn.Module):
    """A 'model' whose logits ignore the input: the same row for every position (or every example)."""

    def __init__(self, row: torch.Tensor, per_token: bool = True):
        super().__init__()
        self.row = nn.Parameter(row)
        self.per_token = per_token

    def forward(self, input_ids, attention_mask=None, **kwargs):
        shape = input_ids.shape if self.per_token else input_ids.shape[:1]
        return SimpleNamespace(logits=self.row.expand(*shape, -1))


class CharTokenizer:
    """Token id = character code - 97 ('a' = 0); enough for a perplexity by hand."""

    def __call__(self, texts, truncation=True, max_length=None):
        return {"input_ids": [[ord(c) - 97 for c in t][:max_length] for t in texts]}


def test_perplexity_by_hand():
    log_p = torch.log(torch.tensor([0.5, 0.25, 0.25]))  # p(a), p(b), p(c) at every position
    model = FixedLogits(log_p)
    # predicted tokens: "ab" -> b; "cab" -> a, b; "a" has nothing to predict and is skipped
    nll = -(math.log(0.25) + math.log(0.5) + math.log(0.25))
    for batch_size in (1, 2, 8):
        value = perplexity(model, CharTokenizer(), ["ab", "cab", "a"], batch_size=batch_size)
        assert value == pytest.approx(math.exp(nll / 3))
    assert perplexity(model, CharTokenizer(), ["abcc"], seq_len=2) == pytest.approx(4.0)  # only "b" counts
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(model, CharTokenizer(), ["a"])


def test_perplexity_matches_the_model_loss(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert perplexity(model, tokenizer, [text]) == pytest.approx(math.exp(model(ids, labels=ids).loss.item()),
                                                                rel=1e-5)


def test_accuracy_counts_argmax_hits():
    model = FixedLogits(torch.tensor([0.1, 0.9]), per_token=False)  # always predicts class 1
    batches = [{"input_ids": torch.zeros(3, 2, dtype=torch.long), "labels": torch.tensor([1, 0, 1])},
               {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([1])}]
    assert accuracy(model, batches) == 0.75


def test_report_renders_every_number():
    report = CompressionReport("m", ModelStats(100, 100, 400, 2**20), ModelStats(60, 50, 240, 2**19), ["step one"],
                               "perplexity", {"before": 10.0, "after": 12.0, "after recovery": 11.0},
                               {"a": 0.5, "b": 0.25}, ["a note"])
    rows = {row[0]: row[1:] for row in report.rows()}
    assert rows["parameters"] == ("100", "60", "-40.0%")
    assert rows["size on disk"] == ("1.0 MiB", "0.5 MiB", "-50.0%")
    assert rows["perplexity (after recovery)"] == ("10.0000", "11.0000", "+10.0%")
    markdown = report.to_markdown()
    assert "1. step one" in markdown and "| b | 0.250 |" in markdown and "mean 0.375" in markdown
    assert json.loads(json.dumps(report.to_dict()))["quality"]["after"] == 12.0


# --- end to end ------------------------------------------------------------------------------------------
def test_prune_a_causal_lm_end_to_end(tiny_lm, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, {
        "name": "tiny", "model": {"path": str(tiny_lm), "task": "causal_lm"},
        "calibration": {"dataset": "chatterbot", "n_samples": 8, "seq_len": 32, "batch_size": 4},
        "evaluation": {"n_texts": 16, "seq_len": 32},
        "steps": [{"method": "shortgpt", "n_layers": 1}, {"method": "wanda", "sparsity": 0.5}],
        "output": {"path": str(out)},
    })
    code, stdout, err = run("prune", str(config))
    assert code == 0, err
    assert "shortgpt: removed layers" in stdout and "perplexity (after)" in stdout
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert set(report["quality"]) == {"before", "after"} and after["parameters"] < before["parameters"]
    # Wanda zeroed weights beyond those that left with the removed block
    assert after["parameters"] - after["nonzero"] > 10_000 and max(report["sparsity"].values()) >= 0.45
    assert (out / "report.md").is_file() and load_prune_config(out / "prune_config.yaml").name == "tiny"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and AutoTokenizer.from_pretrained(out) is not None

    code, _, err = run("prune", str(config))
    assert code == 2 and "not empty" in err
    code, stdout, err = run("prune", str(config), "output.overwrite=true", "steps.1.method=magnitude",
                            "recover.steps=2")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][1].startswith("magnitude") and report["steps"][2].startswith("PERP recovery: 2 steps")
    assert set(report["quality"]) == {"before", "after", "after recovery"} and "after recovery" in stdout
    assert min(report["sparsity"].values()) >= 0.45  # recovery keeps the pruned weights at zero
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_prune_an_encoder_by_heads_and_neurons(tmp_path, minilm_batch):
    out = tmp_path / "minilm"
    config = write_config(tmp_path, {
        "model": {"path": "minilm", "task": "classification"},
        "calibration": {"dataset": "rotten_tomatoes", "n_samples": 8, "seq_len": 32},
        "evaluation": {"n_texts": 16, "seq_len": 32},
        "steps": [{"method": "heads", "fraction": 0.25, "importance": "gradient"},
                  {"method": "channels", "fraction": 0.5}],
        "output": {"path": str(out)},
    })
    code, stdout, err = run("prune", str(config))
    assert code == 0, err
    assert "accuracy (after)" in stdout and "load_pruned" in stdout
    model = load_pruned(out)
    assert structure_summary(model) == {"heads": [9] * 6, "ffn_neurons": [768] * 6}
    assert model(**minilm_batch).logits.shape == (4, 2)


def test_compress_lowrank_writes_a_factorised_model(tiny_lm, tmp_path):
    out = tmp_path / "low"
    code, stdout, err = run("compress", str(tiny_lm), "--lowrank-rank", "4", "--out", str(out))
    assert code == 0, err
    assert "28 of 28 layers factorised" in stdout
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    model = load_pruned(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert max_diff(model(ids).logits, reference(ids).logits) > 0  # rank 4 of 32 is an approximation
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["flops_per_token"] < report["before"]["flops_per_token"]
    code, _, err = run("compress", str(tiny_lm), "--lowrank-energy", "0.9", "--base", "x", "--out", str(out))
    assert code == 2 and "--base is only read by --compeft" in err


def test_compress_compeft_compresses_a_fine_tuning_delta(tiny_lm, tmp_path):
    finetuned = tmp_path / "ft"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(finetuned)
    code, stdout, err = run("compress", str(finetuned), "--compeft", "0.1", "--base", str(tiny_lm),
                            "--out", str(tmp_path / "delta"))
    assert code == 0, err
    assert "ComPEFT (density 0.1" in stdout and (tmp_path / "delta" / "compeft_config.json").is_file()


def test_compress_needs_exactly_one_method(tiny_lm, tmp_path):
    code, _, err = run("compress", str(tiny_lm), "--out", str(tmp_path / "x"))
    assert code == 2 and "one of the arguments" in err
    code, _, err = run("compress", str(tiny_lm), "--lowrank-rank", "2", "--compeft", "0.1", "--out", "x")
    assert code == 2 and "not allowed with" in err


@pytest.mark.slow
def test_the_example_config_runs_on_smollm2(tmp_path):
    code, stdout, err = run("prune", str(EXAMPLE), f"output.path={tmp_path / 'out'}")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quality"]["after"] > report["quality"]["before"]  # pruning half the weights costs perplexity
    assert len(report["sparsity"]) == 30 * 7 and all(abs(v - 0.5) < 0.01 for v in report["sparsity"].values())
