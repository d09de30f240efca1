"""VB-LoRA: parameter count (bank + logits), init property, gradients, merge, save/load with the shared
bank, the shared-bank / top-k invariants, mixed batches, errors, PEFT format and parity, MiniLM."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    Holder,
    assert_close,
    assert_round_trip,
    assert_rows_match_each_adapter,
    max_diff,
    perturb,
    train_losses,
)
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.vblora  # noqa: F401
from deltatune.methods.lowrank.vblora import stored_parameters

OPTS = {"r": 2, "num_vectors": 10, "vector_length": 4, "topk": 2}


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def x_in(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def inject(model, targets=("a", "b"), **kw):
    return dt.inject(model, dt.make_config("vblora", targets=list(targets), **{**OPTS, **kw}))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_trainable_count_is_bank_plus_logits(kind):
    layer = nn.Linear(12, 8) if kind == "linear" else nn.Conv2d(2, 8, 2)  # conv: d_in = 2·2·2 = 8
    d_out, d_in = (8, 12) if kind == "linear" else (8, 8)
    dm = dt.inject(Holder(layer), dt.make_config("vblora", targets=["layer"], **OPTS))
    r, h, b, k = 2, 10, 4, 2
    logits = r * (d_in + d_out) // b * h
    assert dm.trainable_parameters() == logits + h * b
    formula = dt.get_method("vblora").formula.split(" (")[0].replace("r(", "r*(")
    assert eval(formula, {}, {"r": r, "d_in": d_in, "d_out": d_out, "b": b, "h": h}) == logits + h * b
    assert stored_parameters(dm) == logits + h * b
    topk = dt.inject(Holder(nn.Linear(12, 8)), dt.make_config("vblora", targets=["layer"], save_only_topk_weights=True,
                                                             **OPTS))
    n_sub = r * (12 + 8) // b  # sub-vectors: k−1 weights + k uint8 indices (a quarter float each)
    assert stored_parameters(topk) == h * b + n_sub * (k - 1) + int(n_sub * k * 0.25)


def test_bank_is_counted_once_for_all_layers():
    dm = inject(Two())
    per_layer = 2 * (8 + 12) // 4 * 10
    assert dm.trainable_parameters() == 2 * per_layer + 10 * 4
    assert "__shared__.vblora_vector_bank" in dm.adapter_state_dict()


def test_init_small_nonzero_delta_of_bank_mixtures():
    dm = inject(Two())
    delta, layer = dm.model.a.deltas["default"], dm.model.a
    A, B = delta.factors()
    bound = 0.02
    assert A.abs().max() <= bound and B.abs().max() <= bound  # convex mixtures of bank rows in U(-b, b)
    dW = delta.delta_weight(layer)
    assert 0 < dW.abs().max() <= 2 * bound**2  # r=2 terms, each at most bound²
    base = Two()
    x = x_in(3, 8)
    assert 0 < max_diff(dm(x), base(x)) < 1e-3  # as in PEFT and the paper's code: not exactly the base


def test_save_load_round_trip_with_shared_bank(tmp_path):
    dm = inject(Two())
    perturb(dm)
    back = assert_round_trip(dm, Two(), x_in(3, 8), tmp_path)
    assert torch.equal(back.shared["default"].vblora_vector_bank, dm.shared["default"].vblora_vector_bank)


def test_one_bank_drives_every_layer_and_only_topk_logits_matter():
    dm = inject(Two())
    x = x_in(3, 8)
    bank = dm.shared["default"].vblora_vector_bank
    before = [dm.model.a.deltas["default"].delta_weight(dm.model.a).detach(),
              dm.model.b.deltas["default"].delta_weight(dm.model.b).detach()]
    with torch.no_grad():
        bank.mul_(2.0)  # both factors scale by 2, so every layer's ΔW by 4
    after = [dm.model.a.deltas["default"].delta_weight(dm.model.a), dm.model.b.deltas["default"].delta_weight(dm.model.b)]
    for b_, a_ in zip(before, after):
        assert_close(a_, 4 * b_, rtol=1e-6, atol=1e-7)
    logits = dm.model.a.deltas["default"].vblora_logits_A
    y = dm(x).detach()
    with torch.no_grad():  # lower every logit outside the top-k: the output must not move
        top = logits.topk(2, dim=-1).indices
        low = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top, False)
        logits[low] -= 5.0
    assert max_diff(dm(x), y) == 0
    dm(x).sum().backward()
    assert torch.count_nonzero(logits.grad[low]) == 0  # gradients only reach the selected logits


def test_mixed_adapter_batch():
    dm = inject(Two())
    dm.add_adapter("other", dt.make_config("vblora", targets=["a"], **OPTS))
    dm.set_active(["default", "other"])
    perturb(dm)
    assert_rows_match_each_adapter(dm, x_in(4, 8), ["default", "other", dt.BASE, "default"], rows_alone=True)


def test_bad_options():
    with pytest.raises(ValueError, match="vector_length=5 must divide.*8 x 12"):
        dt.inject(Holder(nn.Linear(12, 8)), dt.make_config("vblora", targets=["layer"], vector_length=5))
    with pytest.raises(ValueError, match="topk=11 exceeds num_vectors=10"):
        dt.make_config("vblora", num_vectors=10, topk=11)
    with pytest.raises(ValueError, match="did you mean 'topk'"):
        dt.make_config("vblora", top_k=2)


# --- PEFT format --------------------------------------------------------------------------------------


def peft_model(save_only_topk=False):
    import peft

    return peft.get_peft_model(Two(), peft.VBLoRAConfig(target_modules=["a", "b"], r=2, num_vectors=10,
                                                        vector_length=4, topk=2,
                                                        save_only_topk_weights=save_only_topk))


@pytest.mark.parametrize("topk_only", [False, True])
def test_export_loads_in_peft_with_same_outputs(tmp_path, topk_only):
    import peft

    dm = inject(Two(), save_only_topk_weights=topk_only)
    perturb(dm)
    x = x_in(3, 8)
    dm.export_peft(tmp_path)
    pm = peft.PeftModel.from_pretrained(Two(), tmp_path).eval()
    assert_close(pm(x), dm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topk_only", [False, True])
def test_peft_save_loads_in_deltatune(tmp_path, topk_only):
    pm = peft_model(topk_only)
    perturb(pm)
    x = x_in(3, 8)
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(Two(), tmp_path)
    assert dm.adapters["default"].config.save_only_topk_weights is topk_only
    assert_close(dm(x), pm(x), rtol=1e-5, atol=1e-6)


def test_parity_with_peft_on_copied_weights():
    pm = peft_model()
    dm = inject(Two())
    perturb(dm, std=0.5)
    with torch.no_grad():
        pm.base_model.vblora_vector_bank["default"].copy_(dm.shared["default"].vblora_vector_bank)
        for p in ("a", "b"):
            mod, delta = getattr(pm.base_model.model, p), getattr(dm.model, p).deltas["default"]
            mod.vblora_logits_A["default"].copy_(delta.vblora_logits_A)
            mod.vblora_logits_B["default"].copy_(delta.vblora_logits_B)
            A, B = mod._get_lora_matrices("default")
            A2, B2 = delta.factors()
            assert max_diff(A, A2) == 0 and max_diff(B, B2) == 0
    x = x_in(3, 8)
    assert_close(pm(x), dm(x), rtol=1e-5, atol=1e-6)


# --- real model ---------------------------------------------------------------------------------------


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    dm = dt.inject(make_minilm(), dt.make_config("vblora", targets=["query", "value"], r=4, num_vectors=32,
                                                vector_length=128))
    assert dm.trainable_parameters() == 12 * 4 * (384 + 384) // 128 * 32 + 32 * 128
    losses = train_losses(dm, minilm_batch, lr=5e-3, eval_mode=True, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses
