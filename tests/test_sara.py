"""SaRA: the smallest-|W0| entries, the nuclear-norm penalty on ΔW written by hand, and the re-selection rule
(the k smallest |W0 + ΔW| at steps R, 2R, ...; kept entries keep their update). The engine's properties are
tests/test_selection.py's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, perturb, train_losses
from torch import nn

import deltatune as dt


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))


def delta_of(dm, path: str = "0"):
    return dict(dm.layers())[path].deltas["default"]


def test_the_selection_is_the_smallest_magnitudes():
    m = model()
    w = m[0].weight.detach().abs().reshape(-1)
    dm = dt.inject(m, dt.make_config("sara", density=0.25, targets=["0.weight"]))
    idx = delta_of(dm).index("weight")
    assert idx.numel() == math.ceil(0.25 * 120)
    assert w[idx].max() <= w[~torch.isin(torch.arange(120), idx)].min()


def test_the_penalty_is_lambda_times_the_nuclear_norm_of_the_update():
    dm = dt.inject(model(), dt.make_config("sara", density=0.3, nuclear_lambda=0.5, targets=["0.weight", "2.weight"]))
    perturb(dm, std=0.2)
    expected = 0
    for path in ["0", "2"]:
        d = delta_of(dm, path)
        shape = dict(dm.layers())[path].base_layer.weight.shape
        dw = torch.zeros(shape.numel()).index_put((d.index("weight"),), d.value("weight").detach()).reshape(shape)
        expected += 0.5 * torch.linalg.svdvals(dw).sum()
    assert_close(dm.regularization_loss(), torch.as_tensor(expected))
    off = dt.inject(model(), dt.make_config("sara", targets=["0.weight"]))
    assert off.regularization_loss().item() == 0


def test_reselection_takes_the_smallest_current_weights_and_keeps_kept_updates():
    m = model()
    dm = dt.inject(m, dt.make_config("sara", density=0.25, reselect_every=3, targets=["0.weight"]))
    d = delta_of(dm)
    with torch.no_grad():
        d.value("weight").add_(torch.linspace(0.0, 1.0, d.value("weight").numel()))  # the later ones grow large
    before = {i: v for i, v in zip(d.index("weight").tolist(), d.value("weight").tolist())}
    current = (m[0].base_layer.weight.detach() + d.dense(dict(dm.layers())["0"], "weight")).abs().reshape(-1)
    dm.on_train_step(2)
    assert before == dict(zip(d.index("weight").tolist(), d.value("weight").tolist()))  # not a re-selection step
    dm.on_train_step(3)
    idx = d.index("weight")
    assert torch.equal(idx, torch.sort(current, stable=True).indices[: idx.numel()].sort().values)
    assert set(idx.tolist()) != set(before)  # the grown entries left
    for i, v in zip(idx.tolist(), d.value("weight").tolist()):
        assert v == before.get(i, 0.0)


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = model()

    def forward(self, x, y):
        return SimpleNamespace(loss=nn.functional.mse_loss(self.net(x), y))


def test_loss_goes_down_on_a_small_regression():
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    y = torch.tanh(Regression().net(x).detach() * 3)  # reachable by moving the weights
    for every in (0, 8):  # a re-selection drops the updates of entries that left: the loss jumps, then falls
        dm = dt.inject(Regression(), dt.make_config("sara", density=0.2, nuclear_lambda=1e-3, reselect_every=every,
                                                    targets=["re:.*\\.weight"]))
        losses = train_losses(dm, {"x": x, "y": y}, steps=16, lr=3e-2)
        assert losses[-1] < 0.9 * losses[0], (every, losses)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="nuclear_lambda"):
        dt.make_config("sara", nuclear_lambda=-1)
    with pytest.raises(ValueError, match="reselect_evry"):
        dt.make_config("sara", reselect_evry=3)
