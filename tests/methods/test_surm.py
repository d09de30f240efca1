"""SURM circulant / Toeplitz: count, init, gradients, merge, save/load, FFT forward == materialised structure."""

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
from torch.func import functional_call

import deltatune as dt
import deltatune.methods.structured.surm  # noqa: F401
from deltatune.methods.structured.surm import surm_count

METHODS = ["circulant", "toeplitz"]


def layer_and_input(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 8), torch.randn(4, 12)
    if kind == "square":
        return nn.Linear(6, 6), torch.randn(4, 6)
    return nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)


def inject(layer, method, **opts):
    return dt.inject(Holder(layer), dt.make_config(method, targets=["layer"], **opts))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,block,expected", [("square", None, {"circulant": 6, "toeplitz": 11}),
                                                 ("linear", None, {"circulant": 24, "toeplitz": 42}),
                                                 ("linear", 2, {"circulant": 48, "toeplitz": 72}),
                                                 ("conv2d", None, {"circulant": 36, "toeplitz": 66})])
def test_parameter_count_matches_formula(method, kind, block, expected):
    layer, _ = layer_and_input(kind)
    dm = inject(layer, method, block_size=block)
    d_out, d_in = layer.weight.flatten(1).shape
    assert dm.trainable_parameters() == expected[method] == surm_count(method, d_out, d_in, block)
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_init_is_zero_change_and_gradients_reach_only_the_vectors(method):
    layer, x = layer_and_input("linear")
    base = layer(x).detach()
    dm = inject(layer, method)
    assert max_diff(dm(x), base) == 0
    dm(x).square().sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    assert dm.model.layer.deltas["default"].surm_v.grad.abs().sum() > 0  # ΔW is linear in v: zero init still learns


def reference_matrix(method, v, n):
    """Block (i, j) written out entry by entry from its vector, with no index tricks shared with the method."""
    p, q, _ = v.shape
    M = torch.zeros(p * n, q * n)
    for bi in range(p):
        for bj in range(q):
            for i in range(n):
                for j in range(n):
                    k = (i - j) % n if method == "circulant" else i - j + n - 1
                    M[bi * n + i, bj * n + j] = v[bi, bj, k]
    return M


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,block", [("square", None), ("linear", None), ("linear", 2), ("square", 3)])
def test_fft_forward_equals_materialised_structured_matrix(method, kind, block):
    layer, x = layer_and_input(kind)
    x = torch.cat([x[:, None], x[:, None] * 2], dim=1)  # (4, 2, d_in): leading dims are kept
    W0 = layer.weight.detach().clone()
    dm = inject(layer, method, alpha=2.5, block_size=block)
    perturb(dm, std=0.3)
    delta = dm.model.layer.deltas["default"]
    M = 2.5 * reference_matrix(method, delta.surm_v.detach(), delta.n)
    assert_close(delta.delta_weight(dm.model.layer), M, rtol=1e-5, atol=1e-6)
    if method == "circulant":  # each block is circulant: every row is the previous one rolled right by one
        blk = M[: delta.n, : delta.n]
        assert torch.equal(blk[1:], torch.roll(blk, 1, dims=1)[:-1])
    else:  # constant along diagonals
        blk = M[: delta.n, : delta.n]
        assert torch.equal(blk[1:, 1:], blk[:-1, :-1])
    assert_close(dm(x), functional_call(layer, {"weight": W0 + M}, (x,)))


@pytest.mark.parametrize("method", METHODS)
def test_fft_forward_on_gpt2_conv1d(method):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer, x = Conv1D(8, 12), torch.randn(2, 3, 12)  # d_out 8, d_in 12, weight stored (12, 8)
    W0 = layer.weight.detach().clone()
    dm = inject(layer, method)
    perturb(dm, std=0.3)
    delta = dm.model.layer.deltas["default"]
    M = reference_matrix(method, delta.surm_v.detach(), delta.n)
    assert_close(dm(x), functional_call(layer, {"weight": W0 + M.t()}, (x,)))


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    layer, x = layer_and_input("conv2d")
    dm = inject(layer, method)
    perturb(dm, std=0.3)
    again = assert_round_trip(dm, Holder(layer_and_input("conv2d")[0]), x, tmp_path)
    assert type(again.adapters["default"].config).method == method


def test_mixed_adapter_batch():
    layer, x = layer_and_input("linear")
    dm = inject(layer, "circulant")
    dm.add_adapter("toep", dt.make_config("toeplitz", targets=["layer"], block_size=2))
    for name in ("default", "toep"):
        dm.set_active(name)
        perturb(dm, std=0.3, seed=len(name))
    assert_rows_match_each_adapter(dm, x, ["toep", dt.BASE, "default", "toep"], base=layer(x))


def test_bad_options():
    with pytest.raises(ValueError, match=r"block_size=5 must divide both sides of the layer \(8 x 12.*gcd = 4"):
        inject(nn.Linear(12, 8), "toeplitz", block_size=5)
    with pytest.raises(ValueError, match="did you mean 'block_size'"):
        dt.make_config("circulant", blocksize=4)
    for bad in ({"alpha": 0}, {"block_size": 0}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            dt.make_config("circulant", **bad)


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("circulant", targets=["query", "value"]))
    assert dm.trainable_parameters() == 6 * 2 * 384  # one 384-vector per square layer
    losses = train_losses(dm, minilm_batch, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses
