"""Intrinsic-dimension training and SAID: θ = θ0 + M θ_d (SAID: λ_i per layer), M regenerated from a seed.

The definition by hand (dense M explicit; Fastfood against S H G Π H B built as dense matrices), the count,
the output at init, gradients only in θ_d (and λ), save/load, the seed regenerating M, and loss going down on
real Rotten Tomatoes batches on MiniLM. The engine-wide properties (merge, mixed batches, bf16 bases, other
layer kinds) are walked by tests/test_all_methods.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, assert_round_trip, perturb, train_losses
from torch import nn

import deltatune as dt
from deltatune.methods.subspace.intrinsic import fwht


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 10)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def inject(method: str, **options) -> dt.DeltaModel:
    return dt.inject(Net(), dt.make_config(method, targets=["a", "b"], **options))


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_fwht_is_the_hadamard_matrix():
    x = torch.randn(3, 16, dtype=torch.float64)
    assert_close(fwht(x), x @ sylvester(16).T)
    # and H H = L I: applying it twice gives L x
    assert_close(fwht(fwht(x)), 16 * x)


@pytest.mark.parametrize("method,extra", [("intrinsic", 0), ("said", 2)])
@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_count_is_d_plus_one_scale_per_layer_for_said(method, extra, projection):
    dm = inject(method, d=7, projection=projection)
    assert dm.trainable_parameters() == 7 + extra


@pytest.mark.parametrize("method", ["intrinsic", "said"])
@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_output_at_init_is_the_base(method, projection):
    x = torch.randn(4, 8)
    base = Net()(x)
    assert torch.equal(inject(method, d=5, projection=projection)(x), base)


def fastfood_matrix(delta) -> torch.Tensor:
    """M_i = s · [H G Π H B]_{:D, :d}, every factor as an explicit L x L matrix (float64)."""
    B, G, perm = delta.ff_B.double(), delta.ff_G.double(), delta.ff_perm
    L = B.numel()
    H, P = sylvester(L), torch.eye(L, dtype=torch.float64)[perm]  # (P v)_k = v[perm[k]]
    D, d = math.prod(delta.shape), delta.config.d
    full = H @ torch.diag(G) @ P @ H @ torch.diag(B)
    return full[:D, :d] / (G.norm() * math.sqrt(D))


@pytest.mark.parametrize("method", ["intrinsic", "said"])
@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_the_definition_by_hand(method, projection):
    """Every layer's W = W0 + λ_i reshape(M_i θ_d), M_i written out densely; the forward uses exactly that."""
    dm = inject(method, d=5, projection=projection)
    perturb(dm, std=0.5)
    theta = dm.shared["default"].theta_d.detach().double()
    x = torch.randn(4, 8)
    ref = Net()
    with torch.no_grad():
        for name in ("a", "b"):
            delta = dm.model.get_submodule(name).deltas["default"]
            M = delta.M.double() if projection == "dense" else fastfood_matrix(delta)
            lam = delta.said_lambda.double() if method == "said" else 1.0
            dW = (lam * (M @ theta)).view(delta.shape)
            assert_close(delta.delta_weight(None), dW, msg=name)
            getattr(ref, name).weight += dW.float()
    assert_close(dm(x), ref(x))


def test_fastfood_columns_are_about_unit_length_and_orthogonal():
    """The normalisation s = 1 / (||G|| sqrt(D)): columns of M_i near unit norm, nearly orthogonal (d << D)."""
    dm = dt.inject(nn.Sequential(nn.Linear(64, 32)), dt.make_config("intrinsic", d=8, targets=["0"]))
    M = fastfood_matrix(dm.model[0].deltas["default"])
    gram = M.T @ M
    assert_close(gram.diagonal(), torch.ones(8, dtype=torch.float64), rtol=0, atol=0.15)
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 0.15


@pytest.mark.parametrize("method", ["intrinsic", "said"])
def test_gradients_reach_only_theta_d_and_lambda(method):
    dm = inject(method, d=6)
    perturb(dm, std=0.3)  # λ's gradient is 0 while θ_d is: move off the init first
    dm(torch.randn(4, 8)).square().mean().backward()
    trained = {n for n, p in dm.named_parameters() if p.requires_grad}
    expected = {"shared.default.theta_d"} | ({"model.a.deltas.default.said_lambda", "model.b.deltas.default.said_lambda"}
                                             if method == "said" else set())
    assert trained == expected
    for n, p in dm.named_parameters():
        if n in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("method", ["intrinsic", "said"])
@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_save_holds_only_theta_d_and_lambda_and_loads_exactly(method, projection, tmp_path):
    dm = inject(method, d=5, projection=projection)
    perturb(dm, std=0.5)
    x = torch.randn(4, 8)
    assert_round_trip(dm, Net(), x, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "adapter").glob("*.safetensors")))
    assert sum(t.numel() for t in saved.values()) == dm.trainable_parameters()  # M is never stored


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_the_seed_regenerates_m_and_layers_differ(projection):
    def blocks(seed):
        dm = inject("intrinsic", d=5, projection=projection, seed=seed)
        with torch.no_grad():
            dm.shared["default"].theta_d.copy_(torch.arange(1.0, 6.0))
        return [dm.model.get_submodule(n).deltas["default"].projected().detach() for n in ("a", "b")]

    a0, b0 = blocks(0)
    a0_again, b0_again = blocks(0)
    assert torch.equal(a0, a0_again) and torch.equal(b0, b0_again)
    a1, _ = blocks(1)
    assert not torch.allclose(a0, a1)
    assert not torch.allclose(a0[:48], b0[:48])  # per-layer streams: the two blocks are not one matrix repeated


def test_merge_equals_the_unmerged_forward_and_unmerges():
    dm = inject("said", d=5)
    perturb(dm, std=0.5)
    x = torch.randn(4, 8)
    w0 = dm.model.a.base_layer.weight.clone()
    out = dm(x)
    dm.merge()
    assert_close(dm(x), out)
    dm.unmerge()
    assert_close(dm.model.a.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_d_larger_than_a_layer_and_bad_options():
    dm = dt.inject(nn.Sequential(nn.Linear(3, 2)), dt.make_config("intrinsic", d=20, targets=["0"]))
    assert dm.model[0].deltas["default"].ff_B.numel() == 32  # padded to the next power of two >= max(D, d)
    with pytest.raises(ValueError, match="projection"):
        dt.make_config("intrinsic", projection="sparse", targets=["0"])
    with pytest.raises(ValueError, match="fastfood"):  # a dense block too large to hold names the way out
        dt.inject(nn.Sequential(nn.Linear(4096, 4096)), dt.make_config("intrinsic", d=10_000, projection="dense",
                                                                         targets=["0"]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["intrinsic", "said"])
def test_minilm_loss_goes_down_on_rotten_tomatoes(method, make_minilm, minilm_tokenizer):
    from deltatune import assets

    rows = assets.rotten_tomatoes()
    rows = [r for r in rows if r["label"] == 1][:8] + [r for r in rows if r["label"] == 0][:8]
    batch = dict(minilm_tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=48,
                                  return_tensors="pt"))
    labels = torch.tensor([r["label"] for r in rows])
    dm = dt.inject(make_minilm(), dt.make_config(method, d=200, targets=["query", "value"]))
    layers = len(list(dm.layers()))  # every query and value
    assert layers == 12 and dm.trainable_parameters() == 200 + (layers if method == "said" else 0)
    losses = train_losses(dm, batch, steps=6, lr=0.3, eval_mode=True, labels=labels)
    assert losses[-1] < losses[0] - 0.02, losses
