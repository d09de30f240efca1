"""LoHa: dW = (w1_a w1_b) * (w2_a w2_b) * alpha/r; P count, zero init, checkpointed gradients, merge, PEFT."""

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

import deltatune as dt
import deltatune.methods.structured.loha  # noqa: F401

peft = pytest.importorskip("peft")

R, ALPHA = 3, 6.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(5, 4, 3, padding=1)
        self.c1 = nn.Conv1d(4, 3, 3, padding=1)

    def forward(self, x):
        h = torch.tanh(self.lin(x))[:, :, None, None].expand(-1, -1, 4, 4).contiguous()
        return self.c1(torch.tanh(self.conv(h)).flatten(2))


TARGETS = ["lin", "conv", "c1"]
X = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))


def inject(model=None, **kw):
    return dt.inject(model or Net(), dt.make_config("loha", r=R, alpha=ALPHA, targets=TARGETS, **kw))


def test_parameter_count_and_zero_init():
    base = Net()(X)
    dm = inject()
    # 2r(d_in + d_out): lin 6+5, conv 5*9+4, c1 4*3+3
    assert dm.trainable_parameters() == 2 * R * ((6 + 5) + (45 + 4) + (12 + 3))
    # Tucker convs: 2(r^2 kh kw + r(c_out + c_in)); Conv1d kernel 3 stored (3, 1)
    tucker = 2 * (R * R * 9 + R * (4 + 5)) + 2 * (R * R * 3 + R * (3 + 4))
    assert inject(effective_conv=True).trainable_parameters() == 2 * R * 11 + tucker
    assert max_diff(dm(X), base) == 0
    d = dm.model.lin.deltas["default"]
    assert torch.count_nonzero(d.hada_w2_b) == 0 and all(torch.count_nonzero(p) > 0 for p in
                                                         (d.hada_w1_a, d.hada_w1_b, d.hada_w2_a))


@pytest.mark.parametrize("effective", [False, True])
def test_delta_is_the_scaled_hadamard_product(effective):
    dm = inject(effective_conv=effective)
    perturb(dm)
    d = dm.model.lin.deltas["default"]
    dW = (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b) * ALPHA / R
    assert_close(d.delta_weight(dm.model.lin), dW, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(dW) > R  # the Hadamard product exceeds rank r (up to r^2)
    layer = dm.model.conv
    W = layer.base_layer.weight + layer.deltas["default"].delta_weight(layer).reshape(4, 5, 3, 3)
    h = torch.randn(2, 5, 4, 4)
    assert_close(layer(h), nn.functional.conv2d(h, W, layer.base_layer.bias, padding=1))


@pytest.mark.parametrize("effective", [False, True])
def test_checkpointed_gradients_match_plain_autograd_and_skip_base(effective):
    dm = inject(effective_conv=effective)
    perturb(dm)
    dm(X).square().sum().backward()
    for name, p in dm.named_parameters():
        assert (p.grad is not None) == ("hada_" in name), name
    from deltatune.methods.structured.loha import _hadamard
    d = dm.model.conv.deltas["default"]
    params = [p for p in d.factors() if p is not None]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    layer = dm.model.conv
    with torch.no_grad():
        h = torch.tanh(dm.model.lin(X))[:, :, None, None].expand(-1, -1, 4, 4).contiguous()
    # the same loss through a plain (non-checkpointed) dW
    dW = _hadamard(d.scale, *d.factors()).reshape(layer.base_layer.weight.shape)
    out = nn.functional.conv2d(h, layer.base_layer.weight + dW, layer.base_layer.bias, padding=1)
    dm.model.c1(torch.tanh(out).flatten(2)).square().sum().backward()
    for p, g in zip(params, grads):
        assert_close(p.grad, g)


@pytest.mark.parametrize("effective", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(effective):
    dm = inject(effective_conv=effective)
    perturb(dm, std=0.3)
    y = dm(X).detach()
    W0 = {k: v.clone() for k, v in dm.model.state_dict().items() if "base_layer" in k}
    dm.merge()
    assert_close(dm(X), y)
    dm.unmerge()
    for k, v in W0.items():
        assert_close(dm.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_save_load_and_mixed_batch(tmp_path):
    dm = inject()
    perturb(dm)
    dm.add_adapter("t", dt.make_config("loha", r=2, targets=["lin", "conv"], effective_conv=True))
    dm.set_active("t")
    perturb(dm, seed=9)
    assert_round_trip(dm, Net(), X, tmp_path, name="t")
    assert_rows_match_each_adapter(dm, X, ["t", "default"])


def test_bad_options():
    with pytest.raises(ValueError):
        dt.make_config("loha", r=0)
    with pytest.raises(ValueError, match="does not adapt nn.Embedding"):
        dt.inject(Holder(nn.Embedding(5, 3)), dt.make_config("loha", targets=["layer"]))
    with pytest.raises(ValueError, match="1-D and 2-D"):
        dt.inject(Holder(nn.Conv3d(2, 2, 3)), dt.make_config("loha", r=2, targets=["layer"], effective_conv=True))


# --- rank_dropout / module_dropout (shared with LoKr: structured/_lycoris.py) ---------------

DROP = {"loha": ("loha", {"r": 2}, True), "lokr": ("lokr", {}, False),
        "lokr_scaled": ("lokr", {"rank_dropout_scale": True}, True)}


def dropout_layer(key, **drop):
    method, opts, _ = DROP[key]
    torch.manual_seed(0)
    dm = dt.inject(Holder(nn.Linear(16, 64)), dt.make_config(method, targets=["layer"], **opts, **drop))
    perturb(dm, std=0.3)
    return dm.eval()


@pytest.mark.parametrize("key", list(DROP))
def test_rank_dropout_keeps_one_minus_p_of_the_rows(key):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    dm = dropout_layer(key, rank_dropout=0.3)
    base = dm.model.layer.base_layer(x).detach()
    full = dm(x).detach() - base  # eval: no dropout
    dm.train()
    kept = []
    for _ in range(200):
        d = dm(x).detach() - base
        on = d.abs().sum(0) > 0  # (64,) rows of ΔW that survived
        assert torch.equal(d.abs() > 0, on.expand_as(d))  # one mask per forward, for every row of the batch
        scale = 1 / on.float().mean() if DROP[key][2] else 1.0
        assert_close(d, full * on * scale)
        kept.append(on.float().mean())
    assert abs(torch.stack(kept).mean().item() - 0.7) < 0.02  # 12,800 draws: 3 sigma is 0.012
    dm.eval()
    assert torch.equal(dm(x).detach() - base, full)


@pytest.mark.parametrize("key", ["loha", "lokr"])
def test_module_dropout_skips_all_or_nothing(key):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    dm = dropout_layer(key, module_dropout=0.4)
    base = dm.model.layer.base_layer(x).detach()
    full = dm(x).detach()
    dm.train()
    skipped = 0
    for _ in range(500):
        y = dm(x).detach()
        skipped += torch.equal(y, base)
        assert torch.equal(y, base) or torch.equal(y, full)
    assert abs(skipped / 500 - 0.4) < 0.07  # 3 sigma: 0.066
    dm.eval()
    assert torch.equal(dm(x).detach(), full)


@pytest.mark.parametrize("key", list(DROP))
def test_dropouts_match_peft_in_training(key, tmp_path):
    """Same seed -> same masks and same outputs as PEFT in train mode (both draw the module coin, then one
    uniform per output row); the keys travel both ways."""
    method, opts, _ = DROP[key]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    dm = dropout_layer(key, rank_dropout=0.3, module_dropout=0.2)
    dm.export_peft(tmp_path)
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(Holder(nn.Linear(16, 64)), tmp_path, is_trainable=True)
    cfg = pm.peft_config["default"]
    assert (cfg.rank_dropout, cfg.module_dropout) == (0.3, 0.2)
    assert getattr(cfg, "rank_dropout_scale", True) == DROP[key][2]
    dm.train(), pm.train()
    for seed in range(20):
        torch.manual_seed(seed)
        theirs = pm(x)
        torch.manual_seed(seed)
        assert_close(dm(x), theirs)
    pm.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    back = dt.load_peft(Holder(nn.Linear(16, 64)), tmp_path / "peft")
    assert back.adapters["default"].config == dm.adapters["default"].config


# --- PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("effective", [False, True])
def test_export_loads_in_peft_and_merges_alike(tmp_path, effective):
    dm = inject(effective_conv=effective)
    perturb(dm, std=0.3)
    ours = dm(X).detach()
    dm.export_peft(tmp_path)
    pm = peft.PeftModel.from_pretrained(Net(), tmp_path)
    assert_close(pm(X), ours)
    merged = pm.merge_and_unload()
    dm.merge()
    for n in TARGETS:
        assert_close(getattr(merged, n).weight, getattr(dm.model, n).base_layer.weight)


@pytest.mark.parametrize("effective", [False, True])
def test_peft_saved_loads(tmp_path, effective):
    cfg = peft.LoHaConfig(r=R, alpha=ALPHA, target_modules=TARGETS, use_effective_conv2d=effective)
    pm = peft.get_peft_model(Net(), cfg)
    perturb(pm, std=0.3)
    theirs = pm(X).detach()
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(Net(), tmp_path)
    assert_close(dm(X), theirs)
    assert dm.adapters["default"].config.effective_conv == effective


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("loha", r=4, alpha=4, targets=["query", "value"]),
                   train_modules=["classifier"])
    assert dm.trainable_parameters() == 6 * 2 * (2 * 4 * (384 + 384)) + 770
    losses = train_losses(dm, minilm_batch, lr=5e-3, labels=torch.tensor([1, 0, 1, 1]))
    assert losses[-1] < losses[0], losses
