"""GOFT and qGOFT: parameter counts, the parallel Givens arrangement, orthogonality, identity at init, the
qGOFT penalty, activation forward == materialised R, merge/unmerge, save/load, mixed batch, MiniLM."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Holder, assert_close, max_diff, perturb
from torch import nn

import deltatune as dt
import deltatune.methods.multiplicative.qgoft  # noqa: F401
from deltatune.methods.multiplicative.qgoft import givens_levels


def make_layer(kind: str, d_in: int = 16):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(d_in, 10), torch.randn(4, d_in, generator=g)
    return nn.Conv2d(4, 6, 2, padding=1), torch.randn(2, 4, 5, 5, generator=g)  # d_in = 16


def inject(layer, method, **opts):
    return dt.inject(Holder(layer), dt.make_config(method, targets=["layer"], **opts))


def reference_R(delta) -> torch.Tensor:
    """R = P_L ... P_1 (S) from dense level matrices, as the official get_delta_weight builds it."""
    d, G = delta.d_in, delta.blocks().detach()
    R = torch.diag(delta.givens_scale.detach()) if getattr(delta, "givens_scale", None) is not None else torch.eye(d)
    flag = 0
    for i, j in givens_levels(d):
        P, n = torch.eye(d), len(i)
        g = G[flag:flag + n]
        P[i, i], P[i, j], P[j, i], P[j, j] = g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1]
        R, flag = P @ R, flag + n
    return R


def _root(parent: list[int], a: int) -> int:
    while parent[a] != a:
        a = parent[a]
    return a


def test_arrangement_pairs():
    as_sets = lambda d: [set(zip(i.tolist(), j.tolist())) for i, j in givens_levels(d)]  # noqa: E731
    assert as_sets(8) == [{(0, 1), (2, 3), (4, 5), (6, 7)}, {(0, 2), (4, 6)}, {(0, 4)}]
    assert as_sets(6) == [{(0, 1), (2, 3), (4, 5)}, {(0, 2)}, {(0, 4)}]  # 4 carried over level 2
    for d in range(2, 70):
        levels = givens_levels(d)
        assert sum(len(i) for i, _ in levels) == d - 1 and len(levels) == math.ceil(math.log2(d))
        parent = list(range(d))  # the pairs form a spanning tree: every coordinate is reached
        for i, j in levels:
            assert len(set(i.tolist()) | set(j.tolist())) == 2 * len(i) and int(j.max()) < d  # disjoint in a level
            for a, b in zip(i.tolist(), j.tolist()):
                assert _root(parent, a) != _root(parent, b)  # no pair is redundant
                parent[_root(parent, a)] = _root(parent, b)
        assert len({_root(parent, a) for a in range(d)}) == 1


@pytest.mark.parametrize("method,scaling", [("goft", False), ("goft", True), ("qgoft", None)])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_count_init_grad_forward_merge(method, scaling, kind):
    layer, x = make_layer(kind)
    W0, base = layer.weight.detach().clone(), layer(x).detach()
    dm = inject(layer, method, **({} if scaling is None else {"scaling": scaling}))
    n = eval(dt.get_method(method).formula, {}, {"d_in": 16})
    assert n == (15 if method == "goft" else 60)
    assert dm.trainable_parameters() == n + (16 if scaling else 0)
    assert_close(dm(x), base, rtol=1e-5, atol=1e-6)  # R = I at init
    delta = dm.model.layer.deltas["default"]
    assert max_diff(reference_R(delta), torch.eye(16)) == 0
    perturb(dm, std=0.5)
    y = dm(x)
    assert max_diff(y, base) > 1e-3
    y.square().sum().backward()
    assert layer.weight.grad is None and all(p.grad is not None for p in delta.parameters())
    # the level-by-level activation forward equals the base layer with W0 Rᵀ, R built densely
    R = reference_R(delta)
    assert_close(delta.matrices()[0], R.t(), rtol=1e-5, atol=1e-6)
    W = (layer.weight.detach().reshape(layer.weight.shape[0], -1) @ R.t()).reshape(layer.weight.shape)
    ref = torch.func.functional_call(layer, {"weight": W, "bias": layer.bias}, (x,))
    assert_close(y, ref)
    dm.merge()
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0)


@pytest.mark.parametrize("d", [8, 6, 13])
def test_goft_rotation_orthogonal_and_reaches_every_coordinate(d):
    layer, _ = make_layer("linear", d)
    dm = inject(layer, "goft")
    perturb(dm, std=1.0)
    R = reference_R(dm.model.layer.deltas["default"])
    assert max_diff(R.t() @ R, torch.eye(d)) < 1e-5 and torch.linalg.det(R) > 0
    # d - 1 rotations in a tree rooted at coordinate 0: output 0 mixes every input (R x can send any unit
    # vector to e_0, the paper's Theorem 4.1), so R's first row is dense; the other rows are not (d - 1
    # angles cannot span SO(d), whose dimension is d(d-1)/2)
    assert (R[0].abs() > 1e-6).all()
    assert (R.abs() > 1e-6).sum() < d * d


def test_qgoft_penalty():
    layer, x = make_layer("linear")
    dm = inject(layer, "qgoft", lam=0.05)
    assert dm.regularization_loss().item() == 0  # identity blocks
    delta = dm.model.layer.deltas["default"]
    with torch.no_grad():  # scaled rotations: columns still orthogonal -> no penalty
        t = torch.randn(15)
        c, s = torch.cos(t), torch.sin(t)
        delta.givens_blocks.copy_(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2) * 1.7)
    assert dm.regularization_loss().item() < 1e-10
    perturb(dm)
    G = delta.givens_blocks.detach()
    expected = 0.05 * ((G[:, 0, 0] * G[:, 0, 1] + G[:, 1, 0] * G[:, 1, 1]) ** 2).sum()
    loss = dm.regularization_loss()
    assert loss.item() > 0
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert delta.givens_blocks.grad.abs().sum() > 0
    assert inject(make_layer("linear")[0], "qgoft", lam=0).regularization_loss().item() == 0


def test_save_load_and_mixed_batch(tmp_path):
    layer, x = make_layer("linear")
    dm = inject(layer, "goft")
    dm.add_adapter("q", dt.make_config("qgoft", targets=["layer"]))
    perturb(dm)
    names = ["q", "default", dt.BASE, "q"]
    mixed = dm(x, adapter_names=names).detach()
    alone = {}
    for n in ("default", "q"):
        dm.set_active(n)
        alone[n] = dm(x).detach()
    with dm.disabled():
        alone[dt.BASE] = dm(x).detach()
    for i, n in enumerate(names):
        assert_close(mixed[i], alone[n][i], rtol=1e-5, atol=1e-6)
    dm.save(tmp_path, "q")
    fresh = dt.load(Holder(make_layer("linear")[0]), tmp_path)
    assert max_diff(fresh(x), alone["q"]) == 0


def test_bad_options():
    with pytest.raises(ValueError):
        dt.make_config("qgoft", lam=-1)
    with pytest.raises(ValueError, match="d_in >= 2"):
        inject(nn.Linear(1, 4), "goft")
    with pytest.raises(ValueError, match="Embedding"):
        dt.inject(Holder(nn.Embedding(5, 4)), dt.make_config("goft", targets=["layer"]))


def test_minilm_goft_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("qgoft", targets=["query", "value"]))
    assert dm.trainable_parameters() == 12 * 4 * 383  # 6 layers x (query, value), d_in = 384
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([1, 0, 0, 1])
    dm.train()
    losses = []
    for _ in range(5):
        loss = dm(**minilm_batch, labels=labels).loss + dm.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_weight_form_for_many_tokens_equals_rotating_every_token(method, monkeypatch):
    """With >= d_in tokens the layer rotates W0 once; outputs and gradients are those of the per-token levels."""
    torch.manual_seed(0)
    dm = dt.inject(Holder(nn.Linear(12, 5)), dt.make_config(method, targets=["layer"]))
    perturb(dm, std=0.3)
    x = torch.randn(4, 6, 12)  # 24 tokens >= d_in = 12

    def run():
        dm.zero_grad()
        y = dm(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in dm.parameters() if p.requires_grad]

    y_weight, g_weight = run()
    delta = dm.model.layer.deltas["default"]
    monkeypatch.setattr(type(delta), "weight_form", False)
    y_tokens, g_tokens = run()
    assert_close(y_weight, y_tokens)
    for a, b in zip(g_weight, g_tokens):
        assert_close(a, b)
    assert max_diff(y_weight, dm.model.layer.base_layer(x)) > 1e-3  # the rotation acts
