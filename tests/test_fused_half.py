"""The fused low-rank paths on bf16/fp16 bases with fp32 adapters: taken, and equal to float32 math.

They compute in the base dtype (factors cast down once per forward, engine/fused.py), so outputs and
gradients match the float32 math at half-precision tolerance, relative to the magnitudes compared.
"""

import pytest
import torch
from helpers import Holder, assert_close, perturb
from torch import nn

import deltatune as dt
from deltatune.engine import fused
from deltatune.engine.fused import LowRank, lowrank_linear
from deltatune.methods.lowrank.dora import DoRA
from deltatune.methods.lowrank.lora import LoRA

HALF = [torch.bfloat16, torch.float16]  # fp16 matmul runs on CPU in torch 2.13, so both are tested
# About five units of each format's rounding (2^-8, 2^-11) at the largest magnitude compared: the cast factors,
# h, the products and (DoRA) its elementwise terms each round once in the half dtype.
RTOL = {torch.bfloat16: 2e-2, torch.float16: 2.5e-3}


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused autograd node, `lowrank_linear` and `mixed_lowrank` from the layer."""
    calls = {"node": 0, "linear": 0, "mixed": 0}
    node, linear, mixed = fused._LowRankLinear.apply, fused.lowrank_linear, fused.mixed_lowrank

    def count(key, fn):
        def wrapped(*a):
            calls[key] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(fused._LowRankLinear, "apply", count("node", node))
    monkeypatch.setattr("deltatune.engine.layer.lowrank_linear", count("linear", linear))
    monkeypatch.setattr("deltatune.engine.layer.mixed_lowrank", count("mixed", mixed))
    return calls


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trained-base"])
def test_fused_node_on_a_half_base_matches_float32_math(dtype, train_base, fused_calls):
    """Two fp32 terms, one with dropout, on a half-precision x, W, b: output and every gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32).to(dtype).requires_grad_()
    W = (torch.randn(24, 32) / 6).to(dtype).requires_grad_(train_base)
    b = torch.randn(24).to(dtype).requires_grad_(train_base)
    A1, B1, A2, B2 = (torch.randn(*s, requires_grad=True) for s in ((4, 32), (24, 4), (2, 32), (24, 2)))
    p = 0.25
    torch.manual_seed(3)
    out = lowrank_linear(x, W, b, [LowRank(A1, B1, 0.5, p), LowRank(A2, B2, 2.0)])
    assert fused_calls["node"] == 1 and out.dtype == dtype
    torch.manual_seed(3)
    mask = fused._keep_mask(x.reshape(-1, 32), p).view(x.shape)  # the forward's draw: same generator state
    # The reference: float32 math on the same (exactly widened) values and the same mask.
    xf, Wf, bf = (t.detach().float().requires_grad_() for t in (x, W, b))
    ref = (nn.functional.linear(xf, Wf, bf) + 0.5 * ((xf * mask / (1 - p)) @ A1.t()) @ B1.t()
           + 2.0 * (xf @ A2.t()) @ B2.t())
    assert_close(out, ref, rtol=RTOL[dtype])
    g = torch.randn(out.shape).to(dtype)
    ours = [x, A1, B1, A2, B2] + ([W, b] if train_base else [])
    theirs = [xf, A1, B1, A2, B2] + ([Wf, bf] if train_base else [])
    names = ["x", "A1", "B1", "A2", "B2", "W", "b"]
    for name, a, e in zip(names, _grads(out, ours, g), _grads(ref, theirs, g.float())):
        assert a.dtype == (torch.float32 if name[0] in "AB" else dtype), name  # fp32 masters get fp32 grads
        assert_close(a, e, rtol=RTOL[dtype], msg=name)


@pytest.mark.parametrize("dtype", HALF)
def test_no_grad_path_on_a_half_base_matches_float32_math(dtype, fused_calls):
    torch.manual_seed(0)
    x, W = torch.randn(6, 32).to(dtype), (torch.randn(24, 32) / 6).to(dtype)
    A, B = torch.randn(3, 32), torch.randn(24, 3)
    with torch.no_grad():
        out = lowrank_linear(x, W, None, [LowRank(A, B, 0.7)])
    assert fused_calls["node"] == 0 and out.dtype == dtype  # the no-grad arithmetic, not the node
    assert_close(out, x.float() @ W.float().t() + 0.7 * x.float() @ A.t() @ B.t(), rtol=RTOL[dtype])


def _linear() -> Holder:
    """One seeded Linear: the comparisons measure the fused path's rounding, not a network's compounded."""
    torch.manual_seed(0)
    return Holder(nn.Linear(32, 16))


def _half_model(dtype, config, second=None):
    """A half-precision layer with adapter 'a' (and 'b'), perturbed, plus its float32 twin (same values)."""
    pair = []
    for base_dtype in (dtype, torch.float32):
        dm = dt.inject(_linear().to(base_dtype), config, name="a")
        if second is not None:
            dm.add_adapter("b", second)
        perturb(dm, std=0.2)
        pair.append(dm)
    dm, ref = pair
    assert all(p.dtype == torch.float32 for p in dm.parameters() if p.requires_grad)  # fp32 adapters
    ref.load_state_dict(dm.state_dict())  # the half base, widened exactly; the same adapters
    return dm, ref


def _inputs(dtype, *lead):
    """x and the output gradient, both exactly representable in `dtype` (as they are in a half model)."""
    return torch.randn(*lead, 32).to(dtype), torch.randn(*lead, 16).to(dtype).float()


def _run(dm, x, g, **kw):
    """Output and the gradients of x and of every trainable parameter, for the loss <dm(x), g>."""
    dm.zero_grad()
    x = x.detach().requires_grad_()
    out = dm(x, **kw)
    (out.float() * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in dm.named_parameters() if p.requires_grad}


def _assert_all_close(ours, ref, dtype):
    (out, gx, grads), (ref_out, ref_gx, ref_grads) = ours, ref
    assert out.dtype == gx.dtype == dtype
    assert_close(out, ref_out, rtol=RTOL[dtype], msg="output")
    assert_close(gx, ref_gx, rtol=RTOL[dtype], msg="x grad")
    assert grads.keys() == ref_grads.keys() and grads
    for n, g in grads.items():
        assert g is not None and g.dtype == torch.float32, n
        assert_close(g, ref_grads[n], rtol=RTOL[dtype], msg=n)


@pytest.mark.parametrize("dtype", HALF)
def test_stacked_adapters_with_dropout_on_a_half_model_take_the_node_and_match_float32(dtype, fused_calls):
    """Training mode: both layers fused with two adapters each; the same seed draws the same masks in
    the float32 copy, whose fused path equals the unfused math (tests/test_fused.py)."""
    dm, ref = _half_model(dtype, dt.LoRAConfig(r=4, dropout=0.2, targets=["layer"]),
                          dt.LoRAConfig(r=2, alpha=4, targets=["layer"]))
    for m in (dm, ref):
        m.set_active(["a", "b"])
        m.train()
    x, g = _inputs(dtype, 3, 5)
    torch.manual_seed(7)
    ours = _run(dm, x, g)
    assert fused_calls["node"] == 1
    torch.manual_seed(7)
    _assert_all_close(ours, _run(ref, x.float(), g), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_half_model_matches_the_unfused_float32_model_in_eval(dtype, fused_calls, monkeypatch):
    dm, ref = _half_model(dtype, dt.LoRAConfig(r=4, targets=["layer"]))
    x, g = _inputs(dtype, 3, 5)
    ours = _run(dm, x, g)
    assert fused_calls["node"] == 1
    monkeypatch.setattr(LoRA, "low_rank", lambda self: None)  # the reference: LoRA's own float32 forward
    _assert_all_close(ours, _run(ref, x.float(), g), dtype)
    assert fused_calls["node"] == 1


@pytest.mark.parametrize("dtype", HALF)
def test_mixed_adapter_batch_on_a_half_model_is_batched_and_matches_float32(dtype, fused_calls, monkeypatch):
    dm, ref = _half_model(dtype, dt.LoRAConfig(r=2, targets=["layer"]), dt.LoRAConfig(r=3, alpha=6, targets=["layer"]))
    rows = ["a", dt.BASE, "b", "a", "b"]
    x, g = _inputs(dtype, len(rows), 4)
    ours = _run(dm, x, g, adapter_names=rows)
    assert fused_calls["mixed"] == 1  # by batched matmuls, not per adapter group
    with torch.no_grad():
        assert dm(x, adapter_names=rows).dtype == dtype and fused_calls["mixed"] == 2
    monkeypatch.setattr(LoRA, "low_rank", lambda self: None)  # the reference: per-group float32 forwards
    _assert_all_close(ours, _run(ref, x.float(), g, adapter_names=rows), dtype)
    assert fused_calls["mixed"] == 2


def _dora_pair(dtype):
    dm, ref = _half_model(dtype, dt.get_method("dora").config(r=4, targets=["layer"]))
    for layer in (layer for _, layer in ref.layers()):
        layer.deltas["a"]._stock_linear = False  # the reference: DoRA's unfused float32 forward
    return dm, ref


@pytest.mark.parametrize("dtype", HALF)
def test_dora_on_a_half_base_takes_the_fused_node_and_matches_float32(dtype, fused_calls):
    dm, ref = _dora_pair(dtype)
    x, g = _inputs(dtype, 3, 5)
    ours = _run(dm, x, g)
    assert fused_calls["node"] == 1
    _assert_all_close(ours, _run(ref, x.float(), g), dtype)
    assert fused_calls["node"] == 1
    assert any("lora_magnitude" in n for n in ours[2])


def test_dora_on_a_bf16_base_keeps_a_magnitude_change_finer_than_bf16_near_one():
    """m/||V|| = 1.003 is 1 in bf16 (its step above 1 is 2^-7): the fused path must scale by g - 1 instead."""
    dm, ref = _dora_pair(torch.bfloat16)
    x = torch.randn(64, 32).to(torch.bfloat16)

    def shift(model, x):
        """The output's relative change when g goes from 1 to 1.003."""
        layer = model.model.layer
        delta = layer.deltas["a"]
        with torch.no_grad():
            delta.lora_magnitude.copy_(delta.weight_norm(layer))  # g = 1
            before = model(x).float()
            delta.lora_magnitude.mul_(1.003)
            after = model(x).float()
        return ((after - before) * before.sign()).sum() / before.abs().sum()

    expected = shift(ref, x.float())
    assert expected > 2e-3  # 0.3% less the bias's unscaled share
    assert_close(shift(dm, x), expected, rtol=0.25)  # a rounded g would give 0
    assert isinstance(dm.model.layer.deltas["a"], DoRA)
