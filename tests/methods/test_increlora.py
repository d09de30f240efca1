"""IncreLoRA: the budget is respected exactly, ranks grow where the scores are highest, a new triplet leaves the
output unchanged, the score is the official |ΔW ⊙ ∂L/∂ΔW| sum, save/load and an exact continuation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_close
from torch import nn

import deltatune as dt
from deltatune.methods.allocation.increlora import increase, ranks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(12, 12) for _ in range(4))

    def forward(self, x):
        for m in (self.l1, self.l2, self.l3, self.l4):
            x = torch.tanh(m(x))
        return x


PATHS = ["l1", "l2", "l3", "l4"]
OPTIONS = dict(r=1, target_r=3, max_r=6, add_r=2, top_h=2, tinit=1, delta_t=2)


def inject(**kw):
    return dt.inject(Net(), dt.make_config("increlora", targets=PATHS, **{**OPTIONS, **kw}))


def deltas(dm):
    return [dm.model.get_submodule(p).deltas["default"] for p in PATHS]


def train(dm, steps, start=0, lr=1e-2):
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        x = torch.randn(8, 12, generator=g)
        (dm(x).square().mean() + dm.regularization_loss()).backward()
        opt.step()
        dm.after_update(step, steps)
        opt.zero_grad()
    return opt


def test_ranks_grow_where_scores_are_highest():
    dm = inject(add_r=3)
    ds = deltas(dm)
    for d, (i, u) in zip(ds, [(1.0, 1.0), (3.0, 2.0), (0.5, 0.5), (2.0, 2.0)]):  # scores 1, 6, 0.25, 4
        d.ipt.fill_(i)
        d.unc.fill_(u)
    assert increase(ds, dm.shared["default"]) == [1, 3]
    assert ranks(dm) == {"l1": 1, "l2": 4, "l3": 1, "l4": 4}  # top_h = 2 modules gain add_r = 3
    assert not bool(dm.shared["default"].finished)
    # the budget is 4 x 3 = 12 triplets, 10 used: the top module gets the last 2, the next one none
    assert increase(ds, dm.shared["default"]) == [1]
    assert ranks(dm) == {"l1": 1, "l2": 6, "l3": 1, "l4": 4}
    assert bool(dm.shared["default"].finished)


def test_a_module_never_exceeds_max_r():
    dm = inject(top_h=1, target_r=5, max_r=6)
    ds = deltas(dm)
    ds[0].ipt.fill_(1.0)
    ds[0].unc.fill_(1.0)  # always the top module while it has room
    for _ in range(6):
        increase(ds, dm.shared["default"])
    assert max(ranks(dm).values()) <= 6 and ranks(dm)["l1"] == 6


def test_budget_is_respected_in_training_and_then_fixed():
    dm = inject()
    seen = []
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        (dm(torch.randn(8, 12)).square().mean() + dm.regularization_loss()).backward()
        opt.step()
        dm.after_update(step, 12)
        opt.zero_grad()
        seen.append(sum(ranks(dm).values()))
    assert seen[0] == 4 and max(seen) == 12 == seen[-1]  # starts at r per module, ends at the budget exactly
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert bool(dm.shared["default"].finished)


def test_adding_a_triplet_leaves_the_output_unchanged():
    dm = inject()
    train(dm, 3)
    dm.eval()
    x = torch.randn(5, 12)
    before = dm(x)
    for d in deltas(dm):
        d.grow(2)
    assert torch.equal(dm(x), before)
    # and the new triplets train from there: Λ gets a gradient
    dm.train()
    dm(x).square().mean().backward()
    d = deltas(dm)[0]
    assert d.lora_E.grad[d.active].abs().sum() > 0


def test_inactive_triplets_get_no_gradient():
    dm = inject()
    (dm(torch.randn(4, 12)).square().mean() + dm.regularization_loss()).backward()
    d = deltas(dm)[0]
    for p in (d.lora_A.grad[~d.active], d.lora_E.grad[~d.active], d.lora_B.grad[:, ~d.active]):
        assert torch.count_nonzero(p) == 0


def test_score_is_the_sensitivity_of_delta_w():
    dm = inject()
    train(dm, 2)  # Λ away from 0
    dm.train()
    x = torch.randn(6, 12)
    d = deltas(dm)[1]
    W = d.delta_weight(dm.model.l2).detach().requires_grad_()
    # by hand: the loss as a function of ΔW of l2
    layer = dm.model.l2
    with dm.disabled():
        h1 = dm.model.l1(x)
    h = torch.tanh(h1 + deltas(dm)[0].change(dm.model.l1, x))
    h2 = torch.tanh(nn.functional.linear(h, layer.base_layer.weight + W, layer.base_layer.bias))
    out = torch.tanh(dm.model.l4(torch.tanh(dm.model.l3(h2))))
    out.square().mean().backward()
    expected = (W * W.grad).abs().sum() / math.sqrt(W.numel())
    d.ipt.zero_(), d.unc.zero_()
    dm.zero_grad()
    dm(x).square().mean().backward()
    d.update_score()
    assert_close(d.ipt, (1 - d.config.beta1) * expected)


def test_save_load_and_exact_continuation(tmp_path):
    dm = inject()
    train(dm, 6)
    assert sum(ranks(dm).values()) > 4
    dm.save(tmp_path / "a")
    back = dt.load(Net(), tmp_path / "a")
    assert ranks(back) == ranks(dm)
    x = torch.randn(3, 12)
    dm.eval(), back.eval()
    assert torch.equal(back(x), dm(x))
    twin = inject()
    twin.load_adapter_state_dict(copy.deepcopy(dm.adapter_state_dict()))
    for m in (dm, twin):
        m.train()
        torch.manual_seed(5)
        train(m, 6, start=6)
    for k, t in dm.adapter_state_dict().items():
        assert torch.equal(twin.adapter_state_dict()[k], t), k


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="r <= target_r <= max_r"):
        dt.make_config("increlora", targets=PATHS, r=4, target_r=2)
    with pytest.raises(ValueError, match="r <= target_r <= max_r"):
        dt.make_config("increlora", targets=PATHS, target_r=8, max_r=4)
