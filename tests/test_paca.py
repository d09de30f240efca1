"""PaCA (methods/selective/paca.py): r random input columns of W0 train; backward keeps only x[..., idx]."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn

import deltatune as dt

N, D_IN, D_OUT, R = 10, 32, 24, 4


class Stack(nn.Module):
    """pre -> layer: the adapted layer's input needs a gradient (an earlier layer trains)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(D_IN, D_IN)
        self.layer = nn.Linear(D_IN, D_OUT)
        self.to(dtype)

    def forward(self, x):
        return self.layer(self.pre(x))


def inject(method: str = "paca", dtype=torch.float32, **options):
    cfg = dt.make_config(method, r=R, targets=["layer"], **options)
    return dt.inject(Stack(dtype), cfg)


def delta_of(dm):
    return dict(dm.layers())["layer"].deltas["default"]


def test_r_whole_input_columns_train_and_the_bias_stays():
    dm = inject()
    assert dm.trainable_parameters() == R * D_OUT
    d = delta_of(dm)
    assert d.names == ["weight"]  # a module target: its weight, not its bias
    layer = dict(dm.layers())["layer"]
    mask = torch.zeros(D_OUT * D_IN, dtype=torch.bool).index_fill(0, d.index("weight"), True).view(D_OUT, D_IN)
    cols = mask.any(0).nonzero().squeeze(1)
    assert cols.numel() == R and mask[:, cols].all()  # exactly R columns, each whole
    assert torch.equal(d.columns(layer)[0], cols)
    other = dt.inject(Stack(), dt.make_config("paca", r=R, seed=1, targets=["layer"]))
    assert not torch.equal(delta_of(other).index("weight"), d.index("weight"))


def test_output_and_gradients_equal_the_plain_math():
    dm = inject()
    d, layer = delta_of(dm), dict(dm.layers())["layer"]
    with torch.no_grad():
        d.value("weight").normal_()
    cols, V = d.columns(layer)
    x = torch.randn(2, N, D_IN, requires_grad=True)
    g = torch.randn(2, N, D_OUT)
    dm(x).backward(g)

    plain = Stack()
    W = plain.layer.weight.detach().clone()
    W[:, cols] += V.detach()
    x2 = x.detach().clone().requires_grad_(True)
    h2 = plain.pre(x2)
    y2 = h2 @ W.t() + plain.layer.bias
    h2.retain_grad()
    y2.backward(g)
    assert_close(dm(x), y2)
    assert_close(x.grad, x2.grad)  # ∂x through W0 + ΔW
    expected = (g.reshape(-1, D_OUT).t() @ h2.detach().reshape(-1, D_IN))[:, cols]  # g_outᵀ x[..., idx]
    assert_close(d.value("weight").grad.view(D_OUT, R), expected)


def saved_activations(dm, x):
    """The tensors the forward saves for backward that are not parameters or buffers (activation memory)."""
    weights = {t.untyped_storage().data_ptr() for t in [*dm.parameters(), *dm.buffers()]}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dm.model.layer(x)
    return [t for t in saved if t.untyped_storage().data_ptr() not in weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_only_the_selected_input_features_lora_keeps_all(dtype):
    x = torch.randn(N, D_IN, dtype=dtype, requires_grad=True)
    acts = saved_activations(inject(dtype=dtype), x)
    ptr = x.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != ptr for t in acts)  # x itself is never kept
    floats = [t for t in acts if t.is_floating_point()]
    assert [tuple(t.shape) for t in floats] == [(N, R)]  # x[..., idx], in the delta's fp32
    assert floats[0].dtype == torch.float32
    paca_bytes = sum(t.numel() * t.element_size() for t in acts)
    assert paca_bytes == N * R * 4 + R * 8  # the slice and the r column indices
    lora = saved_activations(dt.inject(Stack(dtype), dt.make_config("lora", r=R, targets=["layer"])), x)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora)
    assert lora_bytes >= N * D_IN * x.element_size() > paca_bytes  # LoRA keeps x for ∂A


def test_merge_writes_the_columns_and_unmerge_restores_w0():
    dm = inject()
    d, layer = delta_of(dm), dict(dm.layers())["layer"]
    with torch.no_grad():
        d.value("weight").normal_()
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        before = dm(x)
        w0 = dm.model.layer.base_layer.weight.clone()
        dm.merge()
        cols, V = d.columns(layer)
        assert torch.equal(dm.model.layer.base_layer.weight[:, cols], w0[:, cols] + V)
        untouched = torch.ones(D_IN, dtype=torch.bool).index_fill(0, cols, False)
        assert torch.equal(dm.model.layer.base_layer.weight[:, untouched], w0[:, untouched])
        assert_close(dm(x), before)
        dm.unmerge()
        assert torch.equal(dm.model.layer.base_layer.weight, w0)


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="r=40 exceeds the 32 input features"):
        dt.inject(Stack(), dt.make_config("paca", r=40, targets=["layer"]))

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

    with pytest.raises(ValueError, match="no parameter of 'norm'"):
        dt.inject(Norm(), dt.make_config("paca", r=2, targets=["norm"]))
    with pytest.raises(ValueError, match="input columns of a linear"):
        dt.inject(nn.Sequential(nn.Conv2d(3, 4, 3)), dt.make_config("paca", r=2, targets=["0"]))


def test_gpt2_conv1d_columns_are_input_features_of_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(D_OUT, D_IN))  # weight stored (d_in, d_out)
    dm = dt.inject(model, dt.make_config("paca", r=R, targets=["0"]))
    d = delta_of_path(dm, "0")
    stored = torch.zeros(D_IN * D_OUT, dtype=torch.bool).index_fill(0, d.index("weight"), True).view(D_IN, D_OUT)
    rows = stored.any(1).nonzero().squeeze(1)
    assert rows.numel() == R and stored[rows].all()  # whole input features (rows of the stored weight)
    with torch.no_grad():
        d.value("weight").normal_()
        x = torch.randn(3, D_IN)
        w = model[0].base_layer.weight.clone().view(-1)
        w[d.index("weight")] += d.value("weight")
        assert_close(dm(x), x @ w.view(D_IN, D_OUT) + model[0].base_layer.bias)


def test_on_an_nf4_base_the_columns_add_to_the_dequantised_weight_and_x_is_not_kept():
    pytest.importorskip("bitsandbytes")
    model = dt.quantize(Stack(), "nf4", compute_dtype=torch.float32)
    dm = dt.inject(model, dt.make_config("paca", r=R, targets=["layer"]))
    d, layer = delta_of(dm), dict(dm.layers())["layer"]
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        base = dm.model.layer(x)
        d.value("weight").normal_()
        cols, V = d.columns(layer)
        assert_close(dm.model.layer(x), base + x[:, cols] @ V.t())
    acts = saved_activations(dm, x.requires_grad_(True))
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in acts)


def delta_of_path(dm, path):
    return dict(dm.layers())[path].deltas["default"]
