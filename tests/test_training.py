"""Training: tasks on real models, the loop, exact resume, checkpoints, LoRA+ and the schedule."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune import assets
from deltatune.training import checkpoint
from deltatune.training.loop import Trainer, warmup_cosine
from deltatune.training.loraplus import loraplus_param_groups
from deltatune.training.recipe import load_recipe
from deltatune.training.tasks import IGNORE_INDEX, CausalLMTask

# a small, quick MiniLM run on real Rotten Tomatoes snippets
TINY = ["data.max_train=40", "data.max_eval=16", "train.batch_size=4", "train.grad_accum=2", "train.max_length=24",
        "train.steps=8", "train.eval_every=4", "train.save_every=3", "train.keep_checkpoints=3",
        "method.dropout=0.1"]  # dropout on: resume must restore the RNG state too


def run_recipe(overrides: list[str], resume: bool = False) -> Trainer:
    trainer = Trainer(load_recipe(None, overrides), resume=resume)
    trainer.setup()
    return trainer


def metric_rows(out_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in rows]


@pytest.fixture(scope="module")
def smollm2_task() -> CausalLMTask:
    return CausalLMTask(assets.smollm2_path(), max_length=64)


# --- causal LM ---------------------------------------------------------------------------------------
def test_causal_lm_labels_cover_exactly_the_response(smollm2_task):
    task = smollm2_task
    example = task.encode_one("What is the capital of France?", "Paris, of course.")
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    assert all(y == IGNORE_INDEX for y in labels[:start]) and labels[start:] == ids[start:]
    tok = task.tokenizer
    assert tok.decode(ids[:start]).endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[start:]) == "Paris, of course.<|im_end|>\n"


def test_causal_lm_truncation_keeps_label_alignment_and_drops_responseless_examples(smollm2_task, caplog):
    task = CausalLMTask(smollm2_task.model_path, max_length=40)
    long_prompt = "word " * 60  # the prompt alone is longer than max_length
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        kept = task.encode([{"prompt": "Hi", "response": "Hello " * 50}, {"prompt": long_prompt, "response": "x"}])
    assert len(kept) == 1 and "dropped 1 of 2" in caplog.text
    assert len(kept[0]["input_ids"]) == 40 and kept[0]["labels"][-1] == kept[0]["input_ids"][-1]
    batch = task.collate(task.encode([{"prompt": "a", "response": "b"}, {"prompt": "Hi", "response": "Hello " * 5}]))
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == IGNORE_INDEX).all()


def test_smollm2_lora_loss_decreases_on_a_few_examples(smollm2_task):
    task = smollm2_task
    records = [{"prompt": f"Say the number {n}.", "response": f"The number is {n}. " * 6} for n in range(4)]
    batch = task.collate(task.encode(records))  # 4 x <=64 tokens
    torch.manual_seed(0)
    model = dt.inject(task.build_model(), dt.make_config("lora", r=8, targets=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# --- classification on real data -----------------------------------------------------------------------
def test_minilm_lora_learns_rotten_tomatoes(tmp_path):
    trainer = run_recipe(["data.max_train=640", "data.max_eval=300", "train.batch_size=16", "train.max_length=48",
                          "optimizer.lr=5e-3", f"train.output_dir={tmp_path}"])
    assert trainer.total_steps == 40 and trainer.model.trainable_parameters() < 0.01 * trainer.model.total_parameters()
    result = trainer.train()
    losses = [r["loss"] for r in metric_rows(tmp_path) if "loss" in r]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert result.after["loss"] < result.before["loss"]
    assert result.after["accuracy"] > 0.62, result  # 300 held-out snippets: chance is 0.5 +- 0.03


# --- exact resume ------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_recipe([*TINY, f"train.output_dir={whole}"]).train()

    def killed_in_step_6(self):
        if self.step == 5:  # after ckpt-3 and the logged steps 4 and 5, before ckpt-6
            raise Killed
        return original(self)

    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", killed_in_step_6)
    with pytest.raises(Killed):
        run_recipe([*TINY, f"train.output_dir={parts}"]).train()
    monkeypatch.undo()
    assert max(r["step"] for r in metric_rows(parts)) == 5
    with open(parts / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the kill can cut a line short
    resumed = run_recipe([*TINY, f"train.output_dir={parts}"], resume=True)
    assert resumed.step == 3
    resumed.train()

    assert metric_rows(parts) == metric_rows(whole)
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(parts / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and any("classifier" in k for k in a)
    for key in a:
        assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_refuses_a_changed_recipe(tmp_path):
    run_recipe([*TINY, "train.steps=3", f"train.output_dir={tmp_path}"]).train()
    with pytest.raises(ValueError, match=r"different recipe \(changed: optimizer.lr\)"):
        run_recipe([*TINY, "train.steps=3", "optimizer.lr=0.01", f"train.output_dir={tmp_path}"], resume=True)


# --- checkpoints -------------------------------------------------------------------------------------
def save(root, step, keep=3, params=None):
    params = params or {"w": torch.full((2, 2), float(step))}
    opt = {"optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}, "rng": checkpoint.rng_state()}
    state = {"epoch": 0, "batch_in_epoch": step, "elapsed": 0.0, "initial_eval": None, "recipe": {}}
    return checkpoint.save_checkpoint(root, step, params, {**opt, "scheduler": {}}, state, keep)


def test_checkpoints_are_renamed_into_place_and_pruned(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-2", "ckpt-3"]
    ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt.trainer_state["step"] == 3 and ckpt.params["w"][0, 0] == 3.0
    assert ckpt.torch_state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / "ckpt-6.tmp").mkdir()  # a run killed while writing step 6
    (tmp_path / "ckpt-6.tmp" / "adapter.safetensors").write_bytes(b"partial")
    weights = tmp_path / "ckpt-4" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # torn write that survived a crash
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt.trainer_state["step"] == 2
    assert "partial checkpoint" in caplog.text and "ckpt-6.tmp" in caplog.text
    assert "invalid checkpoint" in caplog.text and "ckpt-4" in caplog.text


def test_optimizer_state_is_never_unpickled_beyond_tensors(tmp_path, caplog):
    path = save(tmp_path, 1)
    torch.save({"optimizer": {}, "payload": Killed("arbitrary object")}, path / checkpoint.TORCH_STATE)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert checkpoint.load_latest(tmp_path) is None
    assert "invalid checkpoint" in caplog.text


# --- LoRA+ and the schedule ------------------------------------------------------------------------------
def test_loraplus_gives_b_ratio_times_lr_and_every_trainable_parameter_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    dm = dt.inject(model, dt.make_config("lora", r=2, targets=["0", "2"]), train_modules=["3"])
    groups = loraplus_param_groups(dm, lr=1e-3, ratio=16, weight_decay=0.01)
    names = {id(p): n for n, p in dm.named_parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in dm.parameters() if p.requires_grad)
    assert len(grouped) == len(set(grouped))
    for group in groups:
        b = [names[id(p)].endswith("lora_B") for p in group["params"]]
        assert all(b) or not any(b)
        assert group["lr"] == pytest.approx(16e-3 if all(b) else 1e-3) and group["weight_decay"] == 0.01
    assert sum(names[i].endswith("lora_B") for i in grouped) == 2


def test_recipe_loraplus_ratio_reaches_the_optimizer(tmp_path):
    trainer = run_recipe([*TINY, "optimizer.lr=1e-3", "optimizer.loraplus_ratio=8", f"train.output_dir={tmp_path}"])
    lrs = sorted(group["initial_lr"] for group in trainer.optimizer.param_groups)
    assert lrs == pytest.approx([1e-3, 8e-3])


def test_loraplus_without_lora_b_is_an_error():
    dm = dt.inject(nn.Sequential(nn.Linear(4, 4)), dt.make_config("full", targets=["0"]))
    with pytest.raises(ValueError, match="lora_B"):
        loraplus_param_groups(dm, lr=1e-3)


def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
