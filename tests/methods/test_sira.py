"""SiRA: gathered top-k routing with capacity equals a dense all-experts reference; count, init, errors."""

from __future__ import annotations

import math

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
import deltatune.methods.lowrank.sira  # noqa: F401
from deltatune.methods.lowrank.sira import SiRAConfig

E, K, R = 4, 2, 3


def make():
    torch.manual_seed(0)
    return nn.Linear(12, 10), torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(0))


def inject(layer, **kw):
    return dt.inject(Holder(layer), SiRAConfig(experts=E, top_k=K, r=R, targets=["layer"], **kw))


def dense_reference(layer, d, x, capacity, normalize=False):
    """All E experts on all tokens, weighted by a combine matrix built with a plain loop (GShard priority)."""
    xt = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(xt @ d.sira_gate.t(), -1)
    w, idx = probs.topk(K, -1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    combine = torch.zeros(len(xt), E)
    count = [0] * E
    for j in range(K):
        for n in range(len(xt)):
            e = int(idx[n, j])
            if capacity is None or count[e] < capacity:
                combine[n, e] = w[n, j]
                count[e] += 1
    every = torch.einsum("td,erd,eor->teo", xt, d.sira_A, d.sira_B) * d.scale  # (T, E, d_out)
    y = (combine[:, :, None] * every).sum(1)
    return layer(x) + y.reshape(*x.shape[:-1], -1), combine


def test_parameter_count_and_init():
    layer, x = make()
    base = layer(x).detach()
    dm = inject(layer)
    P = E * R * (12 + 10) + E * 12
    assert dm.trainable_parameters() == P
    assert eval(dt.get_method("sira").formula, {}, {"E": E, "r": R, "d_in": 12, "d_out": 10}) == P
    assert dt.get_method("sira").family == "mixture"
    assert max_diff(dm(x), base) == 0  # every B_e = 0


@pytest.mark.parametrize("capacity_factor,normalize", [(None, False), (1.0, False), (0.5, True)])
def test_routed_equals_dense_reference(capacity_factor, normalize):
    layer, x = make()
    dm = inject(layer, capacity_factor=capacity_factor, normalize=normalize)
    perturb(dm, std=0.5)
    d = dm.model.layer.deltas["default"]
    T = x.shape[0] * x.shape[1]
    C = None if capacity_factor is None else math.ceil(capacity_factor * K * T / E)
    ref, combine = dense_reference(layer, d, x, C, normalize)
    assert_close(dm(x), ref)
    nnz = (combine > 0).sum(0)
    assert (nnz <= (C or T)).all()
    if capacity_factor == 0.5:
        assert (combine > 0).sum() < K * T  # some assignments were really dropped
    else:
        assert ((combine > 0).sum(1) == K).all() if C is None else True


def test_gradients_and_not_mergeable():
    layer, x = make()
    dm = inject(layer)
    perturb(dm)
    d = dm.model.layer.deltas["default"]
    dm.train()
    dm(x).square().sum().backward()
    assert d.sira_A.grad.abs().sum() > 0 and d.sira_B.grad.abs().sum() > 0 and d.sira_gate.grad.abs().sum() > 0
    assert layer.weight.grad is None and layer.bias.grad is None
    with pytest.raises(ValueError, match="cannot be merged"):
        dm.merge()


def test_expert_dropout_and_aux_loss():
    layer, x = make()
    dm = inject(layer, expert_dropout=0.5, aux_loss_weight=0.01, capacity_factor=None)
    perturb(dm)
    dm.eval()
    y_eval = dm(x).detach()
    assert dm(x).sub(y_eval).abs().max() == 0  # eval: deterministic, no expert dropout
    dm.train()
    assert max_diff(dm(x), y_eval) > 1e-4
    reg = dm.regularization_loss()
    assert 0.01 * 0.99 <= reg.item() <= 0.01 * E  # E·sum f P lies in [1, E] (times the weight)


def test_save_load_and_mixed_batch(tmp_path):
    layer, x = make()
    dm = inject(layer)
    perturb(dm)
    assert_round_trip(dm, Holder(make()[0]), x, tmp_path)
    dm.add_adapter("other", SiRAConfig(experts=2, top_k=1, r=2, targets=["layer"]))
    perturb(dm.model.layer.deltas["other"], seed=5)
    # capacity is over the rows an adapter sees: each row against its adapter run on that row alone
    assert_rows_match_each_adapter(dm, x, ["default", "other", dt.BASE], rows_alone=True, base=layer(x))


def test_bad_options():
    with pytest.raises(ValueError, match="top_k=5 is larger than experts=4"):
        SiRAConfig(experts=4, top_k=5)
    with pytest.raises(ValueError, match="Linear / GPT-2 Conv1D"):
        dt.inject(Holder(nn.Conv2d(3, 4, 3)), SiRAConfig(targets=["layer"]))
    with pytest.raises(ValueError):
        SiRAConfig(capacity_factor=0)


def test_minilm_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), SiRAConfig(experts=4, top_k=2, r=4, targets=["query"]),
                   train_modules=["classifier"])
    assert dm.trainable_parameters() == 6 * (4 * 4 * (384 + 384) + 4 * 384) + 770
    # train_losses adds dm.regularization_loss() (0 here: aux_loss_weight defaults to 0, so task loss = total)
    losses = train_losses(dm, minilm_batch, steps=4, lr=3e-3, labels=torch.tensor([1, 0, 1, 1]))
    assert losses[-1] < losses[0]
