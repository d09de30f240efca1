"""P-tuning on real models: parameters, gradients, fold, save/load, mixed batches, and parity with peft 0.21's
P_TUNING (same logits on MiniLM classification and SmolLM2, same greedy tokens), its files both ways."""

import copy

import pytest
import torch
from helpers import assert_close, perturb
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from prompt_helpers import grads_only_in, out, rows_match_alone, save_load, smollm2

import deltatune as dt
from deltatune.methods.prompt.p_tuning import encoder_parameters

MLP = {"num_virtual_tokens": 5, "encoder_hidden_size": 16}
LSTM = {"num_virtual_tokens": 4, "encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM",
        "encoder_num_layers": 2}


def inject(model, options, name="default"):
    return dt.inject(model, dt.make_config("p_tuning", **options), name=name)


@pytest.mark.parametrize("options,kind,layers", [(MLP, "MLP", 2), (LSTM, "LSTM", 2)])
def test_parameters_are_the_encoders(make_minilm, options, kind, layers):
    dm = inject(make_minilm(), options)
    h = options["encoder_hidden_size"]
    assert dm.trainable_parameters() == encoder_parameters(options["num_virtual_tokens"], 384, h, kind, layers)


def test_mlp_depth_is_fixed_as_in_peft():
    with pytest.raises(ValueError, match="LSTM encoder only"):
        dt.make_config("p_tuning", encoder_num_layers=3)


def test_prompt_is_the_encoder_output(make_minilm, minilm_batch):
    """The model runs on [P ; E(x)] with P = encoder(E): the same as a folded prompt set to P by hand."""
    dm = inject(make_minilm(), MLP)
    perturb(dm.prompts["default"])
    P = dm.prompts["default"].encoder().detach()
    embeds = dm.model.get_input_embeddings()(minilm_batch["input_ids"])
    mask = torch.cat([torch.ones(4, 5, dtype=torch.long), minilm_batch["attention_mask"]], 1)
    types = torch.zeros_like(mask)
    with dm.disabled():
        expected = dm.model(inputs_embeds=torch.cat([P.expand(4, -1, -1), embeds], 1), attention_mask=mask,
                            token_type_ids=types).logits
    assert_close(out(dm, minilm_batch), expected)


def test_gradients_reach_only_the_encoder(make_minilm, minilm_batch):
    dm = inject(make_minilm(), LSTM)
    dm.train()
    grads_only_in(dm, minilm_batch, "default")


@pytest.mark.parametrize("options", [MLP, LSTM], ids=["mlp", "lstm"])
def test_fold_keeps_outputs_and_leaves_l_times_d(make_minilm, minilm_batch, options, tmp_path):
    dm = inject(make_minilm(), options)
    perturb(dm.prompts["default"])
    before = out(dm, minilm_batch)
    dm.fold_prompt()
    assert_close(out(dm, minilm_batch), before)
    assert dm.trainable_parameters() == options["num_virtual_tokens"] * 384
    assert not hasattr(dm.prompts["default"], "encoder")
    save_load(dm, make_minilm(), minilm_batch, tmp_path)  # saved folded, loads folded


def test_save_load_before_fold_is_exact(make_minilm, minilm_batch, tmp_path):
    dm = inject(make_minilm(), LSTM)
    perturb(dm.prompts["default"])
    loaded = save_load(dm, make_minilm(), minilm_batch, tmp_path)
    assert hasattr(loaded.prompts["default"], "encoder")  # training can go on


def test_mixed_batch_rows_equal_rows_alone(make_minilm, minilm_batch):
    dm = inject(make_minilm(), MLP, "a")
    dm.add_adapter("b", dt.make_config("p_tuning", **LSTM))
    perturb(dm.prompts["a"], seed=1)
    perturb(dm.prompts["b"], seed=2)
    rows_match_alone(dm, minilm_batch, ["a", "b", dt.BASE, "b"])


# ---- parity with peft ----

def peft_twin(model, options, task):
    """peft's P-tuning on `model` with options as deltatune names them, encoder perturbed like training."""
    cfg = PromptEncoderConfig(task_type=task, num_virtual_tokens=options["num_virtual_tokens"],
                              encoder_hidden_size=options["encoder_hidden_size"],
                              encoder_reparameterization_type=options.get("encoder_reparameterization_type", "MLP"),
                              encoder_num_layers=options.get("encoder_num_layers", 2))
    pm = get_peft_model(model, cfg).eval()
    perturb(pm.prompt_encoder["default"])
    return pm


def ours_from(pm, model, options):
    dm = inject(model, options)
    dm.prompts["default"].encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())
    return dm


@pytest.mark.parametrize("options", [MLP, LSTM], ids=["mlp", "lstm"])
def test_same_logits_as_peft_on_minilm_classification(make_minilm, minilm_batch, options):
    pm = peft_twin(make_minilm(), options, "SEQ_CLS")
    dm = ours_from(pm, make_minilm(), options)
    assert_close(out(dm, minilm_batch), pm(**minilm_batch).logits)


def test_peft_files_both_ways_on_minilm(make_minilm, minilm_batch, tmp_path):
    pm = peft_twin(make_minilm(), MLP, "SEQ_CLS")
    expected = pm(**minilm_batch).logits.detach()
    pm.save_pretrained(tmp_path / "peft")  # writes the encoder's output as prompt_embeddings
    imported = dt.load_peft(make_minilm(), tmp_path / "peft")
    assert imported.prompts["default"].config.folded
    assert_close(out(imported, minilm_batch), expected)
    imported.export_peft(tmp_path / "back")
    again = PeftModel.from_pretrained(make_minilm(), tmp_path / "back").eval()
    assert_close(again(**minilm_batch).logits, expected)


def test_export_of_an_unfolded_adapter_writes_its_output(make_minilm, minilm_batch, tmp_path):
    dm = inject(make_minilm(), LSTM)
    perturb(dm.prompts["default"])
    dm.export_peft(tmp_path)
    assert hasattr(dm.prompts["default"], "encoder")  # export does not fold the adapter
    pm = PeftModel.from_pretrained(make_minilm(), tmp_path).eval()
    assert_close(pm(**minilm_batch).logits, out(dm, minilm_batch))


@pytest.fixture(scope="module")
def smol():
    return smollm2()


def test_same_logits_and_greedy_tokens_as_peft_on_smollm2(smol):
    model, tok = smol
    batch = dict(tok(["The capital of France is", "Water boils at"], padding=True, return_tensors="pt"))
    pm = peft_twin(copy.deepcopy(model), LSTM, "CAUSAL_LM")
    dm = ours_from(pm, copy.deepcopy(model), LSTM)
    assert_close(out(dm, batch), pm(**batch).logits)
    one = dict(tok(["The capital of France is"], return_tensors="pt"))
    expected = pm.generate(**one, max_new_tokens=8, do_sample=False)
    assert torch.equal(dm.generate(**one, max_new_tokens=8, do_sample=False), expected)
