"""The `deltatune` command end to end (in-process) and recipe parsing/validation."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from helpers import assert_close
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import deltatune as dt
from deltatune.cli.main import main
from deltatune.training.recipe import DEFAULT_RECIPE, apply_override, builtin_recipe, load_recipe, validate
from deltatune.training.tasks import resolve_model_path

TINY = ["data.max_train=64", "data.max_eval=32", "train.batch_size=16", "train.max_length=32", "train.steps=4"]


def run(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process `deltatune` call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MiniLM run through `deltatune train`: (run folder, its stdout)."""
    run_dir = tmp_path_factory.mktemp("run")
    code, out, err = run("train", *TINY, f"train.output_dir={run_dir}")
    assert code == 0, err
    return run_dir, out


@pytest.fixture
def reviews_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\n" + "\n".join(f"text {i},{'pos' if i % 2 else 'neg'}" for i in range(40)))
    return path


# --- commands ----------------------------------------------------------------------------------------
def test_train_reports_accuracy_parameters_time_and_adapter(trained):
    run_dir, out = trained
    assert "before" in out and "after" in out and "accuracy" in out
    assert "trainable parameters: 74,498 of" in out and "(0.33%)" in out
    assert "wall time" in out and f"adapter saved to {run_dir / 'adapter'}" in " ".join(out.split())
    assert {"adapter.safetensors", "deltatune_config.json", "recipe.yaml"} <= {
        p.name for p in (run_dir / "adapter").iterdir()
    }
    stored = load_recipe(run_dir / "adapter" / "recipe.yaml")
    assert stored.model.labels == ["0", "1"] and stored.train.steps == 4  # resolved and complete
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 4]  # eval before, 4 steps, eval after


def test_eval_reproduces_the_final_metrics_of_the_run(trained):
    run_dir, _ = trained
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    code, out, err = run("eval", str(run_dir))
    assert code == 0, err
    assert "32 held-out examples" in out and f"accuracy {last['eval_accuracy']:.4f}" in out


def test_info_shows_the_parameter_table_of_an_adapter_and_of_a_recipe(trained):
    run_dir, _ = trained
    code, out, err = run("info", str(run_dir / "adapter"))
    assert code == 0, err
    assert "lora" in out and "full" in out and "74,498" in out
    code, out, err = run("info", str(builtin_recipe(DEFAULT_RECIPE)))
    assert code == 0, err
    assert "74,498" in out


def test_export_peft_writes_a_peft_adapter(trained, tmp_path):
    run_dir, _ = trained
    code, _, err = run("export", str(run_dir), "--format", "peft", "--out", str(tmp_path))
    assert code == 0, err
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["modules_to_save"] == ["classifier"]


def test_merged_model_loads_with_transformers_alone_and_matches_the_adapter(trained, tmp_path):
    run_dir, _ = trained
    code, _, err = run("merge-adapter", str(run_dir / "adapter"), "--out", str(tmp_path))
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(["A warm, funny film.", "Dull and far too long."], padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
    adapted = dt.load(base, run_dir / "adapter").eval()
    with torch.no_grad():
        assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-3, atol=1e-4)


def test_merge_adapter_streams_by_default_and_equals_the_in_memory_merge(trained, tmp_path):
    """The default (layer by layer from the base's safetensors) and --no-stream write the same tensors."""
    from safetensors.torch import load_file

    run_dir, _ = trained
    outs = {}
    for flag in ("--stream", "--no-stream"):
        outs[flag] = tmp_path / flag.strip("-")
        code, out, err = run("merge-adapter", str(run_dir / "adapter"), "--out", str(outs[flag]),
                             "--max-shard-size", "30MB", flag)
        assert code == 0, err
        assert ("layer by layer" in out) == (flag == "--stream")
    tensors = {flag: {k: v for f in sorted(o.glob("model-*.safetensors")) for k, v in load_file(f).items()}
               for flag, o in outs.items()}
    assert len(list(outs["--stream"].glob("model-*.safetensors"))) >= 2
    assert tensors["--stream"].keys() == tensors["--no-stream"].keys()
    for key, t in tensors["--no-stream"].items():
        assert_close(tensors["--stream"][key], t, rtol=1e-6, atol=1e-7, msg=key)
    config = json.loads((outs["--stream"] / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"] == {"0": "0", "1": "1"}


def test_merge_adapter_refuses_a_non_empty_output_folder(trained, tmp_path):
    run_dir, _ = trained
    keep = tmp_path / "precious.txt"
    keep.write_text("do not delete")
    code, _, err = run("merge-adapter", str(run_dir / "adapter"), "--out", str(tmp_path))
    assert code == 2 and "not an empty folder" in err
    assert keep.read_text() == "do not delete"


def test_methods_lists_the_registry():
    code, out, _ = run("methods")
    assert code == 0
    for spec in dt.list_methods():
        assert spec.name in out


def test_validate_accepts_both_shipped_recipes():
    for name in (DEFAULT_RECIPE, "lora_smollm2_chatterbot"):
        code, out, err = run("validate", str(builtin_recipe(name)))
        assert code == 0, err
        assert "is valid" in out


# --- bad input: one line, exit code 2 ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "train.bach_size=8"], "unknown key 'train.bach_size'; did you mean 'train.batch_size'?"),
        (["train", "--resume", "train.bach_size=8"], "unknown key 'train.bach_size'"),  # overrides after a flag
        (["validate", "method.rr=4"], "unknown key 'method.rr'; did you mean 'method.r'?"),
        (["train", "data.text_column=txt"], "column 'txt' (the text column) not found in 'rotten_tomatoes'"),
        (["train", "missing.yaml"], "recipe file 'missing.yaml' not found"),
        (["train", "data.source=missing.csv"], "'missing.csv' is neither a file nor a built-in dataset"),
        (["train", "model.path=/nowhere"], "'/nowhere' is neither a Hugging Face model folder"),
        (["eval", "/nowhere"], "no trained adapter in '/nowhere'"),
        (["train", "train.batch_size=lots"], "invalid value 'lots' for 'train.batch_size'"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_code_2(argv, message):
    code, _, err = run(*argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_column_in_a_csv_names_the_columns_and_the_closest(reviews_csv):
    code, _, err = run("validate", f"data.source={reviews_csv}", "data.text_column=reveiw")
    assert code == 2
    assert "has columns ['review', 'sentiment']; did you mean 'review'?" in err


def test_a_csv_with_string_labels_validates(reviews_csv):
    code, out, err = run("validate", f"data.source={reviews_csv}", "data.text_column=review",
                         "data.label_column=sentiment", "data.eval_size=0.25")
    assert code == 0, err
    assert "30 train / 10 eval" in out


def test_usage_errors_exit_2():
    assert run("frobnicate")[0] == 2
    assert run("export", "somewhere")[0] == 2  # --out is required
    assert run("train", "--resume", "--bogus")[0] == 2


# --- recipes ---------------------------------------------------------------------------------------
def test_overrides_are_yaml_values_at_dotted_paths():
    data = {"train": {"batch_size": 32}}
    for item in ["train.batch_size=8", "optimizer.lr=2e-3", "data.max_train=null", "method.targets=[query, key]",
                 "model.path=some/folder"]:
        apply_override(data, item)
    assert data["train"]["batch_size"] == 8 and data["data"]["max_train"] is None
    assert data["method"]["targets"] == ["query", "key"] and data["model"]["path"] == "some/folder"
    recipe = validate(data)
    assert recipe.optimizer.lr == 2e-3 and recipe.method.config().targets == ["query", "key"]


def test_override_errors_are_clear():
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_override({}, "train.batch_size")
    with pytest.raises(ValueError, match="'train.seed' is a value, not a section"):
        apply_override({"train": {"seed": 1}}, "train.seed.x=2")


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(None, ["method.r=4", "train.steps=10", "optimizer.loraplus_ratio=16"])
    path = tmp_path / "copy.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert recipe.name == DEFAULT_RECIPE and str(recipe.output_dir) == f"runs/{DEFAULT_RECIPE}"


def test_recipe_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("train:\n  steps: 3\n")
    assert load_recipe(path).name == "my_run"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.steps=3", "unknown key 'trian'; did you mean 'train'?"),
        ("optimizer.lr=-1", "invalid value -1 for 'optimizer.lr'"),
        ("method.name=lroa", "unknown method 'method.name=lroa'; did you mean 'lora'?"),
        ("method.r=0", "invalid value 0 for 'method.r'"),
        ("model.task=regression", "invalid value 'regression' for 'model.task'"),
    ],
)
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ValueError) as e:
        load_recipe(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)
