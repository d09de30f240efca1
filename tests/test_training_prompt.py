"""Training with prompt adapters: their virtual tokens in the trainer's length check and loss counting, every
prompt method on both shipped recipes, and the folded adapter a run saves."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import deltatune as dt
from deltatune import assets
from deltatune.training.loop import Trainer, build_model, evaluate, make_task
from deltatune.training.recipe import builtin_recipe, load_recipe
from deltatune.training.tasks import IGNORE_INDEX, CausalLMTask

SMOLLM2 = builtin_recipe("lora_smollm2_chatterbot")
# a few real examples and steps; each method at a rate of its papers' regime for so short a run
SHORT = ["data.max_eval=16", "train.batch_size=8", "train.eval_every=null", "train.save_every=null"]
RECIPES = {
    "classification": (None, [*SHORT, "data.max_train=32", "train.steps=6", "train.max_length=32"]),
    "causal_lm": (SMOLLM2, [*SHORT, "data.max_train=16", "train.steps=4", "train.max_length=64"]),
}
OPTIONS = {  # small prompts; rates that a few steps (the head too, at the same rate) take without diverging
    "prompt_tuning": ({"num_virtual_tokens": 8}, 1e-2),
    "p_tuning": ({"num_virtual_tokens": 8}, 1e-2),
    "dept": ({"num_virtual_tokens": 8, "rank": 2}, 3e-2),
    "prefix_tuning": ({"num_virtual_tokens": 8}, 1e-2),
    "p_tuning_v2": ({"num_virtual_tokens": 8}, 1e-2),
    "adaption_prompt": ({"adapter_len": 8, "adapter_layers": 4}, 1e-2),
}
REGISTERED = {spec.name for spec in dt.list_methods()}


def method_override(name: str) -> str:
    return "method=" + json.dumps({"name": name, **OPTIONS[name][0]})


def trainer_for(task: str, method: str, tmp_path, extra: tuple[str, ...] = ()) -> Trainer:
    path, overrides = RECIPES[task]
    recipe = load_recipe(path, [*overrides, method_override(method), f"optimizer.lr={OPTIONS[method][1]}",
                                f"train.output_dir={tmp_path}", *extra])
    trainer = Trainer(recipe)
    trainer.setup()
    return trainer


# --- length and loss accounting ---------------------------------------------------------------------------
def test_virtual_tokens_count_towards_the_model_positions():
    def build(max_length: int) -> dt.DeltaModel:
        recipe = load_recipe(None, ["method={name: prompt_tuning, num_virtual_tokens: 20}",
                                    f"train.max_length={max_length}"])
        return build_model(recipe, make_task(recipe, ["rotten", "fresh"]))

    with pytest.raises(ValueError) as error:  # MiniLM has 512 positions: 500 real + 20 virtual tokens do not fit
        build(500)
    message = str(error.value)
    for part in ("train.max_length=500", "prompt_tuning's 20 virtual tokens", "520 positions", "512 positions",
                 "set train.max_length=492 or less", "method.num_virtual_tokens"):
        assert part in message, message
    assert build(492).prompts["default"].num_virtual_tokens == 20


def test_the_run_fills_the_method_options_it_knows():
    def method(*overrides: str):
        return load_recipe(None, list(overrides)).method.config()

    assert method("method={name: dept}", "train.max_length=48").max_length == 48  # S: the task's max length
    assert method("method={name: dept, max_length: 30}", "train.max_length=48").max_length == 30  # as given
    text = method('method={name: prompt_tuning, init: text, init_text: "good or bad"}')
    assert text.tokenizer == str(assets.minilm_path())  # the model's own tokenizer splits init_text
    assert method("method={name: prompt_tuning}").tokenizer is None


@pytest.fixture(scope="module")
def smollm2_task() -> CausalLMTask:
    return CausalLMTask(assets.smollm2_path(), max_length=48)


def summed_token_losses(logits: torch.Tensor, labels: torch.Tensor, virtual: int) -> torch.Tensor:
    """Cross-entropy summed over labelled tokens, from logits over [virtual tokens, real tokens]: position j
    predicts the input at j + 1, so with virtual tokens in front the first real token is predicted too."""
    pred, target = (logits[:, virtual - 1:-1], labels) if virtual else (logits[:, :-1], labels[:, 1:])
    return F.cross_entropy(pred.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize(("method", "prompt", "prefix"), [("prompt_tuning", 5, 0), ("p_tuning_v2", 0, 5), ("lora", 0, 0)])
def test_causal_lm_loss_terms_are_what_the_prompted_model_averages(smollm2_task, method, prompt, prefix):
    task = smollm2_task
    examples = task.encode([{"prompt": "Hello there.", "response": "Hi, how are you?"},
                            {"prompt": "What is 2 + 2?", "response": "It is 4."}])
    examples[0]["labels"] = list(examples[0]["input_ids"])  # every token labelled: the first label counts or not
    torch.manual_seed(0)
    options = {"r": 4, "targets": ["q_proj"]} if method == "lora" else {"num_virtual_tokens": 5}
    model = dt.inject(task.build_model(), dt.make_config(method, **options)).eval()
    task.fit_prompt(model)  # a prefix sits in the attention cache: it shifts no label
    assert (task.prompt_tokens, task.prefix_tokens) == (prompt, prefix)
    batch = task.collate(examples)
    with torch.no_grad():
        out = model(**batch)
        summed = summed_token_losses(out.logits, batch["labels"], task.prompt_tokens)
        terms = task.loss_terms(examples)
        assert_close(out.loss * terms, summed, rtol=1e-5)
        assert_close(torch.tensor(task.evaluate(model, [batch])["loss"]), summed / terms, rtol=1e-5)


# --- training ----------------------------------------------------------------------------------------------
def check_training(task: str, method: str, tmp_path) -> None:
    """The method trains on the recipe: its training loss falls, every prompt tensor moves, and the saved
    (folded) adapter gives the trained model's held-out metrics."""
    trainer = trainer_for(task, method, tmp_path)
    model = trainer.model
    start = {k: t.clone() for k, t in model.adapter_state_dict().items()}
    batch_size = trainer.recipe.eval.batch_size
    before = evaluate(model, trainer.task, trainer.train_set, batch_size)["loss"]
    result = trainer.train()
    after = evaluate(model, trainer.task, trainer.train_set, batch_size)["loss"]
    assert after < before, (before, after)
    head = tuple(f"{p}." for p in model.adapters["default"].train_modules)  # the classifier trains as well
    moved = {k for k, t in model.adapter_state_dict().items() if k in start and not torch.equal(t, start[k])}
    assert {k for k in moved if not k.startswith(head)}, f"no tensor of the {method} delta changed: {sorted(start)}"
    reloaded = build_model(trainer.recipe, trainer.task, result.adapter_dir)
    again = evaluate(reloaded, trainer.task, trainer.eval_set, batch_size)
    assert_close(torch.tensor(again["loss"]), torch.tensor(result.after["loss"]), rtol=1e-4)


def test_prompt_tuning_trains_on_the_classification_recipe(tmp_path):
    check_training("classification", "prompt_tuning", tmp_path)


SLOW_CASES = [(task, method) for task in RECIPES for method in OPTIONS
              if method in REGISTERED and not (task == "classification" and method == "adaption_prompt")
              and (task, method) != ("classification", "prompt_tuning")]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "method"), SLOW_CASES)
def test_each_prompt_method_trains_on_the_shipped_recipes(tmp_path, task, method):
    check_training(task, method, tmp_path)


def test_adaption_prompt_on_the_classification_recipe_names_its_models(tmp_path):
    with pytest.raises(ValueError, match="adaption_prompt has no default for model type 'bert'"):
        trainer_for("classification", "adaption_prompt", tmp_path)
