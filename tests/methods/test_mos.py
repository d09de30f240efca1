"""MoS: pool + private parameter count, init equals base, gradients, merge, save/load with the shared pools,
the shard-construction invariants (sharding, subset selection, pair dissociation, privatisation), mixed
batches, errors and a MiniLM run."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    Holder,
    assert_close,
    assert_round_trip,
    max_diff,
    perturb,
    train_losses,
)
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.mos  # noqa: F401

OPTS = {"r": 4, "pool_r": 2, "private_r": 1, "shards": 2, "alpha": 8.0}


class Stack(nn.Module):
    """Four 8 x 8 layers (one pool) and three 12 x 8 heads (a second pool)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.out = nn.ModuleList(nn.Linear(8, 12) for _ in range(3))

    def forward(self, x):
        for lin in self.l:
            x = torch.tanh(lin(x))
        return sum(head(x) for head in self.out)


def x_in(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def inject(model=None, **kw):
    return dt.inject(model or Stack(), dt.make_config("mos", targets=["re:l\\.\\d", "re:out\\.\\d"], **{**OPTS, **kw}))


def test_trainable_count_is_pool_plus_private():
    dm = inject()
    pool_r, p = 2, 1
    # every layer contributes pool_r (d_in + d_out): (pool_r - p) of it shared, p private
    expected = 4 * pool_r * (8 + 8) + 3 * pool_r * (8 + 12)
    assert dm.trainable_parameters() == expected
    shared, private = (pool_r - p) * 4 * (8 + 8), p * 4 * (8 + 8)
    assert shared + private == 4 * pool_r * 16
    formula = dt.get_method("mos").formula.split(" (")[0].replace("pool_r(", "pool_r*(")
    assert eval(formula, {}, {"pool_r": pool_r, "d_in": 8, "d_out": 8}) * 4 + 3 * 2 * 20 == expected
    assert all(p.numel() == 0 or not p.requires_grad for n, p in dm.model.named_parameters())


@pytest.mark.parametrize("kind", ["conv2d"])
def test_conv2d_count(kind):
    dm = dt.inject(Holder(nn.Conv2d(2, 4, 2)), dt.make_config("mos", targets=["layer"], r=2, pool_r=2, private_r=2,
                                                            shards=2))
    assert dm.trainable_parameters() == 2 * (8 + 4)
    x = x_in(2, 2, 5, 5)
    perturb(dm)
    y = dm(x).detach()
    dm.merge()
    assert_close(dm(x), y)


def test_gradients_reach_only_the_pools():
    dm = inject()
    perturb(dm)
    dm(x_in(3, 8)).sum().backward()
    grads = {n: p.grad for n, p in dm.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("shared.") for n in grads)
    assert all(p.grad is None for p in dm.model.parameters())


def test_save_load_round_trip(tmp_path):
    dm = inject()
    perturb(dm)
    state = dm.adapter_state_dict()
    assert {"__shared__.mos_A.8x8", "__shared__.mos_B.8x8", "__shared__.mos_A.12x8", "l.0.mos_index_A"} <= set(state)
    assert_round_trip(dm, Stack(), x_in(3, 8), tmp_path)


def test_shard_construction():
    dm = inject()
    r, p, n_sh, L = 4, 1, 2, 4
    pool_A = dm.shared["default"].mos_A["8x8"]
    n_shared = (2 - p) * L * n_sh
    assert pool_A.shape == (2 * L * n_sh, 8 // n_sh)
    idx = [dm.model.l[k].deltas["default"] for k in range(L)]
    for k, d in enumerate(idx):
        A, _ = d.factors()
        # vector sharding: row j of A is the concatenation of the shards idx[j·l : (j+1)·l]
        assert torch.equal(A[1], torch.cat([pool_A[d.mos_index_A[2]], pool_A[d.mos_index_A[3]]]))
        for ix in (d.mos_index_A, d.mos_index_B):
            assert len(ix) == r * n_sh and len(set(ix.tolist())) == r * n_sh  # subset selection, no repeats
            assert (ix[:(r - p) * n_sh] < n_shared).all()  # shared rows from the shared part
            # shard privatisation: the last p rows use this layer's own consecutive private shards
            assert ix[(r - p) * n_sh:].tolist() == list(range(n_shared + k * p * n_sh, n_shared + (k + 1) * p * n_sh))
    # pair dissociation: A and B pick their shared shards independently
    assert any(not torch.equal(d.mos_index_A, d.mos_index_B) for d in idx)
    # layers differ in their selection, and the selection follows the seed
    assert len({tuple(d.mos_index_A.tolist()) for d in idx}) > 1
    again = inject()
    assert all(torch.equal(a.mos_index_A, again.model.l[k].deltas["default"].mos_index_A) for k, a in enumerate(idx))
    other = inject(seed=1)
    assert any(not torch.equal(a.mos_index_A, other.model.l[k].deltas["default"].mos_index_A) for k, a in enumerate(idx))


def test_private_shards_change_one_layer_only():
    dm = inject()
    perturb(dm)
    before = [dm.model.l[k].deltas["default"].delta_weight(dm.model.l[k]).detach() for k in range(4)]
    n_shared = 8
    with torch.no_grad():  # layer 2's private shards of B
        dm.shared["default"].mos_B["8x8"][n_shared + 2 * 2: n_shared + 3 * 2] += 1.0
    after = [dm.model.l[k].deltas["default"].delta_weight(dm.model.l[k]) for k in range(4)]
    assert [max_diff(a, b) > 1e-4 for a, b in zip(after, before)] == [False, False, True, False]


def test_bad_options():
    with pytest.raises(ValueError, match="private_r=3 must be <= pool_r=2"):
        dt.make_config("mos", private_r=3, pool_r=2)
    with pytest.raises(ValueError, match="all pool shards are private"):
        dt.make_config("mos", r=4, pool_r=2, private_r=2)
    with pytest.raises(ValueError, match="needs .* 14 distinct shared shards.*pool only 2"):
        dt.inject(Holder(nn.Linear(8, 8)), dt.make_config("mos", targets=["layer"], r=8, pool_r=2, private_r=1))
    with pytest.raises(ValueError, match="shards=3 must divide"):
        dt.inject(Holder(nn.Linear(8, 8)), dt.make_config("mos", targets=["layer"], r=2, pool_r=2, private_r=2,
                                                        shards=3))


def test_minilm_trains(make_minilm, minilm_batch):
    dm = dt.inject(make_minilm(), dt.make_config("mos", targets=["query", "value"], r=8, pool_r=2, private_r=1,
                                                shards=2))
    assert dm.trainable_parameters() == 12 * 2 * (384 + 384)  # one 384 x 384 pool for all 12 layers
    losses = train_losses(dm, minilm_batch, eval_mode=True, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses
