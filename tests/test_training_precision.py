"""Recipes on half-precision bases with 8-bit optimizers and gradient checkpointing: the recipe keys
model.dtype, optimizer.name and train.gradient_checkpointing on the shipped recipes' real models, exact
resume with bitsandbytes' 8-bit optimizer state in the checkpoint, and the refusals of bad values."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file
from test_training import TINY, Killed, metric_rows, run_recipe

from deltatune.cli.main import main
from deltatune.training import checkpoint
from deltatune.training.loop import Trainer
from deltatune.training.optimizers import build_optimizer, moment_tensors
from deltatune.training.recipe import builtin_recipe, load_recipe

SMOLLM2 = str(builtin_recipe("lora_smollm2_chatterbot"))
# the SmolLM2 recipe cut to a few steps on a few pairs
SMOLLM2_SHORT = ["data.max_train=8", "data.max_eval=4", "train.batch_size=4", "train.max_length=48", "train.steps=2",
                 "train.eval_every=null", "train.save_every=null", "eval.batch_size=4"]


# the MiniLM recipe cut to 2 steps (bf16 matmuls are slow on CPUs without bf16 units: ~10x fp32 here)
MINILM_SHORT = ["data.max_train=16", "data.max_eval=8", "train.batch_size=4", "train.max_length=24", "train.steps=2",
                "eval.batch_size=8"]


def dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable and p.is_floating_point()}


def quantized_layers(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]


@pytest.mark.parametrize("extra,base_dtype,packed", [
    (["model.dtype=bfloat16", "train.gradient_checkpointing=true", "optimizer.name=adamw_8bit"], torch.bfloat16, None),
    (["model.quantize=nf4", "train.gradient_checkpointing=true"], torch.float32, "Linear4bit"),
    (["model.quantize=int8", "optimizer.name=adamw_8bit"], torch.float32, "Linear8bitLt"),
], ids=["bf16-checkpointing-8bit", "nf4-checkpointing", "int8-8bit"])
def test_minilm_recipe_trains_on_half_and_quantized_bases(tmp_path, capsys, extra, base_dtype, packed):
    out = tmp_path / "run"
    trainer = run_recipe([*MINILM_SHORT, *extra, f"train.output_dir={out}"])
    layers = quantized_layers(trainer.model)
    # 6 blocks x 6 linears and the pooler are packed; the new head trains in full precision
    assert (layers == [packed] * 37) if packed else not layers
    assert base_dtype in dtypes(trainable=False, model=trainer.model)
    assert dtypes(trainer.model, trainable=True) == {torch.float32}  # LoRA and the new classifier head
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items()), "some adapter tensor never moved"
    saved = load_file(out / "adapter" / "adapter.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # the stored recipe rebuilds the same base
    assert f"loss {result.after['loss']:.4f}" in capsys.readouterr().out


def test_smollm2_recipe_runs_with_checkpointing_and_an_8bit_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", SMOLLM2, *SMOLLM2_SHORT, "train.gradient_checkpointing=true", "optimizer.name=adamw_8bit",
                 f"train.output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.slow  # bf16: about 15 minutes on this loaded 2-core CPU (bf16 matmuls without bf16 units)
@pytest.mark.parametrize("extra", [["model.dtype=bfloat16"], ["model.quantize=nf4"]], ids=["bf16", "nf4"])
def test_smollm2_recipe_runs_on_a_bf16_or_nf4_base(tmp_path, capsys, extra):
    out = tmp_path / "run"
    code = main(["train", SMOLLM2, *SMOLLM2_SHORT, *extra, "train.gradient_checkpointing=true",
                 f"train.output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    assert main(["eval", str(out), "data.max_eval=4", "eval.batch_size=4"]) == 0


def test_an_8bit_optimizer_resumes_exactly_from_its_checkpoint(tmp_path, monkeypatch):
    # r=16: LoRA's A and B hold 6,144 entries, above bitsandbytes' 4,096, so their moments are 8-bit codes
    recipe = [*TINY, "optimizer.name=adamw_8bit", "method.r=16"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_recipe([*recipe, f"train.output_dir={whole}"]).train()

    def killed_in_step_6(self):
        if self.step == 5:
            raise Killed
        return original(self)

    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", killed_in_step_6)
    with pytest.raises(Killed):
        run_recipe([*recipe, f"train.output_dir={parts}"]).train()
    monkeypatch.undo()
    ckpt = checkpoint.load_checkpoint(parts / "checkpoints" / "ckpt-3")
    codes = [t for moments in ckpt.torch_state["optimizer"]["state"].values()
             for name, t, _ in moment_tensors(moments) if name.endswith("state1")]
    assert torch.uint8 in {t.dtype for t in codes}, "no moment was stored in 8 bits"
    resumed = run_recipe([*recipe, f"train.output_dir={parts}"], resume=True)
    assert resumed.step == 3
    resumed.train()
    assert metric_rows(parts) == metric_rows(whole)
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(parts / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_damaged_8bit_optimizer_state_is_skipped_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    run_recipe([*TINY, "optimizer.name=adamw_8bit", "method.r=16", "train.steps=6", f"train.output_dir={out}"]).train()
    path = out / "checkpoints" / "ckpt-6" / checkpoint.TORCH_STATE
    state = torch.load(path, weights_only=True)
    quant = next(m["__bnb_optimizer_quant_state__"] for m in state["optimizer"]["state"].values()
                 if "absmax1" in m["__bnb_optimizer_quant_state__"])
    quant["absmax1"][0] = float("nan")
    torch.save(state, path)
    (out / "adapter").rename(tmp_path / "finished")  # so that there is a step left to resume
    resumed = run_recipe([*TINY, "optimizer.name=adamw_8bit", "method.r=16", "train.steps=6",
                          f"train.output_dir={out}"], resume=True)
    assert resumed.step == 3
    assert "ignoring invalid checkpoint" in caplog.text and "absmax1' of parameter" in caplog.text


@pytest.mark.parametrize("override,message", [
    ("model.dtype=float16", "unknown value 'model.dtype=float16' (one of float32, bfloat16); did you mean 'bfloat16'?"),
    ("model.quantize=nf5", "unknown value 'model.quantize=nf5' (one of none, nf4, fp4, int8); did you mean 'nf4'?"),
    ("optimizer.name=adamw8bit",
     "unknown value 'optimizer.name=adamw8bit' (one of adamw, adamw_8bit, paged_adamw, paged_adamw_8bit, galore, mezo, lora_fa, adafactor); "
     "did you mean 'adamw_8bit'?"),
])
def test_bad_precision_and_optimizer_values_get_the_choices_and_the_closest(override, message):
    with pytest.raises(ValueError) as e:
        load_recipe(None, [override])
    assert str(e.value) == message


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw_8bit"])
def test_paged_optimizers_are_refused_on_cpu_naming_those_that_run(name):
    with pytest.raises(ValueError) as e:
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"), lr=1e-3)
    assert str(e.value) == (f"optimizer.name={name} pages its state between GPU and CPU memory, so it needs a CUDA "
                            "device, and this run is on cpu: use one of adamw, adamw_8bit")


def test_the_cli_refuses_a_paged_optimizer_on_cpu_before_training(tmp_path, capsys):
    code = main(["train", *TINY, "optimizer.name=paged_adamw_8bit", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "error: optimizer.name=paged_adamw_8bit pages its state" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_each_optimizer_takes_the_recipe_options(name):
    p = torch.nn.Parameter(torch.zeros(64, 64))
    opt = build_optimizer(name, [p], torch.device("cpu"), lr=2e-3, betas=(0.8, 0.9), weight_decay=0.1)
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (2e-3, (0.8, 0.9), 0.1)


def test_merge_adapter_of_a_quantized_run_writes_the_dequantised_base_plus_the_delta(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from deltatune.training.loop import build_model

    out, merged = tmp_path / "run", tmp_path / "merged"
    trainer = run_recipe([*MINILM_SHORT, "model.quantize=nf4", f"train.output_dir={out}"])
    trainer.train()
    assert main(["merge-adapter", str(out), "--stream", "--out", str(merged)]) == 2
    assert "this adapter was trained on its nf4 quantization: leave --stream out" in capsys.readouterr().err
    assert main(["merge-adapter", str(out), "--out", str(merged)]) == 0
    batch = trainer.task.collate(trainer.eval_set[:4])
    model = build_model(trainer.recipe, trainer.task, out / "adapter").eval()  # the trained model: NF4 + adapter
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not [m for m in plain.modules() if type(m).__module__.startswith("bitsandbytes")]
    with torch.no_grad():
        assert_close(plain(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)


def test_runs_recorded_before_the_precision_keys_existed_are_the_same_recipe():
    from deltatune.training.rundir import changed_keys

    new = load_recipe(None, []).model_dump(mode="json")
    old = {**new, "model": {k: v for k, v in new["model"].items() if k not in ("dtype", "quantize")},
           "optimizer": {k: v for k, v in new["optimizer"].items() if k != "name"},
           "train": {k: v for k, v in new["train"].items() if k != "gradient_checkpointing"}}
    assert changed_keys(old, new) == []
    assert changed_keys(old, load_recipe(None, ["model.quantize=nf4"]).model_dump(mode="json")) == ["model.quantize"]
