"""CapaBoost-LoRA: P equals LoRA's, init equals base, gradients, merge, save/load (masks regenerated, not
saved), rank(ΔW) > r, masks fixed and of the stated density, the reference sum of masked products, mixed
batches, errors and a MiniLM run."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    Holder,
    assert_close,
    assert_round_trip,
    assert_rows_match_each_adapter,
    perturb,
    train_losses,
)
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.capaboost  # noqa: F401

R, ALPHA = 3, 6.0


def make_layer(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        return nn.Linear(12, 10), torch.randn(4, 12, generator=g)
    return nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7, generator=g)


def inject(layer, **kw):
    return dt.inject(Holder(layer), dt.make_config("capaboost", targets=["layer"], r=R, alpha=ALPHA, **kw))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_trainable_count_equals_lora(kind):
    layer, _ = make_layer(kind)
    d_out, d_in = layer.weight.flatten(1).shape
    dm = inject(layer, d=3)
    assert dm.trainable_parameters() == R * (d_in + d_out)
    assert eval(dt.get_method("capaboost").formula.replace("r(", "r*("), {}, {"r": R, "d_in": d_in, "d_out": d_out}) \
        == dt.inject(Holder(make_layer(kind)[0]), dt.LoRAConfig(r=R, targets=["layer"])).trainable_parameters()


def test_gradients_reach_only_the_shared_pair():
    layer, x = make_layer("linear")
    dm = inject(layer)
    perturb(dm)
    dm(x).sum().backward()
    delta = dm.model.layer.deltas["default"]
    assert delta.lora_A.grad is not None and delta.lora_B.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None
    assert {n for n, p in dm.named_parameters() if p.requires_grad} == {"model.layer.deltas.default.lora_A",
                                                                         "model.layer.deltas.default.lora_B"}


def test_forward_is_the_sum_of_masked_lora_products():
    layer, x = make_layer("linear")
    dm = inject(layer, d=3)
    perturb(dm, std=0.3)
    delta = dm.model.layer.deltas["default"]
    dW = sum((delta.capa_mask_B[i] * delta.lora_B) @ (delta.capa_mask_A[i] * delta.lora_A) for i in range(3))
    expected = layer(x) + ALPHA / R * x @ dW.t()
    assert_close(dm(x), expected)


@pytest.mark.parametrize("d", [2, 3])
def test_rank_exceeds_r(d):
    layer, _ = make_layer("linear")
    dm = inject(layer, d=d)
    perturb(dm, std=0.3)
    dW = dm.model.layer.deltas["default"].delta_weight(dm.model.layer)
    assert R < torch.linalg.matrix_rank(dW) <= min(d * R, 10)
    lora = dt.inject(Holder(make_layer("linear")[0]), dt.LoRAConfig(r=R, targets=["layer"]))
    perturb(lora, std=0.3)
    assert torch.linalg.matrix_rank(lora.model.layer.deltas["default"].delta_weight(lora.model.layer)) == R


def test_masks_fixed_across_steps_have_density_and_regenerate_from_seed(tmp_path):
    layer, x = make_layer("linear")
    dm = inject(layer, d=2, density=0.5)
    delta = dm.model.layer.deltas["default"]
    mA, mB = delta.capa_mask_A.clone(), delta.capa_mask_B.clone()
    assert mA.shape == (2, R, 12) and mB.shape == (2, 10, R)
    assert mA.flatten(1).sum(1).tolist() == [18, 18] and mB.flatten(1).sum(1).tolist() == [15, 15]
    assert not torch.equal(mA[0], mA[1])  # distinct copies
    opt = torch.optim.SGD([p for p in dm.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        dm.on_train_step(step)
        dm(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(delta.capa_mask_A, mA) and torch.equal(delta.capa_mask_B, mB)
    assert not any("capa_mask" in k for k in dm.adapter_state_dict())  # regenerated from the seed, not saved
    back = assert_round_trip(dm, Holder(make_layer("linear")[0]), x, tmp_path)
    assert torch.equal(back.model.layer.deltas["default"].capa_mask_A, mA)
    other = inject(make_layer("linear")[0], seed=1).model.layer.deltas["default"]
    assert not torch.equal(other.capa_mask_A, mA)


def test_layers_get_different_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    dm = dt.inject(model, dt.make_config("capaboost", targets=["0", "1"], r=2))
    assert not torch.equal(dm.model[0].deltas["default"].capa_mask_A, dm.model[1].deltas["default"].capa_mask_A)


def test_mixed_adapter_batch():
    layer, x = make_layer("linear")
    dm = inject(layer)
    dm.add_adapter("other", dt.make_config("capaboost", targets=["layer"], r=2, d=3, seed=5))
    dm.set_active(["default", "other"])
    perturb(dm, std=0.3)
    assert_rows_match_each_adapter(dm, x, ["other", dt.BASE, "default", "other"], rows_alone=True)


def test_bad_options():
    with pytest.raises(ValueError):
        dt.make_config("capaboost", density=0.0)
    with pytest.raises(ValueError):
        dt.make_config("capaboost", d=0)
    with pytest.raises(ValueError, match="CapaBoost init must be 'kaiming' or 'gaussian'"):
        dt.make_config("capaboost", init="pissa")


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    dm = dt.inject(make_minilm(), dt.make_config("capaboost", targets=["query", "value"], r=4, d=2))
    assert dm.trainable_parameters() == 12 * 4 * (384 + 384)
    losses = train_losses(dm, minilm_batch, lr=2e-3, eval_mode=True, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses
