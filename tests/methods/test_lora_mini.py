"""LoRA-Mini: parameter count r(a + b), init, gradients only to the inner pair, merge, save/load with regenerated
frozen matrices, mixed batches, bad options and a MiniLM run."""

from __future__ import annotations

import pytest
import torch
from helpers import Holder, TwoLinears, assert_close, max_diff, perturb
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.lora_mini  # noqa: F401

OPTS = {"r": 2, "a": 4, "b": 3, "alpha": 4.0}


Two = TwoLinears


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def mini(model, **options):
    return dt.inject(model, dt.make_config("lora_mini", **{**OPTS, "targets": ["a", "b"], **options}))


def make(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10), torch.randn(3, 12)
    return nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_count_init_merge(kind):
    layer, x = make(kind)
    W0, base = layer.weight.detach().clone(), layer(x).detach()
    dm = dt.inject(Holder(layer), dt.make_config("lora_mini", targets=["layer"], **OPTS))
    assert dm.trainable_parameters() == 2 * (4 + 3) == eval(dt.get_method("lora_mini").formula, {}, OPTS)
    assert max_diff(dm(x), base) == 0  # B_train = 0
    d = dm.model.layer.deltas["default"]
    assert torch.count_nonzero(d.lora_B_train) == 0 and torch.count_nonzero(d.lora_A_train) == d.lora_A_train.numel()
    assert d.lora_A_train.abs().max() <= 1 / 2  # kaiming_uniform(a=sqrt(5)) on (r, a): bound 1/sqrt(a)
    perturb(dm, std=0.5)
    y = dm(x).detach()
    assert max_diff(y, base) > 1e-3
    dW = (4.0 / 2) * d.lora_B_aux @ d.lora_B_train @ d.lora_A_train @ d.lora_A_aux
    assert_close(d.delta_weight(dm.model.layer), dW)
    dm.merge()
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)


def test_gradients_only_to_inner_pair():
    dm = mini(Two())
    dm(X).sum().backward()
    for name, p in dm.named_parameters():
        assert (p.grad is not None) == ("lora_A_train" in name or "lora_B_train" in name), name
    assert dm.model.a.deltas["default"].lora_B_train.grad.abs().sum() > 0  # A_train ≠ 0: training starts
    assert not any(b.requires_grad for b in dm.model.a.deltas["default"].buffers())


def test_save_load_regenerates_frozen_matrices(tmp_path):
    dm = mini(Two(), seed=7)
    perturb(dm)
    y = dm(X).detach()
    dm.save(tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter.safetensors")))
    assert keys == ["a.lora_A_train", "a.lora_B_train", "b.lora_A_train", "b.lora_B_train"]
    torch.manual_seed(999)  # the global RNG must not matter
    fresh = dt.load(Two(), tmp_path)
    assert max_diff(fresh(X), y) == 0
    for p in ("a", "b"):
        ours, theirs = dm.model.get_submodule(p).deltas["default"], fresh.model.get_submodule(p).deltas["default"]
        assert torch.equal(ours.lora_A_aux, theirs.lora_A_aux) and torch.equal(ours.lora_B_aux, theirs.lora_B_aux)
    other = mini(Two(), seed=8).model.a.deltas["default"]
    assert not torch.equal(other.lora_A_aux, dm.model.a.deltas["default"].lora_A_aux)
    assert not torch.equal(dm.model.a.deltas["default"].lora_B_aux[:, :3], dm.model.b.deltas["default"].lora_B_aux[:6])


def test_bad_options():
    for bad in ({"r": 0}, {"a": 0}, {"alpha": 0}, {"r": 5, "a": 4, "b": 8}):
        with pytest.raises(ValueError):
            dt.make_config("lora_mini", **bad)
    with pytest.raises(ValueError, match="a=13"):
        dt.inject(Holder(nn.Linear(12, 10)), dt.make_config("lora_mini", r=2, a=13, b=3, targets=["layer"]))
    with pytest.raises(ValueError, match="b=11"):
        dt.inject(Holder(nn.Linear(12, 10)), dt.make_config("lora_mini", r=2, a=3, b=11, targets=["layer"]))


def test_fused_path_gradients_reach_the_inner_pair():
    """The engine's fused linear path (low_rank()) gives A_train and B_train the gradients of the plain formula."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    dm = dt.inject(Holder(lin), dt.make_config("lora_mini", r=4, a=8, b=6, targets=["layer"]))
    d = dm.model.layer.deltas["default"]
    assert d.low_rank() is not None  # the fused path is the one taken
    perturb(dm, std=0.3)
    x = torch.randn(5, 64)
    dm(x).square().sum().backward()
    fused = [d.lora_A_train.grad.clone(), d.lora_B_train.grad.clone()]
    d.zero_grad()
    W = lin.weight + d.scale * d.lora_B_aux @ d.lora_B_train @ d.lora_A_train @ d.lora_A_aux
    torch.nn.functional.linear(x, W, lin.bias).square().sum().backward()
    for got, p in zip(fused, (d.lora_A_train, d.lora_B_train)):
        assert got.abs().min() > 0
        assert_close(got, p.grad)


def adam_moves(method: str, steps: int = 3, **options) -> float:
    """||ΔW|| / ||W0|| after a few Adam steps at one rate on a MiniLM-sized (384 x 384) layer."""
    torch.manual_seed(0)
    lin = nn.Linear(384, 384)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 384, generator=g), torch.randn(64, 384, generator=g)
    dm = dt.inject(Holder(lin), dt.make_config(method, targets=["layer"], **options))
    opt = torch.optim.Adam([p for p in dm.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        (dm(x) * target).sum().backward()
        opt.step()
    return (dm.model.layer.deltas["default"].delta_weight(dm.model.layer).norm() / lin.weight.norm()).item()


def test_adam_steps_move_the_update_as_far_as_lora():
    """Regression: with the official standard-normal A_aux, B_aux an Adam step moved ΔW ~90x as far as LoRA's at
    the same rate, so no single rate trained both the adapter and a new head (the methods table stayed at the
    head-only 0.575). Scaled by 1/sqrt(fan-in) (the default) the steps are LoRA's size."""
    lora = adam_moves("lora", r=8, alpha=16)  # the methods table's LoRA row
    assert 0.3 < adam_moves("lora_mini") / lora < 3
    assert adam_moves("lora_mini", aux_scale="unit") / lora > 30  # the official scale, still available


def test_aux_scale_fan_in_is_the_unit_draw_scaled():
    unit = mini(Two(), aux_scale="unit").model.a.deltas["default"]
    scaled = mini(Two()).model.a.deltas["default"]  # layer a: d_in = 8; OPTS b = 3
    assert_close(scaled.lora_A_aux, unit.lora_A_aux / 8**0.5)
    assert_close(scaled.lora_B_aux, unit.lora_B_aux / 3**0.5)


def test_minilm_lora_mini_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("lora_mini", targets=["query", "value"]))
    assert dm.trainable_parameters() == 12 * 16 * (32 + 32)  # defaults r=16, a=b=32
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([1, 0, 0, 1])
    dm.train()
    losses = []
    for _ in range(5):
        loss = dm(**minilm_batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
