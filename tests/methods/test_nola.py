"""NOLA: parameter count k + l, init, gradients, merge, save/load, seeded bases (per layer, per seed),
mixed batches, errors, and a MiniLM run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    Holder,
    TwoLinears,
    assert_close,
    assert_round_trip,
    max_diff,
    perturb,
    train_losses,
)
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.nola  # noqa: F401

OPTS = {"r": 2, "k": 5, "l": 7}


Two = TwoLinears


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def nola(model, **options):
    return dt.inject(model, dt.make_config("nola", **{**OPTS, "targets": ["a", "b"], **options}))


def make(kind):
    if kind == "linear":
        return nn.Linear(12, 10), torch.randn(3, 12)
    return nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_parameter_count_is_k_plus_l(kind):
    layer, _ = make(kind)
    dm = dt.inject(Holder(layer), dt.make_config("nola", targets=["layer"], **OPTS))
    assert dm.trainable_parameters() == 5 + 7 == eval(dt.get_method("nola").formula, {}, {"k": 5, "l": 7})
    wide = dt.inject(Holder(make(kind)[0]), dt.make_config("nola", targets=["layer"], **{**OPTS, "r": 5}))
    assert wide.trainable_parameters() == 12  # independent of the rank


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_output_at_init_equals_base_and_merge(kind):
    layer, x = make(kind)
    W0 = layer.weight.detach().clone()
    base = layer(x).detach()
    dm = dt.inject(Holder(layer), dt.make_config("nola", targets=["layer"], **OPTS))
    assert max_diff(dm(x), base) == 0
    delta = dm.model.layer.deltas["default"]
    assert torch.count_nonzero(delta.nola_alpha) == 0 and torch.count_nonzero(delta.nola_beta) == 0
    perturb(dm, std=0.5)
    y = dm(x).detach()
    assert max_diff(y, base) > 1e-3
    dm.merge()
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)


def test_training_starts_from_zero_coefficients():
    """Both coefficient sets are zero at init (official code); the frozen A0 offset still gives β a gradient."""
    dm = nola(Two())
    dm(X).sum().backward()
    delta = dm.model.a.deltas["default"]
    assert delta.nola_beta.grad.abs().sum() > 0
    for name, p in dm.named_parameters():
        assert (p.grad is not None) == ("nola_" in name), name


def test_delta_weight_is_the_mixture_of_bases():
    dm = nola(Two())
    perturb(dm)
    layer = dm.model.a
    d = layer.deltas["default"]
    A = d.nola_A0 + sum(d.nola_alpha[i] * d.nola_bases_A[i].view(2, 8) for i in range(5))
    B = sum(d.nola_beta[j] * d.nola_bases_B[j].view(6, 2) for j in range(7))
    assert_close(d.delta_weight(layer), (8.0 / 2) * B @ A, rtol=1e-5, atol=1e-6)
    assert d.nola_bases_A.abs().max() <= 1 / math.sqrt(5)  # uniform(-1, 1) / sqrt(k)


def test_save_load_regenerates_identical_bases(tmp_path):
    dm = nola(Two(), seed=11)
    perturb(dm)
    base = Two()  # Two() seeds the global RNG itself, so reseed after building it
    torch.manual_seed(999)  # the global RNG must not matter
    fresh = assert_round_trip(dm, base, X, tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter.safetensors")))
    assert keys == ["a.nola_alpha", "a.nola_beta", "b.nola_alpha", "b.nola_beta"]  # only coefficients
    for p in ("a", "b"):
        ours, theirs = dm.model.get_submodule(p).deltas["default"], fresh.model.get_submodule(p).deltas["default"]
        for name in ("nola_bases_A", "nola_bases_B", "nola_A0"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name))


def test_bases_differ_per_layer_and_per_seed():
    one, two = nola(Two(), seed=1), nola(Two(), seed=2)
    a1, a2 = one.model.a.deltas["default"], two.model.a.deltas["default"]
    assert not torch.equal(a1.nola_bases_A, a2.nola_bases_A) and not torch.equal(a1.nola_A0, a2.nola_A0)
    # official code: every layer has its own seed, so two layers of one adapter do not share bases
    b1 = one.model.b.deltas["default"]
    assert not torch.equal(a1.nola_bases_A[:, :12], b1.nola_bases_A[:, :12])
    # same seed -> same adapter; different seed -> different outputs for the same coefficients
    perturb(one)
    perturb(two)
    assert max_diff(one(X), two(X)) > 1e-3


def test_bad_options():
    for bad in ({"k": 0}, {"l": 0}, {"r": 0}, {"alpha": 0}):
        with pytest.raises(ValueError):
            dt.make_config("nola", **bad)
    with pytest.raises(ValueError, match="unknown option 'num_basis'"):
        dt.make_config("nola", num_basis=8)
    with pytest.warns(UserWarning, match="r=11 is larger than the layer"):  # allowed, as PEFT's LoRA: still valid
        dt.inject(Holder(nn.Linear(12, 10)), dt.make_config("nola", r=11, targets=["layer"]))


def test_minilm_nola_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("nola", r=4, k=32, l=32, targets=["query", "value"]))
    assert dm.trainable_parameters() == 12 * 64
    losses = train_losses(dm, minilm_batch, steps=4, lr=5e-2, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses
