"""DyLoRA: every truncated rank b is a plain rank-b LoRA with scale alpha/b; rank draws are per (seed, step)."""

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
from torch.func import functional_call

import deltatune as dt
import deltatune.methods.lowrank.dylora  # noqa: F401
from deltatune.methods.lowrank.dylora import DyLoRAConfig, draw_rank, set_rank

R, ALPHA = 4, 8.0


def make(kind: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10), torch.randn(5, 12, generator=g)
    return nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 6, 6, generator=g)


def inject(layer, **kw):
    return dt.inject(Holder(layer), DyLoRAConfig(r=R, alpha=ALPHA, targets=["layer"], **kw))


def delta_of(dm):
    return dm.model.layer.deltas["default"]


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_parameter_count_and_init(kind):
    layer, x = make(kind)
    base = layer(x).detach()
    d_out, d_in = layer.weight.flatten(1).shape
    dm = inject(layer)
    assert dm.trainable_parameters() == R * (d_in + d_out)
    assert eval(dt.get_method("dylora").formula.replace("r(", "r*("), {}, {"r": R, "d_in": d_in, "d_out": d_out}) \
        == R * (d_in + d_out)
    for b in range(1, R + 1):
        set_rank(dm, b)
        assert max_diff(dm(x), base) == 0  # B = 0: the base model at every rank


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_each_rank_is_plain_lora_and_merges(kind):
    layer, x = make(kind)
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    dm = inject(layer)
    perturb(dm)
    d = delta_of(dm)
    outs = []
    for b in range(1, R + 1):
        set_rank(dm, b)
        dW = (ALPHA / b) * d.lora_B[:, :b] @ d.lora_A[:b]  # plain rank-b LoRA, scale alpha/b
        ref = functional_call(layer, {"weight": W0 + dW.reshape(W0.shape), "bias": b0}, (x,))
        y = dm(x)
        assert_close(y, ref)
        outs.append(y.detach())
        dm.merge()
        assert_close(layer.weight, W0 + dW.reshape(W0.shape), rtol=1e-5, atol=1e-6)
        assert_close(dm(x), y)
        with pytest.raises(RuntimeError, match="merged"):
            set_rank(dm, 1)
        dm.unmerge()
        assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)
    assert all(max_diff(a, c) > 1e-3 for a, c in zip(outs, outs[1:]))  # the ranks really differ


def test_rank_draw_is_shared_by_layers_and_replayed():
    cfg = DyLoRAConfig(r=8, r_min=3)
    draws = [draw_rank(cfg, s) for s in range(400)]
    assert draws == [draw_rank(cfg, s) for s in range(400)]  # resume replays
    assert set(draws) == set(range(3, 9))  # uniform support r_min..r
    assert draws != [draw_rank(DyLoRAConfig(r=8, r_min=3, seed=1), s) for s in range(400)]
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    dm = dt.inject(model, DyLoRAConfig(r=4, targets=["0", "2"]))
    dm.train()
    for step in range(20):
        dm.on_train_step(step)
        ranks = {layer.deltas["default"].rank for _, layer in dm.layers()}
        assert ranks == {draw_rank(DyLoRAConfig(r=4), step)}
    dm.eval()
    assert {layer.deltas["default"].rank for _, layer in dm.layers()} == {4}  # eval: eval_rank (default r)


def test_training_uses_the_drawn_rank_and_grads_stop_above_it():
    layer, x = make("linear")
    dm = inject(layer)
    perturb(dm)
    d = delta_of(dm)
    dm.train()
    step = next(s for s in range(100) if draw_rank(d.config, s) == 2)
    dm.on_train_step(step)
    set_rank(dm, 4)  # eval rank does not affect a training step
    y = dm(x)
    ref = layer(x) + (ALPHA / 2) * x @ (d.lora_B[:, :2] @ d.lora_A[:2]).t()
    assert_close(y, ref)
    y.square().sum().backward()
    assert d.lora_A.grad[2:].abs().sum() == 0 and d.lora_B.grad[:, 2:].abs().sum() == 0
    assert d.lora_A.grad[:2].abs().sum() > 0 and d.lora_B.grad[:, :2].abs().sum() > 0
    assert layer.weight.grad is None and layer.bias.grad is None


def test_frozen_mode_trains_only_the_bth_rank():
    layer, x = make("linear")
    dm = inject(layer, frozen=True)
    perturb(dm)
    d = delta_of(dm)
    dm.train()
    step = next(s for s in range(100) if draw_rank(d.config, s) == 3)
    dm.on_train_step(step)
    dm(x).square().sum().backward()
    nz_A = (d.lora_A.grad.abs().sum(1) > 0).tolist()
    nz_B = (d.lora_B.grad.abs().sum(0) > 0).tolist()
    assert nz_A == [False, False, True, False] and nz_B == [False, False, True, False]


def test_save_load_and_mixed_batch(tmp_path):
    layer, x = make("linear")
    dm = inject(layer, eval_rank=3)
    perturb(dm)
    y = dm(x).detach()
    loaded = assert_round_trip(dm, Holder(make("linear")[0]), x, tmp_path)
    assert delta_of(loaded).eval_rank == 3
    dm.add_adapter("other", DyLoRAConfig(r=2, targets=["layer"]))
    dm.set_active("other")
    perturb(dm, seed=7)
    alone = assert_rows_match_each_adapter(dm, x, ["default", "other", dt.BASE, "other", "default"], base=layer(x))
    assert torch.equal(alone["default"], y)  # adding "other" left "default" as it was


def test_bad_options():
    with pytest.raises(ValueError, match="r_min <= r"):
        DyLoRAConfig(r=4, r_min=5)
    with pytest.raises(ValueError, match="eval_rank=9"):
        DyLoRAConfig(r=4, eval_rank=9)
    with pytest.raises(ValueError, match="rslora"):
        DyLoRAConfig(r=4, rslora=True)
    dm = inject(make("linear")[0])
    with pytest.raises(ValueError, match="b=5 is outside 1..r=4"):
        set_rank(dm, 5)


def test_minilm_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), DyLoRAConfig(r=8, alpha=16, targets=["query", "value"]),
                   train_modules=["classifier"])
    assert dm.trainable_parameters() == 73_728 + 770
    labels = torch.tensor([1, 0, 1, 1])
    losses = train_losses(dm, minilm_batch, steps=6, lr=3e-3, labels=labels)  # on_train_step draws the ranks
    dm.eval()
    set_rank(dm, 8)
    with torch.no_grad():
        final = dm(**minilm_batch, labels=labels).loss.item()
    assert final < losses[0]
