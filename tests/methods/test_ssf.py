"""SSF: gamma * out + beta per output channel; P = 2 d_out, inits, merge rules, norm layers."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    Holder,
    assert_close,
    max_diff,
    perturb,
    train_losses,
)
from torch import nn

import deltatune as dt
import deltatune.methods.multiplicative.ssf  # noqa: F401
from deltatune.engine import DeltaLayer
from deltatune.methods.multiplicative.ssf import SSF, SSFConfig

LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (4, 12), 10),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 5), 6),
}


def make(kind, **opts):
    build, shape, d_out = LAYERS[kind]
    torch.manual_seed(0)
    layer = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return layer, x, d_out, dt.make_config("ssf", targets=["layer"], **opts)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_count_init_and_math(kind):
    layer, x, d_out, cfg = make(kind)
    base = layer(x).detach()
    dm = dt.inject(Holder(layer), cfg)
    assert dm.trainable_parameters() == 2 * d_out
    assert max_diff(dm(x), base) == 0  # identity init: gamma = 1, beta = 0
    perturb(dm)
    d = dm.model.layer.deltas["default"]
    shape = (-1,) if kind == "linear" else (-1, 1, 1)
    assert_close(dm(x), base * d.ssf_scale.view(shape) + d.ssf_shift.view(shape), rtol=1e-5, atol=1e-6)


def test_paper_init_statistics():
    torch.manual_seed(0)
    dm = dt.inject(Holder(nn.Linear(4, 4000)), dt.make_config("ssf", targets=["layer"], init="paper"))
    d = dm.model.layer.deltas["default"]
    assert abs(d.ssf_scale.mean().item() - 1) < 2e-3 and abs(d.ssf_scale.std().item() - 0.02) < 2e-3
    assert abs(d.ssf_shift.mean().item()) < 2e-3 and abs(d.ssf_shift.std().item() - 0.02) < 2e-3


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    layer, x, _, cfg = make(kind)
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    dm = dt.inject(Holder(layer), cfg)
    perturb(dm, std=0.3)
    d = dm.model.layer.deltas["default"]
    y = dm(x).detach()
    dm.merge()
    assert_close(dm(x), y)
    assert_close(layer.bias, d.ssf_scale * b0 + d.ssf_shift, rtol=1e-5, atol=1e-6)  # b' = gamma b + beta
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.bias, b0)  # the bias comes back exactly


def test_merge_without_bias_is_refused():
    dm = dt.inject(Holder(nn.Linear(4, 3, bias=False)), dt.make_config("ssf", targets=["layer"]))
    with pytest.raises(ValueError, match="no bias to hold the shift beta"):
        dm.merge()
    assert dm.model.layer.merged == ()


def test_layernorm_delta_forward_and_merge():
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    W0, b0 = norm.weight.detach().clone(), norm.bias.detach().clone()
    x = torch.randn(2, 3, 8)
    base = norm(x).detach()
    layer = DeltaLayer(norm, None)
    layer.deltas["a"] = SSF(SSFConfig(init="paper"), layer)
    layer.active = ("a",)
    d = layer.deltas["a"]
    assert sum(p.numel() for p in d.parameters()) == 16
    assert_close(layer(x), base * d.ssf_scale + d.ssf_shift, rtol=1e-5, atol=1e-6)
    y = layer(x).detach()
    layer.merge("a")
    assert_close(layer(x), y)
    layer.unmerge()
    assert_close(norm.weight, W0, rtol=1e-5, atol=1e-6)
    assert torch.equal(norm.bias, b0)


def test_rmsnorm_delta_forward_but_no_merge():
    norm = nn.RMSNorm(8)
    x = torch.randn(2, 8)
    layer = DeltaLayer(norm, None)
    layer.deltas["a"] = SSF(SSFConfig(init="paper"), layer)
    layer.active = ("a",)
    d = layer.deltas["a"]
    assert_close(layer(x), norm(x) * d.ssf_scale + d.ssf_shift, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no bias"):
        layer.merge("a")


def test_ssf_targets_the_layernorms_of_a_real_model(make_minilm, minilm_batch):
    """SSF after LayerNorm (the paper's placement) through inject: the engine lets any_module methods target norms."""
    model = make_minilm()
    dm = dt.inject(model, dt.make_config("ssf", targets=["re:.*attention\\.output\\.LayerNorm"]))
    assert dm.trainable_parameters() == 6 * 2 * 384
    logits = dm(**minilm_batch).logits
    with dm.disabled():
        assert max_diff(dm(**minilm_batch).logits, logits) == 0  # identity init
    perturb(dm, std=0.05)
    expected = dm(**minilm_batch).logits
    dm.merge()
    assert_close(dm(**minilm_batch).logits, expected, rtol=1e-3, atol=1e-4)


def test_bad_options():
    with pytest.raises(ValueError):
        dt.make_config("ssf", init="normal")
    with pytest.raises(ValueError, match="per-channel"):
        layer = DeltaLayer(nn.ReLU(), None)
        SSF(SSFConfig(), layer)


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("ssf", targets=["query", "value"]), train_modules=["classifier"])
    assert dm.trainable_parameters() == 6 * 2 * (2 * 384) + 770
    losses = train_losses(dm, minilm_batch, labels=torch.tensor([1, 0, 1, 1]))
    assert losses[-1] < losses[0], losses
