"""CPT on causal LMs: parameters, gradients (labels' rows frozen), the ε-ball, save/load, mixed rows, and parity
with peft 0.21's CPT on SmolLM2 (same logits, loss, projection steps and greedy tokens), its files both ways."""

import copy

import pytest
import torch
from helpers import assert_close
from peft import CPTConfig as PeftCPTConfig
from peft import PeftModel, get_peft_model
from prompt_helpers import out, rows_match_alone, save_load, smollm2

import deltatune as dt
from deltatune.methods.prompt.cpt import epsilons

IDS = [11, 12, 13, 14, 15, 16, 17, 18, 19]
TYPES = [1, 2, 2, 3, 4, 5, 6, 7, 8]  # two examples: template, input x2, template, label; then 5..8
OPTIONS = {"token_ids": IDS, "type_mask": TYPES, "epsilon": 0.5, "format_epsilon": 0.2,
           "loss_weighting": "decay", "loss_decay": 0.5}


def inject(model, name="default", **options):
    return dt.inject(model, dt.make_config("cpt", **{**OPTIONS, **options}), name=name)


def push(dm, name="default", std=1.0, seed=0):
    """Δ set far outside its ball (as big gradient steps would), so the projection acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = dm.prompts[name].cpt_delta
        d.copy_(torch.randn(d.shape, generator=g) * std)


def batch_of(ids):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_parameters_are_l_times_d_and_the_length_is_the_context(tiny_llama):
    dm = inject(tiny_llama)
    assert dm.trainable_parameters() == len(IDS) * 32
    assert dm.prompts["default"].num_virtual_tokens == len(IDS)
    with pytest.raises(ValueError, match="drop num_virtual_tokens"):
        dt.make_config("cpt", token_ids=IDS, num_virtual_tokens=3)
    with pytest.raises(ValueError, match="one type per context token"):
        dt.make_config("cpt", token_ids=IDS, type_mask=[1, 2])


def test_needs_a_causal_lm(make_minilm):
    with pytest.raises(ValueError, match="causal LM"):
        inject(make_minilm())


def test_prompt_is_the_context_plus_the_projected_delta(tiny_llama):
    dm = inject(tiny_llama)
    push(dm)
    d = dm.prompts["default"]
    P = d.input_prompt(1)[0]
    E = tiny_llama.get_input_embeddings().weight[IDS]
    eps = epsilons(torch.tensor(TYPES), 32, 0.5, 0.2)
    delta = P - E
    labels = torch.tensor([t % 4 == 0 for t in TYPES])
    assert torch.all(delta[labels] == 0)  # labels' embeddings stay the context's
    assert_close(delta[~labels].norm(dim=1), eps[~labels])  # pushed out, projected back onto the sphere


def test_gradients_reach_only_template_and_input_rows(tiny_llama):
    dm = inject(tiny_llama)
    b = batch_of([[3, 4, 5, 6], [7, 8, 9, 10]])
    dm(**b, labels=b["input_ids"], input_type_mask=torch.tensor([[1, 2, 3, 4]] * 2)).loss.backward()
    grad = dm.prompts["default"].cpt_delta.grad
    trained = grad.abs().sum(1) > 0
    assert trained.tolist() == [t % 4 != 0 for t in TYPES]
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_save_load_is_exact(tiny_llama, tmp_path):
    dm = inject(copy.deepcopy(tiny_llama))
    push(dm, std=0.01)  # inside the ball: kept as it is
    save_load(dm, tiny_llama, batch_of([[3, 4, 5, 6]]), tmp_path)


def test_mixed_rows_equal_rows_alone_and_labels_need_one_adapter(tiny_llama):
    dm = inject(tiny_llama, "a")
    dm.add_adapter("b", dt.make_config("cpt", token_ids=[40, 41, 42]))
    push(dm, "a")
    push(dm, "b", seed=1)
    b = batch_of([[3, 4, 5, 6], [7, 8, 9, 10], [1, 2, 3, 4]])
    rows_match_alone(dm, b, ["a", "b", dt.BASE])
    with pytest.raises(ValueError, match="cannot mix"):
        dm(**b, labels=b["input_ids"], adapter_names=["a", "b", dt.BASE])


# ---- parity with peft (SmolLM2) ----

@pytest.fixture(scope="module")
def smol():
    return smollm2()


class Words:
    """A tokenizer for tiny_llama: one id per word (ids 20-79), right padding with 0."""

    def __call__(self, texts, padding=False, return_tensors="pt"):
        rows = [[20 + sum(map(ord, w)) % 60 for w in t.split()] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=["tiny_llama", pytest.param("smollm2", marks=pytest.mark.slow)])
def causal_lm(request):
    if request.param == "smollm2":
        return request.getfixturevalue("smol")
    return request.getfixturevalue("tiny_llama"), Words()


def twins(model):
    cfg = PeftCPTConfig(task_type="CAUSAL_LM", cpt_token_ids=IDS, cpt_tokens_type_mask=TYPES,
                        opt_projection_epsilon=0.5, opt_projection_format_epsilon=0.2,
                        opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    dm = inject(copy.deepcopy(model))
    push(dm, std=0.05)
    with torch.no_grad():
        pm.prompt_encoder["default"].delta_embedding.weight.copy_(dm.prompts["default"].cpt_delta)
    return pm, dm


def test_same_logits_loss_steps_and_tokens_as_peft(causal_lm, tmp_path):
    model, tok = causal_lm
    pm, dm = twins(model)
    b = dict(tok(["Review: dull. Sentiment: negative", "Review: great fun. Sentiment: positive"],
                 padding=True, return_tensors="pt"))
    T = b["input_ids"].shape[1]
    types = torch.tensor([[1] * 2 + [2] * (T - 4) + [3, 4]] * 2) * b["attention_mask"]
    kw = {"labels": b["input_ids"], "input_type_mask": types}
    ours, theirs = dm(**b, **kw), pm(**b, input_type_mask=types.clone(), labels=b["input_ids"])
    assert_close(ours.logits, theirs.logits)
    assert_close(ours.loss, theirs.loss)
    # two projected-gradient steps each: the same deltas (each projected before its step, as PEFT does)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=50.0) for m in (dm, pm)]
    for _ in range(2):
        for m, opt in zip((dm, pm), opts):
            opt.zero_grad()
            m(**b, labels=b["input_ids"], input_type_mask=types.clone()).loss.backward()
            opt.step()
    ours, theirs = dm(**b).logits, pm(**b).logits  # each forward projects first
    assert_close(dm.prompts["default"].cpt_delta, pm.prompt_encoder["default"].delta_embedding.weight)
    assert_close(ours, theirs)
    # greedy tokens: ours (KV cache) against peft's forward recomputed each step. peft 0.21's own CPT
    # generate() departs from its forward from the second new token on (margins of its logits differ), so
    # its forward is the reference here
    one = dict(tok(["Review: a moving film. Sentiment:"], return_tensors="pt"))
    seq = one["input_ids"]
    for _ in range(6):
        nxt = pm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(dm.generate(**one, max_new_tokens=6, do_sample=False), seq)
    # files: ours into peft, peft's into ours
    dm.export_peft(tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    assert_close(loaded(**b).logits, ours)
    pm.save_pretrained(tmp_path / "peft")
    imported = dt.load_peft(copy.deepcopy(model), tmp_path / "peft")
    assert_close(out(imported, b), theirs)
