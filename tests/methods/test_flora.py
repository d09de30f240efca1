"""FLoRA (Tucker ΔW keeping the weight's N-D shape): P, init, gradients, merge, save/load, mixed batches,
the activation-space forward against the materialised ΔW, and the Tucker reconstruction itself."""

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
from torch.func import functional_call

import deltatune as dt
import deltatune.methods.structured.flora  # noqa: F401

LAYERS = {
    "linear": lambda: (nn.Linear(12, 10), torch.randn(4, 12)),
    "conv2d": lambda: (nn.Conv2d(5, 6, 3, padding=1, stride=2), torch.randn(2, 5, 7, 7)),
    "conv1d": lambda: (nn.Conv1d(4, 6, 3, padding=2, dilation=2), torch.randn(2, 4, 9)),
    "conv3d": lambda: (nn.Conv3d(3, 4, (2, 3, 3)), torch.randn(1, 3, 4, 5, 5)),
    "conv1x1": lambda: (nn.Conv2d(6, 5, 1), torch.randn(2, 6, 4, 4)),
    "depthwise": lambda: (nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.randn(2, 4, 5, 5)),
    "embedding": lambda: (nn.Embedding(20, 8), torch.randint(0, 20, (3, 5))),
}


def make(kind: str):
    torch.manual_seed(0)
    return LAYERS[kind]()


def inject(layer: nn.Module, **options) -> dt.DeltaModel:
    return dt.inject(Holder(layer), dt.make_config("flora", targets=["layer"], **options))


def expected_p(modes: tuple[int, ...], r: int, r_kernel: int) -> int:
    ranks = [min(r, n) for n in modes[:2]] + [min(r_kernel, n) for n in modes[2:]]
    core = 1
    for k in ranks:
        core *= k
    return core + sum(k * n for k, n in zip(ranks, modes))


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d", "conv3d", "conv1x1", "embedding"])
@pytest.mark.parametrize("r,r_kernel", [(2, 1), (3, 2), (4, 3)])
def test_trainable_count_matches_formula(kind, r, r_kernel):
    layer, _ = make(kind)
    dm = inject(layer, r=r, r_kernel=r_kernel)
    if isinstance(layer, nn.Embedding):
        modes = (layer.embedding_dim, layer.num_embeddings)
    else:
        modes = tuple(layer.weight.shape)
    assert dm.trainable_parameters() == expected_p(modes, r, r_kernel)
    if kind in ("linear", "embedding"):  # the registry's linear formula, evaluated
        d_out, d_in = modes
        formula = dt.get_method("flora").formula.split(" (")[0]
        assert eval(formula, {}, {"r_out": r, "r_in": r, "d_out": d_out, "d_in": d_in}) == dm.trainable_parameters()


def test_linear_count_by_hand():
    dm = inject(nn.Linear(64, 32), r=4)
    assert dm.trainable_parameters() == 4 * 4 + 4 * 32 + 4 * 64


@pytest.mark.parametrize("kind", list(LAYERS))
def test_output_at_init_equals_base_and_grads_reach_only_flora(kind):
    layer, x = make(kind)
    base = layer(x).detach()
    dm = inject(layer)
    assert max_diff(dm(x), base) == 0
    delta = dm.model.layer.deltas["default"]
    assert torch.count_nonzero(delta.flora_G) == 0 and all(torch.count_nonzero(U) > 0 for U in delta.factors())
    perturb(dm)
    dm(x).square().sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())


def test_factor_init_std():
    delta = inject(nn.Linear(4000, 3000), r=8).model.layer.deltas["default"]
    for U in (delta.flora_U_in, delta.flora_U_out):  # kaiming_normal_(a=sqrt(3)) on (n, r): std 1/sqrt(2r)
        assert abs(U.std().item() - (1 / 16) ** 0.5) < 0.01


@pytest.mark.parametrize("kind", list(LAYERS))
def test_activation_forward_equals_materialised_delta(kind):
    layer, x = make(kind)
    dm = inject(layer, r=3, scale=2.0)
    perturb(dm, std=0.3)
    wl = dm.model.layer
    delta = wl.deltas["default"]
    dW = delta.delta_weight(wl)
    w = layer.weight
    expected = functional_call(layer, {"weight": w + wl.kind.to_weight(dW, w)}, (x,))
    assert_close(dm(x), expected)
    assert max_diff(dm(x), layer(x)) > 1e-2


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv3d"])
def test_tucker_reconstruction(kind):
    layer, _ = make(kind)
    dm = inject(layer, r=3, r_kernel=2, scale=0.5)
    perturb(dm)
    delta = dm.model.layer.deltas["default"]
    T = delta.delta_tensor()
    shape = tuple(layer.weight.shape)
    assert tuple(T.shape) == shape  # the core keeps the weight's topology
    assert tuple(delta.flora_G.shape) == tuple(min(3 if i < 2 else 2, n) for i, n in enumerate(shape))
    assert [tuple(U.shape)[0] for U in delta.factors()] == list(shape)  # one factor per mode, kernels too
    letters = "abcde"[: len(shape)]
    spec = letters + "," + ",".join(f"{c.upper()}{c}" for c in letters) + "->" + letters.upper()
    ref = 0.5 * torch.einsum(spec, delta.flora_G, *delta.factors())
    assert_close(T, ref, rtol=1e-5, atol=1e-6)
    if kind == "linear":  # ΔW = s · U_out G U_in^T
        assert_close(T, 0.5 * delta.flora_U_out @ delta.flora_G @ delta.flora_U_in.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "depthwise", "embedding"])
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    layer, x = make(kind)
    W0 = layer.weight.detach().clone()
    dm = inject(layer)
    perturb(dm, std=0.3)
    y = dm(x).detach()
    dm.merge()
    assert max_diff(layer.weight, W0) > 1e-3
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)
    assert_close(dm(x), y)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown option 'rank'"):
        dt.make_config("flora", rank=4)
    for bad in ({"r": 0}, {"r_kernel": 0}, {"scale": 0}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            dt.make_config("flora", **bad)


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    torch.manual_seed(0)
    model = make_minilm()
    dm = dt.inject(model, dt.make_config("flora", r=8, scale=4.0, targets=["query", "value"]))
    n_layers = len(model.bert.encoder.layer)
    assert dm.trainable_parameters() == 2 * n_layers * (8 * 8 + 8 * 384 + 8 * 384)
    # eval mode: no dropout, so the loss curve is deterministic; gradients still flow
    losses = train_losses(dm, minilm_batch, lr=5e-3, eval_mode=True, labels=torch.tensor([1, 0, 0, 1]))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
