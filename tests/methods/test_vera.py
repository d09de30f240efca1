"""VeRA: parameter count, init, gradients, merge, save/load, shared seeded bases, mixed batches, errors,
and PEFT parity (same seed -> same projections; export/import both ways)."""

from __future__ import annotations

import contextlib
import json
import math

import peft
import pytest
import torch
from helpers import (
    Holder,
    TwoLinears,
    assert_close,
    assert_round_trip,
    assert_rows_match_each_adapter,
    max_diff,
    perturb,
    train_losses,
)
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.vera  # noqa: F401
from deltatune.methods.lowrank.vera import kaiming_bases

R = 4


Two = TwoLinears


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def vera(model, **options):
    return dt.inject(model, dt.make_config("vera", **{"r": R, "targets": ["a", "b"], **options}))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_parameter_count_matches_formula(kind):
    layer = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(3, 6, 3)
    dm = dt.inject(Holder(layer), dt.make_config("vera", r=R, targets=["layer"]))
    d_out = 10 if kind == "linear" else 6
    assert dm.trainable_parameters() == R + d_out
    assert eval(dt.get_method("vera").formula, {}, {"r": R, "d_out": d_out}) == R + d_out
    assert all(not p.requires_grad for p in layer.parameters())


def test_output_at_init_equals_base_and_init_values():
    model = Two()
    base = model(X).detach()
    dm = vera(model)
    assert max_diff(dm(X), base) == 0
    delta = dm.model.a.deltas["default"]
    assert torch.count_nonzero(delta.vera_lambda_b) == 0
    assert torch.equal(delta.vera_lambda_d, torch.full((R,), 0.1))


def test_gradients_reach_only_the_vectors():
    dm = vera(Two())
    perturb(dm)
    dm(X).sum().backward()
    for name, p in dm.named_parameters():
        assert (p.grad is not None) == ("vera_lambda" in name), name
    assert all(p.grad.abs().sum() > 0 for n, p in dm.named_parameters() if "vera_lambda" in n)
    assert not any(b.requires_grad for b in dm.shared.buffers())


def test_delta_weight_is_the_paper_formula_on_sliced_bases():
    dm = vera(Two(), seed=7)
    perturb(dm)
    A, B = kaiming_bases(R, 10, 8, 7)  # sized for the largest layer: d_out 10 (b), d_in 8 (a)
    assert torch.equal(dm.shared["default"].vera_A, A) and torch.equal(dm.shared["default"].vera_B, B)
    layer = dm.model.a  # 6 x 8: uses A[:, :8], B[:6]
    delta = layer.deltas["default"]
    ref = torch.diag(delta.vera_lambda_b) @ B[:6] @ torch.diag(delta.vera_lambda_d) @ A[:, :8]
    assert_close(delta.delta_weight(layer), ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 8)
    assert_close(layer(x), layer.base_layer(x) + x @ ref.t())


def test_save_load_round_trip_stores_only_vectors(tmp_path):
    dm = vera(Two(), seed=5)
    perturb(dm)
    fresh = assert_round_trip(dm, Two(), X, tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter.safetensors")))
    assert keys == ["a.vera_lambda_b", "a.vera_lambda_d", "b.vera_lambda_b", "b.vera_lambda_d"]
    # the family invariant: the shared random bases regenerate identically from the seed
    for name in ("vera_A", "vera_B"):
        assert torch.equal(getattr(fresh.shared["default"], name), getattr(dm.shared["default"], name))


def test_mixed_batch_two_seeds():
    dm = vera(Two(), seed=1)
    dm.add_adapter("other", dt.make_config("vera", r=R, targets=["a", "b"], seed=2))
    assert not torch.equal(dm.shared["default"].vera_A, dm.shared["other"].vera_A)
    dm.set_active(["default", "other"])
    perturb(dm)
    assert dm.trainable_parameters() == 2 * (R + 6 + R + 10)
    alone = assert_rows_match_each_adapter(dm, X, ["default", "other", dt.BASE, "other", "default"])
    assert max_diff(alone["default"], alone["other"]) > 1e-3


def test_bad_options():
    for bad in ({"r": 0}, {"dropout": 1.0}, {"seed": -1}):
        with pytest.raises(ValueError):
            dt.make_config("vera", **bad)
    with pytest.raises(ValueError, match="unknown option 'projection_prng_key'"):
        dt.make_config("vera", projection_prng_key=0)
    with pytest.raises(ValueError, match="grouped convolution"):
        dt.inject(Holder(nn.Conv2d(4, 4, 3, groups=2)), dt.make_config("vera", r=2, targets=["layer"]))


# --- PEFT -------------------------------------------------------------------------------------------


def test_projections_equal_peft_init():
    g = torch.Generator().manual_seed(3)
    A, B = _kaiming_init((R, 8), generator=g), _kaiming_init((10, R), generator=g)
    ours = kaiming_bases(R, 10, 8, 3)
    assert torch.equal(ours[0], A) and torch.equal(ours[1], B)


def test_parity_with_peft_forward():
    torch.manual_seed(0)
    pm = peft.get_peft_model(Two(), peft.VeraConfig(r=R, target_modules=["a", "b"], projection_prng_key=3))
    dm = vera(Two(), seed=3)
    perturb(dm, std=0.3)
    sd = pm.state_dict()
    assert torch.equal(sd["base_model.vera_A.default"], dm.shared["default"].vera_A)
    assert torch.equal(sd["base_model.vera_B.default"], dm.shared["default"].vera_B)
    with torch.no_grad():
        for p in ("a", "b"):
            delta = dm.model.get_submodule(p).deltas["default"]
            getattr(pm.base_model.model, p).vera_lambda_b["default"].copy_(delta.vera_lambda_b)
            getattr(pm.base_model.model, p).vera_lambda_d["default"].copy_(delta.vera_lambda_d)
    assert_close(pm(X), dm(X), rtol=1e-5, atol=1e-6)
    assert max_diff(dm(X), Two()(X)) > 1e-3


@pytest.mark.parametrize("save_projection", [True, False])
def test_export_loads_in_peft(save_projection, tmp_path):
    dm = vera(Two(), seed=9, save_projection=save_projection)
    perturb(dm, std=0.3)
    dm.export_peft(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["projection_prng_key"] == 9 and cfg["r"] == R
    with pytest.warns(UserWarning) if not save_projection else contextlib.nullcontext():
        pm = peft.PeftModel.from_pretrained(Two(), tmp_path)
    assert_close(pm(X), dm(X), rtol=1e-5, atol=1e-6)


def test_peft_saved_loads(tmp_path):
    pm = peft.get_peft_model(Two(), peft.VeraConfig(r=R, target_modules=["a", "b"], projection_prng_key=4))
    perturb(pm, std=0.3)
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(Two(), tmp_path)
    assert dm.adapters["default"].config.seed == 4
    assert_close(dm(X), pm(X), rtol=1e-5, atol=1e-6)
    # and back: our export of the imported adapter loads in PEFT with the same outputs
    dm.export_peft(tmp_path / "again")
    assert_close(peft.PeftModel.from_pretrained(Two(), tmp_path / "again")(X), pm(X), rtol=1e-5, atol=1e-6)


def test_peft_projections_the_seed_does_not_make_are_refused(tmp_path):
    pm = peft.get_peft_model(Two(), peft.VeraConfig(r=R, target_modules=["a", "b"], projection_prng_key=4))
    pm.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state["base_model.vera_A"] = state["base_model.vera_A"] + 1
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not regenerate"):
        dt.load_peft(Two(), tmp_path)


# --- a real model -------------------------------------------------------------------------------------


def test_minilm_vera_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("vera", r=64, targets=["query", "value"]))
    assert dm.trainable_parameters() == 12 * (64 + 384)  # 6 layers x (query, value)
    bases = dm.shared["default"]
    assert bases.vera_A.shape == (64, 384) and bases.vera_B.shape == (384, 64)
    losses = train_losses(dm, minilm_batch, steps=4, lr=5e-2, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0] and math.isfinite(losses[-1]), losses
