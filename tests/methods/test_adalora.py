"""AdaLoRA: the definition by hand, the budget schedule, parity with peft 0.21's RankAllocator (same seeds and
batches give the same masks and weights), PEFT files both ways, and exact resume through the trainer."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, perturb
from torch import nn

import deltatune as dt
from deltatune.methods.allocation.adalora import AdaLoRA, budget_schedule, ranks

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """Three linears; forward(x, y) returns an object with .loss, as PEFT's AdaLoRA needs for its penalty."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x, y=None):
        out = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return SimpleNamespace(logits=out, loss=None if y is None else nn.functional.cross_entropy(out, y))


OPTIONS = dict(init_r=6, target_r=3, alpha=8.0, tinit=2, tfinal=3, delta_t=2, total_step=16, orth_reg_weight=0.5)
TARGETS = ["fc1", "fc2"]


def batches(n=16):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def peft_config(**kw):
    o = {**OPTIONS, **kw}
    return peft.AdaLoraConfig(init_r=o["init_r"], target_r=o["target_r"], lora_alpha=o["alpha"], tinit=o["tinit"],
                              tfinal=o["tfinal"], deltaT=o["delta_t"], total_step=o["total_step"],
                              orth_reg_weight=o["orth_reg_weight"], target_modules=TARGETS, lora_dropout=0.0)


def test_forward_is_the_definition_and_starts_at_the_base():
    model = Net()
    x = torch.randn(4, 16)
    base = model(x).logits
    dm = dt.inject(model, dt.make_config("adalora", targets=TARGETS, **OPTIONS))
    assert torch.equal(dm(x).logits, base)  # Λ = 0
    perturb(dm, std=0.1)
    d = model.fc1.deltas["default"]
    P, lam, Q = d.lora_B, d.lora_E.view(-1), d.lora_A
    dw = 8.0 / (6 + 1e-5) * P @ torch.diag(lam) @ Q
    assert_close(model.fc1.deltas["default"].delta_weight(model.fc1), dw)
    h = torch.tanh(nn.functional.linear(x, model.fc1.base_layer.weight + dw, model.fc1.base_layer.bias))
    expected_fc2 = dm.model.fc2(h)
    assert_close(dm.model.fc2(torch.tanh(dm.model.fc1(x))), expected_fc2)
    # the penalty: weight · mean over 2L factors of ||QQᵀ - I||_F, ||PᵀP - I||_F
    terms = [torch.linalg.matrix_norm(m.deltas["default"].lora_A @ m.deltas["default"].lora_A.t() - torch.eye(6))
             + torch.linalg.matrix_norm(m.deltas["default"].lora_B.t() @ m.deltas["default"].lora_B - torch.eye(6))
             for m in (model.fc1, model.fc2)]
    assert_close(dm.regularization_loss(), 0.5 * sum(terms) / 4)


def test_budget_schedule_is_cubic_between_tinit_and_total_minus_tfinal():
    c = dt.make_config("adalora", targets=TARGETS, init_r=12, target_r=4, tinit=10, tfinal=10, delta_t=5)
    assert budget_schedule(c, 2, 10, 100) == (24, False)
    assert budget_schedule(c, 2, 91, 100) == (8, True)
    b, mask = budget_schedule(c, 2, 50, 100)
    assert (b, mask) == (int(16 * (1 - 40 / 80) ** 3 + 8), True)
    assert budget_schedule(c, 2, 51, 100)[1] is False  # allocations every delta_t steps only
    budgets = [budget_schedule(c, 2, t, 100)[0] for t in range(0, 101)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))


def test_bad_schedule_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="tinit < total_step - tfinal"):
        dt.make_config("adalora", targets=TARGETS, tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ValueError, match="target_r=9 must be <= init_r=6"):
        dt.make_config("adalora", targets=TARGETS, init_r=6, target_r=9)


def test_the_schedule_needs_its_length():
    dm = dt.inject(Net(), dt.make_config("adalora", targets=TARGETS, **{**OPTIONS, "total_step": None}))
    with pytest.raises(ValueError, match="set total_step, or pass total_steps"):
        dm.after_update(0)
    dm.after_update(0, total_steps=16)  # the trainer passes its own
    assert int(dm.shared["default"].total_step) == 16
    with pytest.raises(ValueError, match="tinit < total_step - tfinal"):
        dm.after_update(0, total_steps=5)


def _peft_and_ours(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(Net(), peft_config(**kw))
    dm = dt.inject(Net(), dt.make_config("adalora", targets=TARGETS, **{**OPTIONS, **kw}))
    with torch.no_grad():  # the same start: PEFT's random P, Q
        for name in TARGETS:
            src = pm.base_model.model.get_submodule(name)
            d = dm.model.get_submodule(name).deltas["default"]
            for f in ("lora_A", "lora_E", "lora_B"):
                getattr(d, f).copy_(getattr(src, f)["default"])
    return pm, dm


def _peft_params(pm):
    return [p for n, p in pm.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("tfinal", [3, 0])
def test_masks_and_weights_match_peft_step_by_step(tfinal):
    pm, dm = _peft_and_ours(tfinal=tfinal)
    opt_p = torch.optim.AdamW(_peft_params(pm), lr=2e-2)
    opt_d = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=2e-2)
    cfg = pm.peft_config["default"]
    allocations = 0
    for step, (x, y) in enumerate(batches(OPTIONS["total_step"])):
        loss_p = pm.base_model(x, y).loss  # PEFT adds the penalty in its tuner forward
        loss_d = dm(x, y).loss + dm.regularization_loss()
        assert_close(loss_d, loss_p, msg=f"step {step}")
        loss_p.backward()
        loss_d.backward()
        opt_p.step()
        opt_d.step()
        pm.base_model.update_and_allocate(step)
        dm.after_update(step)
        opt_p.zero_grad()
        opt_d.zero_grad()
        for name in TARGETS:
            src, d = pm.base_model.model.get_submodule(name), dm.model.get_submodule(name).deltas["default"]
            assert_close(d.lora_E, src.lora_E["default"], msg=f"{name} E at step {step}")
            if cfg.rank_pattern is not None:
                assert d.rank_mask.tolist() == cfg.rank_pattern[f"{name}.lora_E.default"], (name, step)
        allocations += cfg.rank_pattern is not None
    assert allocations > 0
    kept = sum(ranks(dm).values())
    if tfinal:
        assert kept == OPTIONS["target_r"] * len(TARGETS)  # the final allocation meets the target exactly
    assert kept < OPTIONS["init_r"] * len(TARGETS)


def _trained(steps=12):
    dm = dt.inject(Net(), dt.make_config("adalora", targets=TARGETS, **OPTIONS))
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=2e-2)
    for step, (x, y) in enumerate(batches(steps)):
        (dm(x, y).loss + dm.regularization_loss()).backward()
        opt.step()
        dm.after_update(step)
        opt.zero_grad()
    return dm


def test_peft_format_both_ways_with_equal_outputs(tmp_path):
    # the whole schedule, so the final mask holds (between allocations masked triplets train again and PEFT's
    # files, like ours, drop them)
    dm = _trained(OPTIONS["total_step"])
    x = torch.randn(5, 16)
    dm.eval()
    ours = dm(x).logits
    assert 0 < sum(ranks(dm).values()) < 12  # an allocation has pruned
    dm.export_peft(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(Net(), tmp_path / "peft").eval()
    for name in TARGETS:  # PEFT resized its layers to the kept triplets
        assert pm.base_model.model.get_submodule(name).lora_E["default"].shape[0] == ranks(dm)[name]
    assert_close(pm(x).logits, ours)
    pm.save_pretrained(tmp_path / "again")
    back = dt.load_peft(Net(), tmp_path / "again").eval()
    assert_close(back(x).logits, ours)
    assert ranks(back) == ranks(dm)


def test_peft_saved_adapter_loads_with_equal_outputs(tmp_path):
    pm, _ = _peft_and_ours()
    opt = torch.optim.AdamW(_peft_params(pm), lr=2e-2)
    for step, (x, y) in enumerate(batches(OPTIONS["total_step"])):  # to the fixed final mask
        pm.base_model(x, y).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randn(5, 16)
    dm = dt.load_peft(Net(), tmp_path / "peft").eval()
    assert_close(dm(x).logits, pm(x).logits)


def test_native_save_load_keeps_the_allocator_state(tmp_path):
    dm = _trained(9)
    dm.save(tmp_path / "a")
    back = dt.load(Net(), tmp_path / "a")
    for k, t in dm.adapter_state_dict().items():
        assert torch.equal(back.adapter_state_dict()[k], t), k
    assert isinstance(back.model.fc1.deltas["default"], AdaLoRA)


def test_resumed_training_continues_exactly():
    """A copy of the adapter state (what a checkpoint holds) continues to the same masks and weights."""
    dm = _trained(7)
    twin = dt.inject(Net(), dt.make_config("adalora", targets=TARGETS, **OPTIONS))
    twin.load_adapter_state_dict(copy.deepcopy(dm.adapter_state_dict()))
    for step in (7, 8):
        for m in (dm, twin):
            for p in m.parameters():
                if p.requires_grad:
                    p.grad = torch.ones_like(p) * 1e-2
            m.after_update(step)
    for k, t in dm.adapter_state_dict().items():
        assert torch.equal(twin.adapter_state_dict()[k], t), k
