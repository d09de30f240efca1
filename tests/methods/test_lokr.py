"""LoKr / KronA: parameter count, init, gradients, merge, save/load, the Kronecker vec trick, PEFT parity."""

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
import deltatune.methods.structured.lokr  # noqa: F401
from deltatune.methods.structured.lokr import factorization

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """Linear -> Conv2d -> Conv1d, sizes with non-trivial factorisations (12 = 3·4, 8 = 2·4, 6 = 2·3)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 4, 2)

    def forward(self, x):  # x (B, 12)
        h = self.lin(x)[:, :, None, None].expand(-1, -1, 3, 3)  # (B, 8, 3, 3)
        return self.conv1(torch.tanh(self.conv(h)).flatten(2))  # (B, 4, 8)


def make_net():
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))


def layer_and_input(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 8), torch.randn(4, 12)
    return nn.Conv2d(8, 6, 3, padding=1, stride=2), torch.randn(2, 8, 7, 7)


def inject(layer, **opts):
    return dt.inject(Holder(layer), dt.make_config("lokr", targets=["layer"], **opts))


def expected_count(kind, r, decompose_both=False):
    d_out, c_in, k = (8, 12, 1) if kind == "linear" else (6, 8, 9)
    (a1, b1), (a2, n) = factorization(d_out), factorization(c_in)
    b2 = n * k
    A = r * (a1 + a2) if decompose_both and r < max(a1, a2) / 2 else a1 * a2
    B = r * (b1 + b2) if r < max(b1, n) / 2 else b1 * b2
    return A + B


OPTS = [{"r": 8}, {"r": 1}, {"r": 1, "decompose_both": True}, {"r": 8, "decompose_factor": 2}]


@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_parameter_count_matches_formula(kind, opts):
    layer, _ = layer_and_input(kind)
    dm = inject(layer, **opts)
    if "decompose_factor" in opts:  # factor 2 divides 8 and 12: (2, 4) and (2, 6)
        d_out, c_in, k = (8, 12, 1) if kind == "linear" else (6, 8, 9)
        expected = 2 * 2 + (d_out // 2) * (c_in // 2 * k)
    else:
        expected = expected_count(kind, opts["r"], opts.get("decompose_both", False))
    assert dm.trainable_parameters() == expected
    assert all(not p.requires_grad for p in layer.parameters())


def test_factorization_rules():
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16) and factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32) and factorization(12, 5) == (3, 4) and factorization(768) == (24, 32)
    from peft.tuners.lokr.layer import factorization as peft_factorization
    for dim in range(1, 300):
        for f in (-1, 2, 4, 7):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


@pytest.mark.parametrize("init,zero", [("peft", "lokr_w1"), ("lycoris", "lokr_w2_b")])
def test_init_is_zero_change(init, zero):
    layer, x = layer_and_input("linear")
    base = layer(x).detach()
    dm = inject(layer, r=1, init=init)
    delta = dm.model.layer.deltas["default"]
    assert max_diff(dm(x), base) == 0
    for name, p in delta.named_parameters():
        assert (torch.count_nonzero(p) == 0) == (name == zero), name


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradients_reach_only_lokr_parameters(kind):
    layer, x = layer_and_input(kind)
    dm = inject(layer, r=1)
    dm(x).square().sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    delta = dm.model.layer.deltas["default"]
    assert delta.lokr_w1.grad is not None and delta.lokr_w1.grad.abs().sum() > 0  # zero factor still learns


@pytest.mark.parametrize("opts", OPTS[:3])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_merge_equals_forward_and_unmerge_restores(kind, opts):
    layer, x = layer_and_input(kind)
    W0 = layer.weight.detach().clone()
    dm = inject(layer, **opts)
    perturb(dm, std=0.3)
    y = dm(x).detach()
    assert max_diff(y, layer(x)) > 1e-2
    dm.merge()
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [{"r": 8}, {"r": 1}, {"r": 1, "decompose_both": True}])
def test_vec_trick_equals_materialised_kron(opts):
    """Both forwards equal running the layer with W0 + s·kron(A, B): the activation-space one (vec(A X Bᵀ),
    fewer tokens than d_in: 10 < 12) and the weight form (14 tokens)."""
    from transformers.pytorch_utils import Conv1D

    for layer, x in [(nn.Linear(12, 8), torch.randn(2, 5, 12)), (Conv1D(8, 12), torch.randn(2, 5, 12))]:
        W0 = layer.weight.detach().clone()
        dm = inject(layer, alpha=3.0, **opts)
        perturb(dm, std=0.3)
        delta = dm.model.layer.deltas["default"]
        A, B = delta.factors()
        a1, a2 = A.shape
        b1, b2 = B.shape
        # kron written out entry by entry: K[i1·b1 + i2, j1·b2 + j2] = A[i1, j1] B[i2, j2]
        K = (A[:, None, :, None] * B[None, :, None, :]).reshape(a1 * b1, a2 * b2) * 3.0 / opts["r"]
        assert_close(K, delta.delta_weight(dm.model.layer), rtol=1e-5, atol=1e-6)
        W = W0 + (K.t() if isinstance(layer, Conv1D) else K)
        for tokens in (x, torch.randn(2, 7, 12)):
            assert_close(dm(tokens), functional_call(layer, {"weight": W}, (tokens,)))


def test_save_load_round_trip(tmp_path):
    dm = dt.inject(make_net(), dt.make_config("lokr", r=1, targets=["lin", "conv", "conv1"]))
    perturb(dm, std=0.3)
    assert_round_trip(dm, make_net(), X, tmp_path)


def test_mixed_adapter_batch():
    dm = dt.inject(make_net(), dt.make_config("lokr", r=1, targets=["lin", "conv"]), name="a")
    dm.add_adapter("b", dt.make_config("lokr", r=8, targets=["lin", "conv1"]))
    perturb(dm, std=0.3)
    dm.set_active("b")
    perturb(dm, std=0.3, seed=7)
    assert_rows_match_each_adapter(dm, X, ["a", dt.BASE, "b"])


def test_bad_options():
    with pytest.raises(ValueError, match="does not adapt nn.Embedding"):
        dt.inject(Holder(nn.Embedding(10, 4)), dt.make_config("lokr", targets=["layer"]))
    with pytest.raises(ValueError, match="did you mean 'decompose_both'"):
        dt.make_config("lokr", decompose_bot=True)
    for bad in ({"r": 0}, {"alpha": 0}, {"init": "zeros"}, {"rank_dropout": 1.0}):
        with pytest.raises(ValueError):
            dt.make_config("lokr", **bad)


# --- PEFT format, against the real peft package --------------------------------------------------------------

PEFT_CASES = [{"r": 8, "alpha": 4.0}, {"r": 1, "alpha": 2.0}, {"r": 1, "alpha": 2.0, "decompose_both": True}]


def peft_targets(opts):
    """Conv1d only with a low-rank B: peft 0.21 lays out a full-rank Conv1d w2 differently (tested below)."""
    return ["lin", "conv"] + (["conv1"] if opts["r"] == 1 else [])


@pytest.mark.parametrize("opts", PEFT_CASES)
def test_export_loads_in_peft(opts, tmp_path):
    dm = dt.inject(make_net(), dt.make_config("lokr", targets=peft_targets(opts), **opts))
    perturb(dm, std=0.3)
    dm.export_peft(tmp_path)
    pm = peft.PeftModel.from_pretrained(make_net(), tmp_path).eval()
    assert_close(pm(X), dm(X))
    assert max_diff(pm(X), make_net()(X)) > 1e-2


@pytest.mark.parametrize("opts", PEFT_CASES)
def test_peft_saved_loads_and_matches(opts, tmp_path):
    cfg = peft.LoKrConfig(r=opts["r"], alpha=opts["alpha"], decompose_both=opts.get("decompose_both", False),
                          target_modules=peft_targets(opts))
    pm = peft.get_peft_model(make_net(), cfg)
    perturb(pm, std=0.3)  # PEFT's own init leaves ΔW = 0; perturb so the parity means something
    pm.eval()
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(make_net(), tmp_path)
    assert_close(dm(X), pm(X))
    ours = dm.adapter_state_dict()
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in pm.state_dict().items()
              if "lokr_" in k}
    assert sorted(ours) == sorted(theirs)  # same tensors, same names
    for k, v in theirs.items():
        assert torch.equal(ours[k].reshape(v.shape), v)


def test_conv1d_full_rank_factor_is_refused_both_ways(tmp_path):
    dm = dt.inject(make_net(), dt.make_config("lokr", r=8, targets=["conv1"]))
    with pytest.raises(ValueError, match="'conv1' is a Conv1d with a full-rank LoKr factor B"):
        dm.export_peft(tmp_path / "ours")
    pm = peft.get_peft_model(make_net(), peft.LoKrConfig(r=8, target_modules=["conv1"]))
    pm.save_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match="full-rank LoKr factor B"):
        dt.load_peft(make_net(), tmp_path / "theirs")


def test_same_init_shapes_as_peft():
    """Fresh adapters: PEFT and deltatune choose the same factors, shapes and zero factor."""
    pm = peft.get_peft_model(make_net(), peft.LoKrConfig(r=1, target_modules=["lin", "conv"]))
    dm = dt.inject(make_net(), dt.make_config("lokr", r=1, alpha=8.0, targets=["lin", "conv"]))
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in pm.state_dict().items()
              if "lokr_" in k}
    ours = dm.adapter_state_dict()
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].numel() == v.numel() and (torch.count_nonzero(v) == 0) == (torch.count_nonzero(ours[k]) == 0)


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("lokr", r=8, alpha=8.0, targets=["query", "value"]))
    # 384 = 16·24 both ways: A (16 x 16) dense, B (24 x 24) low-rank since r = 8 < 24/2; 6 layers x 2 targets
    assert dm.trainable_parameters() == 6 * 2 * (16 * 16 + 8 * (24 + 24))
    losses = train_losses(dm, minilm_batch, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses


# --- effective_conv (PEFT use_effective_conv2d): a Tucker factor B over the kernel --------------------------


class ConvNet(nn.Module):
    """Conv2d 3x3 and Conv1d k=3, where B is low-rank at r=2 (32 = 4·8, 16 = 4·4: 2 < 8/2), and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.point = nn.Conv2d(32, 16, 1)
        self.conv1 = nn.Conv1d(16, 32, 3)

    def forward(self, x):  # (B, 16, 5, 5)
        h = self.point(torch.tanh(self.conv(x)))
        return self.conv1(h.flatten(2))


XC = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(4))
EFFECTIVE = ["conv", "point", "conv1"]


def test_effective_conv_shapes_count_and_math():
    from peft.tuners.lokr.layer import make_kron, make_weight_cp

    dm = dt.inject(ConvNet(), dt.make_config("lokr", r=2, effective_conv=True, targets=EFFECTIVE))
    conv, point, conv1 = (dm.model.get_submodule(p).deltas["default"] for p in EFFECTIVE)
    assert conv.lokr_t2.shape == (2, 2, 3, 3) and conv1.lokr_t2.shape == (2, 2, 3, 1)
    assert conv.lokr_w2_a.shape == (2, 8) and conv.lokr_w2_b.shape == (2, 4)
    assert not hasattr(point, "lokr_t2")  # a 1x1 kernel keeps the plain low-rank B (as PEFT)
    # A (4 x 4) + t2 (r² k) + w2_a (r b1) + w2_b (r c_in/a2), per conv; the 1x1: A (4·4 = 16 = (4, 8)·(4, 4))
    assert sum(p.numel() for p in conv.parameters()) == 16 + 4 * 9 + 2 * 8 + 2 * 4
    assert dm(XC).shape == ConvNet()(XC).shape and max_diff(dm(XC), ConvNet()(XC)) == 0  # A = 0 at init
    perturb(dm, std=0.3)
    for d, layer in ((conv, dm.model.conv), (conv1, dm.model.conv1)):
        A = d.factors()[0]
        ref = make_kron(A, make_weight_cp(d.lokr_t2, d.lokr_w2_a, d.lokr_w2_b), d.scale)  # PEFT's own formula
        assert_close(d.delta_weight(layer), ref.reshape(layer.weight.shape).flatten(1))
    y = dm(XC).detach()
    W0 = {k: v.clone() for k, v in dm.model.state_dict().items() if "base_layer" in k}
    dm.merge()
    assert_close(dm(XC), y)
    dm.unmerge()
    for k, v in W0.items():
        assert_close(dm.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_effective_conv_peft_parity_both_ways(tmp_path):
    cfg = peft.LoKrConfig(r=2, alpha=4, use_effective_conv2d=True, target_modules=EFFECTIVE)
    pm = peft.get_peft_model(ConvNet(), cfg).eval()
    perturb(pm, std=0.3)
    theirs = pm(XC).detach()
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(ConvNet(), tmp_path / "peft")
    assert dm.adapters["default"].config == dt.make_config("lokr", r=2, alpha=4.0, effective_conv=True,
                                                           targets=sorted(EFFECTIVE))
    assert_close(dm(XC), theirs)  # PEFT file -> deltatune
    dm.export_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(ConvNet(), tmp_path / "ours").eval()
    assert back.peft_config["default"].use_effective_conv2d
    assert_close(back(XC), theirs)  # deltatune file -> PEFT
    dm.merge()
    pm.merge_adapter()
    assert_close(dm.model.conv.base_layer.weight, pm.base_model.model.conv.base_layer.weight)


def test_effective_conv_bad_kernel():
    with pytest.raises(ValueError, match="effective_conv supports 1-D and 2-D convolutions, not a 3-D kernel"):
        dt.inject(Holder(nn.Conv3d(4, 8, 3)), dt.make_config("lokr", r=1, effective_conv=True, targets=["layer"]))
