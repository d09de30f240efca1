"""SORSA, LoRA-XS, EDoRA and LaMDA: counts, exact SVD split, regulariser, freeze schedule, merge, save/load."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    Holder,
    assert_close,
    assert_rows_match_each_adapter,
    max_diff,
    perturb,
    train_losses,
)
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.edora  # noqa: F401
import deltatune.methods.lowrank.lamda  # noqa: F401
import deltatune.methods.lowrank.lora_xs  # noqa: F401
import deltatune.methods.lowrank.sorsa  # noqa: F401

R = 3
METHODS = ["sorsa", "lora_xs", "edora", "lamda"]
OPTS = {"sorsa": {}, "lora_xs": {}, "edora": {}, "lamda": {"freeze_every": 2}}


def make_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10), torch.randn(4, 12, generator=g)
    return nn.Conv2d(3, 6, 3, padding=1, stride=2), torch.randn(2, 3, 7, 7, generator=g)


def inject(layer, method, **kw):
    return dt.inject(Holder(layer), dt.make_config(method, r=R, targets=["layer"], **{**OPTS[method], **kw}))


def expected_count(method, d_out, d_in, r=R):
    formula = dt.get_method(method).formula.split(" (")[0].replace("^", "**").replace("r(", "r*(")
    formula = formula.replace("r d_out", "r*d_out")
    return eval(formula, {}, {"r": r, "d_in": d_in, "d_out": d_out})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_count_init_grads(method, kind):
    layer, x = make_layer(kind)
    W = layer.weight.detach().flatten(1)
    d_out, d_in = W.shape
    base = layer(x).detach()
    dm = inject(layer, method)
    by_hand = {"sorsa": R * (d_in + d_out + 1), "lora_xs": R * R, "edora": R * R + d_out,
               "lamda": R * R + R * d_out}[method]
    assert dm.trainable_parameters() == by_hand == expected_count(method, d_out, d_in)
    # ΔW = 0 at init (SORSA, LaMDA) or O(1e-5) from R ~ N(0, 1e-5) (LoRA-XS, EDoRA, as the official code)
    assert max_diff(dm(x), base) < (1e-5 if method in ("sorsa", "lamda") else 1e-3)
    perturb(dm, std=0.2)
    dm(x).square().sum().backward()
    delta = dm.model.layer.deltas["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("method", ["lora_xs", "edora"])
def test_zero_R_init_is_exact(method):
    layer, x = make_layer("linear")
    base = layer(x).detach()
    dm = inject(layer, method, init_std=0.0)
    assert_close(dm(x), base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_sorsa_exact_split(kind):
    layer, x = make_layer(kind)
    W0 = layer.weight.detach().flatten(1).clone()
    dm = inject(layer, "sorsa")
    d = dm.model.layer.deltas["default"]
    principal = d.sorsa_U @ torch.diag(d.sorsa_S) @ d.sorsa_Vh
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    assert_close(principal, (U[:, :R] * S[:R]) @ Vh[:R])  # trainable part = top-r SVD part
    assert torch.equal(layer.weight.detach().flatten(1), W0)  # W0 itself is never modified
    assert max_diff(d.delta_weight(dm.model.layer), torch.zeros_like(W0)) == 0.0
    perturb(dm, std=0.2)
    U1 = d.sorsa_U @ torch.diag(d.sorsa_S) @ d.sorsa_Vh
    assert_close(d.delta_weight(dm.model.layer), U1 - principal)  # ΔW = W_p - W_p0 (s = 1)


@pytest.mark.parametrize("method", ["lora_xs", "edora"])
def test_lora_xs_factors_are_U_and_S_Vh(method):
    layer, _ = make_layer("linear")
    W0 = layer.weight.detach().clone()
    dm = inject(layer, method)
    d = dm.model.layer.deltas["default"]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    assert_close(d.lora_B.t() @ d.lora_B, torch.eye(R))  # B = U_r: orthonormal columns
    assert_close(d.lora_B @ d.lora_A, (U[:, :R] * S[:R]) @ Vh[:R])  # B A = top-r SVD part
    assert d.lora_R.std() < 1e-4 and d.lora_R.abs().sum() > 0  # R ~ N(0, 1e-5)
    assert not d.lora_A.requires_grad and not d.lora_B.requires_grad
    perturb(dm, std=0.2)
    assert_close(d.delta_weight(dm.model.layer), 16.0 / R * d.lora_B @ d.lora_R @ d.lora_A, rtol=1e-5, atol=1e-6)


def test_sorsa_regularizer():
    layer, x = make_layer("linear")
    dm = inject(layer, "sorsa", gamma=4e-4, lr=2e-4)
    d = dm.model.layer.deltas["default"]
    assert dm.regularization_loss().item() < 1e-5  # SVD factors are orthonormal
    with torch.no_grad():
        d.sorsa_U.mul_(2.0)  # U^T U = 4 I: ||3 I||_F = 3 sqrt(r)
    expected = 4e-4 / 2e-4 * 3 * R ** 0.5 / 2  # gamma/lr, mean over the 2 factors of this one layer
    assert_close(dm.regularization_loss(), torch.tensor(expected), rtol=1e-5, atol=1e-4)
    dm.regularization_loss().backward()
    assert d.sorsa_U.grad.abs().sum() > 0 and d.sorsa_S.grad is None  # S is not regularised
    # shrinking U towards orthonormality lowers the term (the gradient points the right way)
    before = dm.regularization_loss().item()
    with torch.no_grad():
        d.sorsa_U.sub_(0.01 * d.sorsa_U.grad)
    assert dm.regularization_loss().item() < before
    with torch.no_grad():
        d.sorsa_Vh.add_(0.3)
    d.sorsa_Vh.grad = None
    dm.regularization_loss().backward()
    assert d.sorsa_Vh.grad.abs().sum() > 0
    assert inject(make_layer("linear")[0], "sorsa", gamma=0.0).regularization_loss().item() == 0.0


def test_sorsa_regularizer_is_a_mean_over_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    dm = dt.inject(model, dt.make_config("sorsa", r=2, targets=["0", "1"], gamma=1.0, lr=1.0))
    layers = [layer for _, layer in dm.layers()]
    with torch.no_grad():
        for layer in layers:
            layer.deltas["default"].sorsa_U.mul_(2.0)
    per_layer = sum(layer.deltas["default"].orthonormality() for layer in layers)
    assert_close(dm.regularization_loss(), per_layer / 4, rtol=1e-5, atol=1e-6)  # 2 layers x 2 factors


def test_lamda_freeze_schedule():
    layer, x = make_layer("linear")
    dm = inject(layer, "lamda", freeze_every=2)
    d = dm.model.layer.deltas["default"]
    assert not d.lamda_A.requires_grad and torch.count_nonzero(d.lamda_B) == 0
    perturb(dm, std=0.2)
    for step, frozen in [(0, 0), (1, 0), (2, 1), (5, 2)]:
        dm.on_train_step(step)
        d.lamda_B.grad = None
        dm(x).square().sum().backward()
        g = d.lamda_B.grad
        assert torch.count_nonzero(g[:, :frozen]) == 0 and (g[:, frozen:].abs().sum(0) > 0).all()
        assert dm.trainable_parameters() == R * R + R * 10
    dm.on_train_step(2 * R)  # every column frozen: PMB stops training
    assert not d.lamda_B.requires_grad and dm.trainable_parameters() == R * R
    dm.on_train_step(0)  # a function of the step: a fresh run unfreezes it
    assert d.lamda_B.requires_grad
    dm.add_adapter("other", dt.make_config("lamda", r=R, targets=["layer"]))
    dm.on_train_step(0)  # an inactive adapter's PMB stays frozen
    assert not dm.model.layer.deltas["other"].lamda_B.requires_grad


def test_edora_reference_forward():
    layer, x = make_layer("linear")
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    dm = inject(layer, "edora")
    d = dm.model.layer.deltas["default"]
    assert_close(d.lora_magnitude, W0.norm(dim=1), rtol=1e-5, atol=1e-6)  # m starts at ||W0|| per row
    perturb(dm, std=0.2)
    V = W0 + 16.0 / R * d.lora_B @ d.lora_R @ d.lora_A
    assert_close(d.weight_norm(dm.model.layer), V.norm(dim=1))  # the row norm never forms V
    W = d.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    assert_close(dm(x), x @ W.t() + b0)


def test_mixed_adapter_batch():
    layer, x = make_layer("linear")
    dm = inject(layer, "sorsa")
    dm.add_adapter("xs", dt.make_config("lora_xs", r=R, targets=["layer"]))
    dm.add_adapter("lamda", dt.make_config("lamda", r=R, targets=["layer"]))
    dm.set_active(["default", "xs", "lamda"])
    perturb(dm, std=0.2)
    assert_rows_match_each_adapter(dm, x, ["xs", dt.BASE, "default", "lamda"], atol=1e-5)


def test_bad_options():
    with pytest.raises(ValueError, match="larger than the layer"):
        dt.inject(Holder(nn.Linear(4, 3)), dt.make_config("lora_xs", r=5, targets=["layer"]))
    with pytest.raises(ValueError, match="Embedding"):
        dt.inject(Holder(nn.Embedding(10, 4)), dt.make_config("edora", r=2, targets=["layer"]))
    with pytest.raises(ValueError, match="freeze_every"):
        dt.make_config("lamda", freeze_every=0)
    with pytest.raises(ValueError, match="did you mean 'gamma'"):
        dt.make_config("sorsa", gama=1.0)


@pytest.mark.parametrize("method", ["sorsa", "edora"])
def test_minilm_trains(method, make_minilm, minilm_batch):
    model = make_minilm()
    opts = {"sorsa": {"lr": 1e-3}, "edora": {}}[method]
    dm = dt.inject(model, dt.make_config(method, r=4, targets=["query", "value"], **opts))
    n_layers = len(list(dm.layers()))
    assert n_layers == 2 * model.config.num_hidden_layers
    d = model.config.hidden_size
    assert dm.trainable_parameters() == n_layers * expected_count(method, d, d, r=4)
    # eval(): no dropout noise, so 5 steps on one batch must lower the (task) loss; SORSA's regulariser is added
    losses = train_losses(dm, minilm_batch, lr=1e-3 if method == "sorsa" else 5e-3, eval_mode=True,
                          labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0]
