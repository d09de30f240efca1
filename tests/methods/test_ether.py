"""ETHER / ETHER+: P count, reflection properties at init, merge/unmerge, grads, save/load, mixed batch."""

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
import deltatune.methods.multiplicative.ether  # noqa: F401

CASES = [("ether", "input", 1), ("ether", "input", 4), ("ether", "output", 2),
         ("ether_plus", "input", 2), ("ether_plus", "output", 1), ("ether_plus", "both", 2)]


def make_layer(kind):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(16, 8), torch.randn(4, 16, generator=g)
    return nn.Conv2d(4, 8, 2, padding=1), torch.randn(2, 4, 5, 5, generator=g)  # d_in = 16


@pytest.mark.parametrize("method,side,n", CASES)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_ether_properties(method, side, n, kind):
    layer, x = make_layer(kind)
    W0, base = layer.weight.detach().clone(), layer(x).detach()
    dm = dt.inject(Holder(layer), dt.make_config(method, n_blocks=n, side=side, targets=["layer"]))
    d = {"input": 16, "output": 8, "both": 24}[side]
    assert dm.trainable_parameters() == (2 * d if method == "ether_plus" else d)
    if side == "input":
        assert eval(dt.get_method(method).formula, {}, {"d_in": 16}) == dm.trainable_parameters()
    delta = dm.model.layer.deltas["default"]
    M, N = delta.matrices()
    H = M if M is not None else N
    eye = torch.eye(H.shape[0])
    if method == "ether":  # a reflection per block: orthogonal, symmetric, ||H - I||_F = 2 sqrt(n), det (-1)^n
        assert max_diff(H.t() @ H, eye) < 1e-5 and max_diff(H, H.t()) < 1e-6
        assert abs(torch.linalg.matrix_norm(H - eye).item() - 2 * n ** 0.5) < 1e-4
        assert abs(torch.linalg.det(H).item() - (-1) ** n) < 1e-4
        assert max_diff(dm(x), base) > 1e-2  # not the identity at init
    else:  # ETHER+ starts at v = -u: the identity
        assert_close(dm(x), base, rtol=1e-5, atol=1e-6)
    W = delta.rotated_weight(dm.model.layer)
    ref = torch.func.functional_call(layer, {"weight": W.reshape(layer.weight.shape), "bias": layer.bias}, (x,))
    assert_close(dm(x), ref)
    perturb(dm)
    if method == "ether_plus":  # H+ is symmetric and a rank-2 perturbation of I per block with ||H+ - I||_2 <= 1
        M, N = delta.matrices()
        for H in (M, N):
            if H is not None:
                assert_close(H, H.t(), rtol=1e-5, atol=1e-6)
                assert torch.linalg.matrix_norm(H - torch.eye(H.shape[0]), ord=2) <= 1 + 1e-5
    dm(x).square().sum().backward()
    assert layer.weight.grad is None and all(p.grad is not None for p in delta.parameters())
    y = dm(x).detach()
    dm.merge()
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)


def test_activation_form_matches_householder_formula():
    layer, x = make_layer("linear")
    dm = dt.inject(Holder(layer), dt.make_config("ether", targets=["layer"]))
    u = dm.model.layer.deltas["default"].ether_u_in[0]
    H = torch.eye(16) - 2 * torch.outer(u, u) / u.dot(u)
    assert_close(dm(x), nn.functional.linear(x, layer.weight @ H, layer.bias))


def test_save_load_and_mixed_batch(tmp_path):
    layer, x = make_layer("linear")
    dm = dt.inject(Holder(layer), dt.make_config("ether", n_blocks=2, targets=["layer"]))
    dm.add_adapter("plus", dt.make_config("ether_plus", side="both", targets=["layer"]))
    dm.set_active("plus")
    perturb(dm)
    assert_rows_match_each_adapter(dm, x, ["plus", dt.BASE, "default", "plus"], atol=1e-5)
    assert_round_trip(dm, Holder(make_layer("linear")[0]), x, tmp_path, name="plus", atol=1e-6)


def test_bad_options():
    with pytest.raises(ValueError, match="d_in=16 does not split"):
        dt.inject(Holder(nn.Linear(16, 8)), dt.make_config("ether", n_blocks=3, targets=["layer"]))
    with pytest.raises(ValueError):
        dt.make_config("ether", side="both")  # two-sided is ETHER+ only (as the official code)


def test_ether_minilm_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("ether_plus", n_blocks=4, targets=["query", "value"]))
    assert dm.trainable_parameters() == 6 * 2 * 2 * 384
    losses = train_losses(dm, minilm_batch, labels=torch.tensor([1, 0, 1, 1]))  # the head's cross-entropy
    assert losses[-1] < losses[0]
