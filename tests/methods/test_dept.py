"""DePT on real models: the budget, the update by hand, gradients, save/load, mixed batches, generate() with a
cache, and the two learning rates reaching the trainer's optimizer."""

import pytest
import torch
from helpers import assert_close, perturb
from prompt_helpers import grads_only_in, out, rows_match_alone, save_load

import deltatune as dt
from deltatune.methods.prompt.dept import dept_parameters, prompt_length
from deltatune.training.param_groups import param_groups

OPTIONS = {"num_virtual_tokens": 20, "rank": 4, "max_length": 6}  # MiniLM: m = (7680 - 4*390) // 384 = 15


def inject(model, name="default", **options):
    return dt.inject(model, dt.make_config("dept", **{**OPTIONS, **options}), name=name)


def test_parameters_fill_the_prompt_tuning_budget(make_minilm):
    dm = inject(make_minilm())
    assert dm.trainable_parameters() == dept_parameters(20, 384, 4, 6) <= 20 * 384
    assert dm.prompts["default"].num_virtual_tokens == prompt_length(20, 384, 4, 6)


def test_over_budget_is_a_clear_error(make_minilm):
    with pytest.raises(ValueError, match="lower rank or max_length"):
        inject(make_minilm(), rank=20, max_length=64)


def by_hand(dm, batch):
    """[P ; E(x) + s (A B)[t]] for the t-th real token of each row (t < S), through the frozen model."""
    d = dm.prompts["default"]
    E = dm.model.get_input_embeddings()(batch["input_ids"])
    mask = batch["attention_mask"]
    t = (mask.cumsum(1) - 1).clamp(min=0)
    update = torch.stack([torch.stack([d.scale * d.dept_A[j] @ d.dept_B if j < d.dept_A.shape[0]
                                       else torch.zeros(E.shape[2]) for j in row.tolist()]) for row in t])
    m = d.num_virtual_tokens
    inputs = torch.cat([d.prompt_embeddings.expand(len(E), -1, -1), E + update], 1)
    full_mask = torch.cat([torch.ones(len(E), m, dtype=mask.dtype), mask], 1)
    with dm.disabled():
        return dm.model(inputs_embeds=inputs, attention_mask=full_mask, token_type_ids=torch.zeros_like(full_mask)).logits


def test_output_by_hand_with_tokens_past_max_length(make_minilm, minilm_batch):
    dm = inject(make_minilm())
    perturb(dm.prompts["default"])
    assert minilm_batch["input_ids"].shape[1] > 6  # some tokens lie past S and get no update
    assert_close(out(dm, minilm_batch), by_hand(dm, minilm_batch))


def test_starts_as_prompt_tuning_with_m_tokens(make_minilm, minilm_batch):
    dm = inject(make_minilm())
    assert torch.all(dm.prompts["default"].dept_B == 0)
    d = dm.prompts["default"]
    dm.add_adapter("pt", dt.make_config("prompt_tuning", num_virtual_tokens=d.num_virtual_tokens))
    with torch.no_grad():
        dm.prompts["pt"].prompt_embeddings.copy_(d.prompt_embeddings)
    rows_match_alone(dm, minilm_batch, ["default", "pt", "default", "pt"])
    assert_close(out(dm, minilm_batch, ["default"] * 4), out(dm, minilm_batch, ["pt"] * 4))


def test_gradients_reach_the_prompt_and_the_pair_only(make_minilm, minilm_batch):
    dm = inject(make_minilm())
    perturb(dm.prompts["default"])  # B != 0, so A gets a gradient too
    grads_only_in(dm, minilm_batch, "default")


def test_save_load_is_exact(make_minilm, minilm_batch, tmp_path):
    dm = inject(make_minilm())
    perturb(dm.prompts["default"])
    save_load(dm, make_minilm(), minilm_batch, tmp_path)


def test_mixed_batch_rows_equal_rows_alone(make_minilm, minilm_batch):
    dm = inject(make_minilm(), "a")
    dm.add_adapter("b", dt.make_config("dept", num_virtual_tokens=16, rank=2, max_length=8))
    perturb(dm.prompts["a"], seed=1)
    perturb(dm.prompts["b"], seed=2)
    rows_match_alone(dm, minilm_batch, ["a", dt.BASE, "b", "a"])


def test_generate_with_cache_equals_greedy_recomputation(tiny_llama):
    """Each generated token gets the update of its own position: the same tokens as recomputing the whole
    sequence every step (S = 7 lies inside the generated part)."""
    dm = dt.inject(tiny_llama, dt.make_config("dept", num_virtual_tokens=20, rank=2, max_length=7))
    perturb(dm.prompts["default"], std=0.5)
    ids = torch.tensor([[5, 17, 42, 8, 3]])
    cached = dm.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        nxt = out(dm, {"input_ids": seq, "use_cache": False})[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_param_groups_give_the_pair_its_rate(make_minilm):
    dm = inject(make_minilm(), pair_lr_ratio=0.02)
    dm.add_adapter("lora", dt.make_config("lora", r=2, targets=["query"]))
    dm.set_active(["default", "lora"])
    d = dm.prompts["default"]
    groups = param_groups(dm, lr=0.3, weight_decay=0.01, loraplus_ratio=4)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sorted(rate) == sorted(id(p) for p in dm.parameters() if p.requires_grad)  # each once
    assert len(rate) == sum(len(g["params"]) for g in groups)
    assert rate[id(d.prompt_embeddings)] == pytest.approx(0.3)
    assert rate[id(d.dept_A)] == rate[id(d.dept_B)] == pytest.approx(0.006)
    lora_B = [p for n, p in dm.named_parameters() if n.endswith("lora_B") and p.requires_grad]
    assert lora_B and all(rate[id(p)] == pytest.approx(1.2) for p in lora_B)  # LoRA+ on the rest


def test_absolute_pair_rate_and_not_both(make_minilm):
    dm = inject(make_minilm(), pair_lr=5e-3)
    rate = {id(p): g["lr"] for g in param_groups(dm, lr=0.3) for p in g["params"]}
    assert rate[id(dm.prompts["default"].dept_A)] == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="not both"):
        dt.make_config("dept", pair_lr=5e-3, pair_lr_ratio=0.1)


def test_trainer_builds_the_two_groups(tmp_path):
    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    recipe = load_recipe(None, ["data.max_train=8", "data.max_eval=4", "train.max_length=16", "train.steps=1",
                                "method={name: dept, num_virtual_tokens: 20, rank: 4, max_length: 16, "
                                "pair_lr_ratio: 0.05}", "optimizer.lr=0.2", f"train.output_dir={tmp_path}"])
    trainer = Trainer(recipe)
    trainer.setup()
    lrs = sorted(g["initial_lr"] for g in trainer.optimizer.param_groups)
    assert lrs == pytest.approx([0.01, 0.2, 0.2])  # the pair, the prompt, the classifier head
