"""LoRA, rsLoRA, PiSSA and DoRA: the defining properties of each (METHODS.md, "Tests every method
implementation must ship"), on a Linear, a Conv2d and (LoRA) an Embedding, plus a real-data anchor."""

from __future__ import annotations

import functools
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import Holder, TwoLinears, assert_close, assert_rows_match_each_adapter, max_diff
from helpers import perturb as _perturb
from torch import nn
from torch.func import functional_call

import deltatune as dt

perturb = functools.partial(_perturb, std=0.2)  # these tests use larger deltas


R, ALPHA = 3, 6.0

VARIANTS = {
    "lora": ("lora", {}),
    "rslora": ("lora", {"rslora": True}),
    "pissa": ("lora", {"init": "pissa"}),
    "pissa_niter_4": ("lora", {"init": "pissa_niter_4"}),
    "dora": ("dora", {}),
}
CASES = [(v, k) for v in VARIANTS for k in ("linear", "conv2d")] + [("lora", "embedding"), ("dora", "embedding")]


def make_layer(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10).to(dtype), torch.randn(4, 12, generator=g).to(dtype)
    if kind == "conv2d":
        return nn.Conv2d(3, 6, 3, padding=1, stride=2).to(dtype), torch.randn(2, 3, 7, 7, generator=g).to(dtype)
    return nn.Embedding(20, 8), torch.randint(0, 20, (3, 5), generator=g)


def as_matrix(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A weight in the layer's layout as the d_out x d_in matrix the methods work on."""
    return w.t() if isinstance(layer, nn.Embedding) else w.flatten(1)


def as_weight(layer: nn.Module, m: torch.Tensor) -> torch.Tensor:
    return m.t() if isinstance(layer, nn.Embedding) else m.reshape(layer.weight.shape)


def run_with(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The plain layer's forward with another weight (and bias): the reference computation."""
    params = {"weight": weight}
    if bias is not None:
        params["bias"] = bias
    return functional_call(layer, params, (x,))


def inject(layer: nn.Module, variant: str, **options) -> dt.DeltaModel:
    method, extra = VARIANTS[variant]
    return dt.inject(Holder(layer), dt.make_config(method, r=R, alpha=ALPHA, targets=["layer"], **{**extra, **options}))


def dims(layer: nn.Module) -> tuple[int, int]:
    d_out, d_in = as_matrix(layer, layer.weight).shape
    return d_out, d_in


# --- 1. trainable-parameter count -------------------------------------------------------------------


@pytest.mark.parametrize("variant,kind", CASES)
def test_trainable_parameter_count_matches_formula(variant, kind):
    layer, _ = make_layer(kind)
    d_out, d_in = dims(layer)
    dm = inject(layer, variant)
    expected = R * (d_in + d_out) + (d_out if VARIANTS[variant][0] == "dora" else 0)
    assert dm.trainable_parameters() == expected
    formula = dt.get_method(VARIANTS[variant][0]).formula.replace("r(", "r*(")  # the registry's own formula
    assert eval(formula, {}, {"r": R, "d_in": d_in, "d_out": d_out}) == expected
    assert dm.total_parameters() == expected + sum(p.numel() for p in layer.parameters())
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("method,kind", [("lora", "linear"), ("lora", "conv2d"), ("lora", "embedding"),
                                         ("dora", "linear"), ("dora", "conv2d"), ("dora", "embedding")])
def test_bias_lora_only_adds_d_out(method, kind):
    layer, x = make_layer(kind)
    d_out, d_in = dims(layer)
    base = layer(x).detach()
    dm = dt.inject(Holder(layer), dt.make_config(method, r=R, targets=["layer"], bias="lora_only"))
    has_bias = getattr(layer, "bias", None) is not None  # an Embedding has none: nothing extra to train
    expected = R * (d_in + d_out) + (d_out if method == "dora" else 0) + (d_out if has_bias else 0)
    assert dm.trainable_parameters() == expected
    assert_close(dm(x), base, rtol=1e-5, atol=1e-6)
    if has_bias:
        delta = dm.model.layer.deltas["default"]
        with torch.no_grad():
            delta.lora_bias.normal_()
        expected_out = base + delta.lora_bias.view(-1, *[1] * (x.dim() - 2))
        assert_close(dm(x), expected_out)  # the trained bias shifts every output channel


# --- 2. behaviour at initialisation -----------------------------------------------------------------


@pytest.mark.parametrize("variant,kind", CASES + [("lora_gaussian", "linear")])
def test_output_at_init_equals_base(variant, kind):
    layer, x = make_layer(kind)
    base = layer(x).detach()
    if variant == "lora_gaussian":
        dm = dt.inject(Holder(layer), dt.LoRAConfig(r=R, targets=["layer"], init="gaussian"))
    else:
        dm = inject(layer, variant)
    tol = 1e-5 if "pissa" in variant else 1e-6
    assert max_diff(dm(x), base) <= tol
    delta = dm.model.layer.deltas["default"]
    if "pissa" not in variant:
        assert torch.count_nonzero(delta.lora_B) == 0 and torch.count_nonzero(delta.lora_A) > 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_pissa_residual_split(init, kind):
    layer, x = make_layer(kind)
    W0 = as_matrix(layer, layer.weight.detach().clone())
    dm = inject(layer, init)
    delta = dm.model.layer.deltas["default"]
    s = ALPHA / R
    principal = s * delta.lora_B0 @ delta.lora_A0
    assert torch.equal(as_matrix(layer, layer.weight.detach()), W0)  # the shared base weight is untouched
    assert torch.equal(delta.lora_A, delta.lora_A0) and torch.equal(delta.lora_B, delta.lora_B0)
    # the trainable principal part s·BA and the frozen residual W0 - s·B0A0 split W0 (to float rounding)
    effective = W0 + delta.delta_weight(dm.model.layer)
    assert_close(effective, W0, rtol=1e-5, atol=1e-6)
    assert_close((W0 - principal) + s * delta.lora_B @ delta.lora_A, W0)
    assert torch.linalg.matrix_rank(principal) == R
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    best = (U[:, :R] * S[:R]) @ Vh[:R]
    if init == "pissa":  # exact SVD: the best rank-r approximation (Eckart-Young)
        assert_close(principal, best)
    else:  # randomised SVD: close to optimal, never better
        opt = torch.linalg.norm(W0 - best)
        assert opt - 1e-5 <= torch.linalg.norm(W0 - principal) <= 1.1 * opt
    perturb(dm)  # after training, ΔW relative to W0 is s(BA - B0A0)
    expected = s * (delta.lora_B @ delta.lora_A - delta.lora_B0 @ delta.lora_A0)
    assert_close(delta.delta_weight(dm.model.layer), expected, rtol=1e-5, atol=1e-6)


def test_pissa_disabled_gives_the_base_model():
    layer, x = make_layer("linear")
    base = layer(x).detach()
    dm = inject(layer, "pissa")
    with dm.disabled():
        assert_close(dm(x), base)


def test_pissa_mixed_batch_base_rows_see_the_base_model():
    layer, x = make_layer("linear")
    base = layer(x).detach()
    dm = inject(layer, "pissa")
    assert_close(dm(x, adapter_names=[dt.BASE] * x.shape[0]), base)


def test_pissa_does_not_change_other_adapters():
    layer, x = make_layer("linear")
    dm = inject(layer, "pissa")
    dm.add_adapter("other", dt.LoRAConfig(r=2, targets=["layer"]))
    dm.set_active("other")
    perturb(dm)
    with_pissa = dm(x).detach()
    dm.delete_adapter("default")
    assert_close(dm(x), with_pissa)


# --- scale: LoRA alpha/r, rsLoRA alpha/sqrt(r) ------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_effective_delta_scale(rslora, kind):
    r, alpha = 4, 8.0
    layer, x = make_layer(kind)
    base = layer(x).detach()
    dm = dt.inject(Holder(layer), dt.LoRAConfig(r=r, alpha=alpha, rslora=rslora, targets=["layer"]))
    delta = dm.model.layer.deltas["default"]
    with torch.no_grad():
        delta.lora_B.normal_()
    BA = delta.lora_B @ delta.lora_A
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert s == (4.0 if rslora else 2.0)
    # the output moves by exactly s·(BA applied to x), bias-free
    dW_out = run_with(layer, x, as_weight(layer, BA), torch.zeros_like(layer.bias))
    assert_close(dm(x) - base, s * dW_out)
    assert max_diff(dm(x) - base, (alpha / r if rslora else alpha / math.sqrt(r)) * dW_out) > 1e-2


# --- DoRA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_dora_magnitude_norm_and_reference_forward(kind):
    layer, x = make_layer(kind)
    W0 = as_matrix(layer, layer.weight.detach().clone())  # an embedding's: (dim, vocab), one norm per dimension
    b0 = layer.bias.detach().clone() if kind != "embedding" else None
    dm = inject(layer, "dora")
    delta = dm.model.layer.deltas["default"]
    assert_close(delta.lora_magnitude, torch.linalg.norm(W0, dim=1), rtol=1e-5, atol=1e-6)  # m starts at ||W0|| per row
    perturb(dm)
    s = ALPHA / R
    V = W0 + s * delta.lora_B @ delta.lora_A
    norm = torch.linalg.norm(V, dim=1)
    assert_close(delta.weight_norm(dm.model.layer), norm)  # the efficient norm never forms V
    W_dora = delta.lora_magnitude[:, None] * V / norm[:, None]
    expected = run_with(layer, x, as_weight(layer, W_dora), b0)
    assert max_diff(dm(x), run_with(layer, x, as_weight(layer, W0), b0)) > 1e-2
    assert_close(dm(x), expected)
    with torch.no_grad():
        dm.merge()
        assert_close(as_matrix(layer, layer.weight), W_dora)
        assert_close(dm(x), expected)


def test_dora_norm_is_a_constant_in_backward():
    layer, x = make_layer("linear")
    dm = inject(layer, "dora")
    perturb(dm)
    delta = dm.model.layer.deltas["default"]
    dm(x).sum().backward()
    # with ||V|| detached, d(sum y)/dm_i = sum_n (V x_n)_i / ||V_i||
    V = layer.weight + ALPHA / R * delta.lora_B @ delta.lora_A
    expected = ((x @ V.t()) / torch.linalg.norm(V, dim=1)).sum(0)
    assert_close(delta.lora_magnitude.grad, expected, rtol=1e-3, atol=1e-4)


# --- dropout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropout_train_varies_eval_equals_no_dropout(variant, kind):
    layer, x = make_layer(kind)
    dm = inject(layer, variant, dropout=0.5)
    perturb(dm)
    twin_layer, _ = make_layer(kind)
    twin = inject(twin_layer, variant, dropout=0.0)
    twin.load_adapter_state_dict(dm.adapter_state_dict())
    dm.train()
    y1, y2 = dm(x), dm(x)
    assert max_diff(y1, y2) > 1e-3  # a fresh mask each call
    assert max_diff(y1, twin(x)) > 1e-3
    dm.eval()
    assert_close(dm(x), twin(x), rtol=1e-5, atol=1e-6)
    assert max_diff(dm(x), dm(x)) == 0


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind,r,size", [("linear", 11, "10 x 12"), ("conv2d", 7, "6 x 27"),
                                         ("embedding", 9, "8 x 20")])
def test_rank_larger_than_the_layer_warns_and_works(method, kind, r, size):
    # as PEFT: allowed with a warning; the update's rank is capped by the layer's smaller side
    layer, x = make_layer(kind)
    with pytest.warns(UserWarning, match=f"{method} rank r={r} is larger than the layer \\({size}.*rank at most"):
        dm = dt.inject(Holder(layer), dt.make_config(method, r=r, alpha=ALPHA, targets=["layer"]))
    delta = dm.model.layer.deltas["default"]
    assert delta.lora_A.shape[0] == r
    assert_close(dm(x), layer(x))  # the base at init
    perturb(dm)
    y = dm(x).detach()
    assert torch.linalg.matrix_rank(delta.delta_weight(dm.model.layer)) == min(dims(layer))
    dm.merge()
    assert_close(dm(x), y)


def test_rank_warning_once_per_adapter():
    model = TwoLinears()  # two layers, both smaller than r
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = dt.inject(model, dt.LoRAConfig(r=20, targets=["a", "b"]))
        dm.add_adapter("other", dt.LoRAConfig(r=20, targets=["a", "b"]))
        dm.add_adapter("fits", dt.LoRAConfig(r=2, targets=["a", "b"]))
    assert [str(w.message).split(" is")[0] for w in caught] == ["lora rank r=20"] * 2  # one per adapter


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_rank_larger_than_the_layer_raises(init):
    with pytest.raises(ValueError, match="PiSSA init needs r <= 10 on this 10 x 12 layer.*singular triplets"):
        dt.inject(Holder(make_layer("linear")[0]), dt.make_config("lora", r=11, init=init, targets=["layer"]))
    dt.inject(Holder(make_layer("linear")[0]), dt.make_config("lora", r=10, init=init, targets=["layer"]))


@pytest.mark.parametrize("method", ["lora_xs", "sorsa"])
def test_svd_methods_still_refuse_a_rank_above_the_layer(method):
    with pytest.raises(ValueError, match=f"{method} rank r=11.*10 x 12.*use r <= 10"):
        dt.inject(Holder(make_layer("linear")[0]), dt.make_config(method, r=11, targets=["layer"]))


# --- grouped convolutions (PEFT's layout: A a full conv over every input channel, B a grouped 1x1 conv) ----


def grouped(padding_mode: str = "zeros") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, dilation=1, groups=2, padding_mode=padding_mode)
    return conv, torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_grouped_conv_lora_reference_forward(padding_mode):
    conv, x = grouped(padding_mode)
    base = conv(x).detach()
    dm = dt.inject(Holder(conv), dt.LoRAConfig(r=4, alpha=ALPHA, targets=["layer"]))
    delta = dm.model.layer.deltas["default"]
    assert delta.lora_A.shape == (4, 4 * 9) and delta.lora_B.shape == (6, 2)  # B: (C_out, r / groups)
    assert dm.trainable_parameters() == 4 * 36 + 6 * 2 and max_diff(dm(x), base) == 0
    perturb(dm)
    # reference: output channel o of group G mixes the lora channels of group G only, so the update is the dense
    # (C_out, C_in, 3, 3) kernel s · B_blockdiag A, applied as an ungrouped conv with the layer's own padding
    B_full = torch.zeros(6, 4)
    B_full[:3, :2], B_full[3:, 2:] = delta.lora_B[:3].detach(), delta.lora_B[3:].detach()
    dense = nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=False, padding_mode=padding_mode)
    with torch.no_grad():
        dense.weight.copy_((ALPHA / 4 * B_full @ delta.lora_A).reshape(6, 4, 3, 3))
    assert_close(dm(x), base + dense(x))
    dm.add_adapter("other", dt.LoRAConfig(r=2, targets=["layer"]))
    dm.set_active(["default", "other"])
    perturb(dm, seed=5)
    assert dm.model.layer.deltas["other"].lora_B.abs().min() > 0
    assert_rows_match_each_adapter(dm, x, ["other", "default"])  # mixed batches route grouped convs too
    dm.set_active("default")
    dm.train()
    dm(x).sum().backward()
    assert delta.lora_A.grad.abs().sum() > 0 and delta.lora_B.grad.abs().sum() > 0


def test_grouped_conv_errors():
    conv = grouped()[0]
    with pytest.raises(ValueError, match="r=3 on a grouped convolution \\(groups=2\\) must be divisible.*r = 2"):
        dt.inject(Holder(conv), dt.LoRAConfig(r=3, targets=["layer"]))
    with pytest.raises(ValueError, match="DoRA cannot adapt a grouped convolution \\(groups=2\\)"):
        dt.inject(Holder(grouped()[0]), dt.make_config("dora", r=2, targets=["layer"]))
    for method in ("lora_xs", "dylora", "capaboost"):  # SVD-based, or LoRA subclasses with their own factors
        with pytest.raises(ValueError, match=f"{method} cannot adapt a grouped convolution"):
            dt.inject(Holder(grouped()[0]), dt.make_config(method, r=2, targets=["layer"]))
    with pytest.raises(ValueError, match="lora cannot adapt a grouped convolution"):  # PiSSA: SVD of W0
        dt.inject(Holder(grouped()[0]), dt.make_config("lora", r=2, init="pissa", targets=["layer"]))

    class Custom(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="needs the stock Conv2d forward; 'Custom' has its own"):
        dt.inject(Holder(Custom(4, 4, 3, groups=2)), dt.LoRAConfig(r=2, targets=["layer"]))
    dm = dt.inject(Holder(grouped()[0]), dt.LoRAConfig(r=2, targets=["layer"]))
    with pytest.raises(ValueError, match="grouped convolution \\(groups=2\\) cannot be merged.*keep the adapter"):
        dm.merge()
    assert dm.model.layer.merged == ()


def test_bad_options():
    with pytest.raises(ValueError, match="unknown init 'pisa'.*pissa"):
        dt.LoRAConfig(init="pisa")
    with pytest.raises(ValueError, match="unknown option 'alpah'.*did you mean 'alpha'"):
        dt.make_config("lora", alpah=16)
    with pytest.raises(ValueError, match="unknown method 'lorra'.*did you mean 'lora'"):
        dt.make_config("lorra", r=8)
    for bad in ({"r": 0}, {"dropout": 1.0}, {"bias": "all"}, {"alpha": 0}):
        with pytest.raises(ValueError):
            dt.make_config("lora", **bad)


def test_misspelt_rank_option_suggests_r():
    with pytest.raises(ValueError, match="unknown option 'rank'.*did you mean 'r'"):
        dt.make_config("lora", rank=8)


# --- dtype ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_base_gets_fp32_adapter_and_bf16_output(variant):
    layer, x = make_layer("linear", torch.bfloat16)
    W0 = layer.weight.detach().float().clone()
    b0 = layer.bias.detach().float().clone()
    base = layer(x).detach()
    dm = inject(layer, variant)
    params = dict(dm.model.layer.deltas["default"].named_parameters())
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert layer.weight.dtype == torch.bfloat16
    y = dm(x)
    assert y.dtype == torch.bfloat16
    assert max_diff(y, base) < 5e-2  # bf16 rounding of PiSSA's residual at most
    perturb(dm)
    y = dm(x)
    assert y.dtype == torch.bfloat16
    delta = dm.model.layer.deltas["default"]
    V = W0 + ALPHA / (math.sqrt(R) if "rslora" in variant else R) * delta.lora_B @ delta.lora_A
    if "pissa" in variant:
        V = V - ALPHA / R * delta.lora_B0 @ delta.lora_A0
    if variant == "dora":
        V = delta.lora_magnitude[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)
    ref = F.linear(x.float(), V, b0)
    assert max_diff(y, ref) < 5e-2 * max(1.0, ref.abs().max().item())
    assert max_diff(y, base) > 0.1


# --- a real-data anchor -----------------------------------------------------------------------------


def test_lora_minilm_rotten_tomatoes_loss_goes_down(make_minilm, minilm_tokenizer):
    from deltatune import assets

    rows = assets.rotten_tomatoes()
    rows = [rows[i] for i in random.Random(0).sample(range(len(rows)), 640)]
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=8, alpha=16, targets=["query", "value"]),
                   train_modules=["classifier"])
    assert dm.trainable_parameters() == 73_728 + 770
    frozen = dm.model.bert.encoder.layer[0].attention.self.query.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-3)
    dm.train()
    losses = []
    for step in range(40):
        chunk = rows[16 * step: 16 * step + 16]
        enc = minilm_tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                               return_tensors="pt")
        loss = dm(**enc, labels=torch.tensor([r["label"] for r in chunk])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, (first, last)
    assert torch.equal(dm.model.bert.encoder.layer[0].attention.self.query.base_layer.weight, frozen)
