"""Data-parallel training: 2 gloo processes under torchrun equal one process with the same global batch.

A tiny BERT (2 layers, hidden 32, dropout off so that one process and two see the same function) with
MiniLM's tokenizer trains on 11 Rotten Tomatoes snippets in batches of 5, 2 micro-batches a step: every epoch
ends with a batch of 1, so the 2 ranks get slices of 3 and 2 rows, and 1 and none (a weight-0 stand-in).
Two torchrun launches run every case (tests/distributed_worker.py); the single-process references run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from distributed_worker import record_first_gradients
from helpers import assert_close
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import deltatune as dt
from deltatune import assets
from deltatune.training import distributed
from deltatune.training.loop import Trainer
from deltatune.training.recipe import load_recipe

TESTS = Path(__file__).resolve().parent
SRC = Path(dt.__file__).resolve().parents[1]
BASE = ["data.max_train=11", "data.max_eval=8", "train.batch_size=5", "train.grad_accum=2", "train.steps=4",
        "train.max_length=16", "optimizer.lr=1e-2", "method.targets=[query,value]"]
METHODS = {  # the adapter-side cases: plain LoRA, and parameters that some steps leave unused
    "lora": [],
    "dylora": ["method.name=dylora", "method.r=4"],  # a rank drawn per step (a step hook): rows past it stay out
    "lokr": ["method.name=lokr", "method.module_dropout=0.5"],  # whole deltas skipped in some forwards
    "sira": ["method.name=sira", "method.expert_dropout=0.2"],  # routed experts, dropout on the gate
    # an adapter-wide trainable tensor (the vector bank, in DeltaModel.shared) used by every layer
    "vblora": ["method.name=vblora", "method.num_vectors=16", "method.vector_length=8"],
}
# dropout on, checkpoints every 2 steps: the kill/resume case needs every rank's RNG state back
RESUMED = ["train.steps=6", "train.save_every=2", "method.dropout=0.1", "method.name=lora"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # a method section with nothing but LoRA's name and targets, so that other methods' names apply over it
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"method": {"name": "lora", "targets": ["query", "value"]}}))
    return folder


def overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", *BASE, *extra, f"train.output_dir={out}"]


def recipe(model: Path, out: Path, *extra: str):
    return load_recipe(model / "recipe.yaml", overrides(model, out, *extra))


def torchrun(job: dict, folder: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Launch the worker as 2 processes; the job's report comes back in `job["report"]`."""
    spec = folder / f"job-{len(list(folder.glob('job-*')))}.json"
    spec.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--monitor-interval", "0.2",
                           str(TESTS / "distributed_worker.py"), str(spec)],
                          env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def single_process(model: Path, out: Path, *extra: str) -> Path:
    """Train in this process; the run folder, with the first step's gradients in grads.safetensors."""
    trainer = Trainer(recipe(model, out, *extra))
    trainer.setup()
    record_first_gradients(trainer, str(out.parent / f"{out.name}-grads.safetensors"))
    return trainer.train().adapter_dir.parent


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter.safetensors")


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def launched(tiny_bert, tmp_path_factory):
    """(folder, report by case) of two launches: first a run whose rank 1 dies (SIGKILL) before step 3 (torchrun
    then stops rank 0); then its `--resume`, every method under ddp and fsdp, and the uninterrupted resume case."""
    folder = tmp_path_factory.mktemp("distributed")
    job = {"recipe": str(tiny_bert / "recipe.yaml"),
           "overrides": overrides(tiny_bert, folder / "resume-killed", "train.distributed=ddp", *RESUMED)}
    killed = torchrun({"runs": [{**job, "kill_rank": 1, "kill_at": 3}], "report": str(folder / "killed.json")},
                      folder, check=False)
    killed_run = folder / "resume-killed"
    assert killed.returncode != 0 and not (killed_run / "adapter").exists(), killed.stderr[-3000:]
    assert sorted(p.name for p in (killed_run / "checkpoints").iterdir()) == ["ckpt-2"]
    cases = {f"{mode}-{name}": overrides(tiny_bert, folder / f"{mode}-{name}", f"train.distributed={mode}", *extra)
             for mode in ("ddp", "fsdp") for name, extra in METHODS.items()}
    runs = [{"recipe": str(tiny_bert / "recipe.yaml"), "overrides": o, "grads": str(folder / f"{case}-grads.safetensors")}
            for case, o in cases.items()]
    cases["resume-reference"] = overrides(tiny_bert, folder / "resume-reference", "train.distributed=ddp", *RESUMED)
    report = folder / "report.json"
    runs += [{"recipe": str(tiny_bert / "recipe.yaml"), "overrides": cases["resume-reference"]}, {**job, "resume": True}]
    cases["resume-killed"] = job["overrides"]
    torchrun({"runs": runs, "report": str(report)}, folder)
    return folder, dict(zip(cases, json.loads(report.read_text())))


# slices of 3 and 2 rows sum in another order than 5 rows: float32 rounding, relative to each tensor's largest entry
RTOL = {"ddp": 1e-6, "fsdp": 1e-6}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", ["lora", "dylora", "lokr", "vblora"])
def test_two_processes_equal_one(launched, tiny_bert, tmp_path, mode, name):
    """Same global batch, same data order: the first step's gradients (to 1e-6), every logged loss and the adapter
    after 4 steps equal one process's.
    LoKr's module dropout draws one number per module and forward, the same on every rank (same seed, and no
    other draw depends on a rank's slice), so its skipped deltas match one process's too."""
    folder, report = launched
    one = single_process(tiny_bert, tmp_path / "one", *METHODS[name])
    two = folder / f"{mode}-{name}"
    for what, expected, actual, rtol in [
        ("gradient", load_file(tmp_path / "one-grads.safetensors"), load_file(f"{two}-grads.safetensors"), RTOL[mode]),
        # Adam divides by sqrt(v): its first steps move every entry by about lr whatever the gradient's size, so
        # rounding in small gradients reaches the weights (seen: up to 1.6e-5 of lora_B's largest entry)
        ("adapter after 4 steps", adapter(one), adapter(two), 50 * RTOL[mode]),
    ]:
        assert expected.keys() == actual.keys()
        for key in expected:
            assert_close(actual[key], expected[key], rtol=rtol, atol=0.0, msg=f"{mode} {name} {what} {key}")
    assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=RTOL[mode], atol=0.0)
    assert report[f"{mode}-{name}"]["replica_drift"] == 0.0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_routed_experts_train_and_stay_in_sync(launched, mode):
    """SiRA's capacity and gate dropout depend on each rank's own tokens, so it need not equal one process;
    what must hold is that training ran, moved the experts, and left the replicas identical."""
    folder, report = launched
    state = adapter(folder / f"{mode}-sira")
    assert any(k.endswith("sira_B") and t.abs().max() > 0 for k, t in state.items())  # B starts at zero
    assert report[f"{mode}-sira"]["replica_drift"] == 0.0
    assert all(np.isfinite(losses(folder / f"{mode}-sira")))


def test_fsdp_halves_the_base_per_rank(launched):
    """Under FSDP each rank holds half of every frozen base tensor (rounded up per tensor); DDP holds it all."""
    _, report = launched
    ddp, fsdp = report["ddp-lora"]["base_bytes"], report["fsdp-lora"]["base_bytes"]
    assert ddp[0] == ddp[1]
    for part in fsdp:
        assert 0.5 * ddp[0] <= part <= 0.5 * ddp[0] * 1.01
    assert sum(fsdp) >= ddp[0]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank_zero_alone_writes(launched, tiny_bert, mode):
    """One metrics row per step and evaluation (not one per rank), the lock released, and an adapter that loads
    onto the unsharded base (FSDP saves the replicated adapter as it is: nothing of the base is gathered)."""
    folder, _ = launched
    run = folder / f"{mode}-lora"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 + 2
    assert not (run / ".deltatune.lock").exists()
    dt.load(BertForSequenceClassification.from_pretrained(tiny_bert), run / "adapter")


def test_killed_rank_then_resume_equals_uninterrupted(launched):
    """Rank 1 died before step 3 (the fixture checks that only the step-2 checkpoint was left); `--resume` on both
    ranks restores adapter, optimizer and every rank's RNG state (dropout is on) and ends bitwise equal to the
    uninterrupted run."""
    folder, report = launched
    run = folder / "resume-killed"
    expected, actual = adapter(folder / "resume-reference"), adapter(run)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert losses(run) == losses(folder / "resume-reference")
    assert report["resume-killed"]["replica_drift"] == 0.0


# --- in-process pieces ---------------------------------------------------------------------------
def test_rank_share_weights_give_the_global_mean():
    """Weighted slice means averaged over ranks equal the mean over the whole batch's loss terms."""
    rng = np.random.default_rng(0)
    examples = [{"terms": int(n), "loss": float(x)} for n, x in zip(rng.integers(1, 9, 7), rng.random(7))]
    def count(rows):
        return sum(r["terms"] for r in rows)
    world = 3
    global_mean = sum(r["terms"] * r["loss"] for r in examples) / count(examples)
    total = 0.0
    for rank in range(world):
        mine, weight = distributed.rank_share(examples, count, distributed.Group(rank=rank, world=world))
        total += weight * sum(r["terms"] * r["loss"] for r in mine) / count(mine) / world
    assert total == pytest.approx(global_mean, rel=1e-12)
    mine, weight = distributed.rank_share(examples[:2], count, distributed.Group(rank=2, world=3))
    assert weight == 0.0 and len(mine) == 1  # no rows left for rank 2: a stand-in that adds nothing


def test_one_process_setting_refuses_a_launched_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="train.distributed=ddp or train.distributed=fsdp"):
        distributed.init("none")


def test_blocks_are_the_layers_not_the_adapter(tiny_bert):
    model = dt.inject(BertForSequenceClassification.from_pretrained(tiny_bert),
                      dt.make_config("loretta_adp", targets=["query"]))
    found = distributed.blocks(model.model)
    assert found == list(model.model.bert.encoder.layer)


def test_merge_of_an_fsdp_trained_adapter_writes_a_sharded_checkpoint(launched, tiny_bert, tmp_path):
    """`merge-adapter --max-shard-size` on the adapter an FSDP run saved: safetensors shards plus an index that
    transformers loads alone, with the outputs of base + adapter."""
    from deltatune.cli.main import main

    folder, _ = launched
    out = tmp_path / "merged"
    assert main(["merge-adapter", str(folder / "fsdp-lora"), "--out", str(out), "--max-shard-size", "1MB"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    batch = {"input_ids": torch.randint(0, 1000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    merged = BertForSequenceClassification.from_pretrained(out).eval()
    adapted = dt.load(BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), folder / "fsdp-lora" /
                      "adapter").eval()
    with torch.no_grad():
        assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-5, atol=1e-6)


# --- real model, real launchers (slow) -----------------------------------------------------------
def launch_train(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*launcher, "-m", "deltatune.cli.main", "train", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_minilm_under_torchrun_and_accelerate_launch(tmp_path):
    """`deltatune train` on MiniLM / Rotten Tomatoes: DDP under torchrun, FSDP under `accelerate launch` (its
    torchrun launcher: --multi_gpu also starts gloo processes on a CPU-only machine). Both ranks draw the same
    dropout masks in both modes, so the FSDP run (sharded base) must equal the DDP run to float tolerance."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate is not installed beside this Python")
    args = ["data.max_train=24", "data.max_eval=16", "train.batch_size=8", "train.steps=3", "train.max_length=32"]
    runs = {"ddp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], "ddp"),
            "fsdp": ([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no"], "fsdp")}
    for name, (launcher, mode) in runs.items():
        proc = launch_train(launcher, [*args, f"train.distributed={mode}", f"train.output_dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert f"3 steps on 2 processes ({mode})" in proc.stdout
        assert proc.stdout.count("adapter saved to") == 1  # rank 0 alone reports
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 3 + 2
    ddp, fsdp = adapter(tmp_path / "ddp"), adapter(tmp_path / "fsdp")
    for key in ddp:
        assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-7, msg=key)
    assert_close(torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "ddp")), rtol=1e-6, atol=0.0)
