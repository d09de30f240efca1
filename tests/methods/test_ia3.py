"""(IA)^3: output/input-side scaling vectors, P count, merge/unmerge (zeros too), PEFT parity both ways."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    assert_close,
    assert_round_trip,
    assert_rows_match_each_adapter,
    max_diff,
    perturb,
    train_losses,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
import deltatune.methods.multiplicative.ia3  # noqa: F401

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """k (output-scaled Linear), c1 (GPT-2 Conv1D), ff (feed-forward Linear), conv (Conv2d)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.k, self.c1, self.ff = nn.Linear(6, 5), Conv1D(7, 5), nn.Linear(7, 4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        h = self.ff(torch.tanh(self.c1(self.k(x))))  # (B, 4)
        return self.conv(h[:, :, None, None].expand(-1, -1, 3, 3).contiguous())


TARGETS = ["k", "c1", "ff", "conv"]
X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


def inject(ff=("ff",), model=None, **kw):
    return dt.inject(model or Net(), dt.make_config("ia3", targets=TARGETS, feedforward=list(ff), **kw))


def test_parameter_count_and_identity_at_init():
    base = Net()(X)
    dm = inject(ff=["ff", "conv"])
    # k: d_out=5, c1: d_out=7, ff: d_in=7, conv (feed-forward): in_channels=4
    assert dm.trainable_parameters() == 5 + 7 + 7 + 4
    assert inject(ff=[]).trainable_parameters() == 5 + 7 + 4 + 6  # all output-scaled: d_out each
    assert max_diff(dm(X), base) == 0  # every l starts at 1
    assert all(torch.equal(p, torch.ones_like(p)) for p in dm.parameters() if p.requires_grad)


def test_math_output_and_input_side():
    dm = inject()
    perturb(dm)
    m = dm.model
    lk, lc, lf, lv = (getattr(m, n).deltas["default"].ia3_l for n in TARGETS)
    x = X
    h = lk * m.k.base_layer(x)
    h = lc * m.c1.base_layer(h)
    h = m.ff.base_layer(lf * torch.tanh(h))  # the FFN's second layer sees l_ff * act(...)
    y = m.conv.base_layer(h[:, :, None, None].expand(-1, -1, 3, 3).contiguous()) * lv.view(1, -1, 1, 1)
    assert_close(dm(X), y, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_vectors():
    dm = inject()
    dm(X).sum().backward()
    for name, p in dm.named_parameters():
        assert (p.grad is not None) == ("ia3_l" in name), name


@pytest.mark.parametrize("ff", [[], ["ff", "conv"], ["ff", "c1"]])
def test_merge_equals_unmerged_and_unmerge_restores(ff):
    dm = inject(ff=ff)
    perturb(dm, std=0.3)
    y = dm(X).detach()
    W0 = {k: v.clone() for k, v in dm.model.state_dict().items()}
    dm.merge()
    assert_close(dm(X), y)
    dm.unmerge()
    for k, v in W0.items():
        assert_close(dm.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_zero_entries_merge_and_unmerge_exactly():
    dm = inject(ff=["ff"])
    perturb(dm)
    with torch.no_grad():
        dm.model.k.deltas["default"].ia3_l[1] = 0.0
        dm.model.ff.deltas["default"].ia3_l[2] = 0.0
    y = dm(X).detach()
    W0 = {k: v.clone() for k, v in dm.model.state_dict().items()}
    dm.merge()
    assert_close(dm(X), y)
    assert torch.count_nonzero(dm.model.k.base_layer.weight[1]) == 0
    dm.unmerge()
    for k in ("k.base_layer.weight", "k.base_layer.bias", "ff.base_layer.weight"):
        assert torch.equal(dm.model.state_dict()[k], W0[k]), k  # the saved copy, not a division by zero


def test_grouped_conv_feedforward_merge():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    x = torch.randn(2, 4, 5, 5)
    dm = dt.inject(model, dt.make_config("ia3", targets=["0"], feedforward=["0"]))
    assert dm.trainable_parameters() == 4  # in_channels, not in_channels/groups * k * k
    perturb(dm)
    y = dm(x).detach()
    dm.merge()
    assert_close(dm(x), y)


def test_save_load_and_mixed_batch(tmp_path):
    dm = inject()
    perturb(dm)
    dm.add_adapter("other", dt.make_config("ia3", targets=["k", "ff"], feedforward=["ff"]))
    dm.set_active("other")
    perturb(dm, seed=7)
    loaded = assert_round_trip(dm, Net(), X, tmp_path / "a", name="default")
    assert loaded.model.ff.deltas["default"].feedforward and not loaded.model.k.deltas["default"].feedforward
    assert_rows_match_each_adapter(dm, X, ["default", "other", dt.BASE])


@pytest.mark.parametrize("ff_b", [["ff"], ["ff", "k", "conv"]])
def test_two_active_adapters_multiply(ff_b):
    """Active [a, b] unmerged = both merged: the vectors multiply (input- and output-side ones alike), and a
    feed-forward vector scales the input of the layer so far; unmerge restores W0 and b0."""
    dm = inject()
    perturb(dm, std=0.3)
    dm.add_adapter("b", dt.make_config("ia3", targets=TARGETS, feedforward=ff_b))
    dm.set_active("b")
    perturb(dm, std=0.3, seed=5)
    dm.set_active(["default", "b"])
    y = dm(X).detach()
    m = dm.model
    la, lb = (m.k.deltas[n].ia3_l for n in ("default", "b"))
    h = m.k.base_layer(lb * X if "k" in ff_b else X) * la * (1 if "k" in ff_b else lb)
    assert_close(m.k(X), h)  # by hand on one layer
    W0 = {k: v.clone() for k, v in m.state_dict().items()}
    dm.merge()
    assert_close(dm(X), y)
    dm.unmerge()
    for k, v in W0.items():
        assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_bad_options():
    with pytest.raises(ValueError, match="does not adapt nn.Embedding"):
        dt.inject(nn.Sequential(nn.Embedding(5, 3)), dt.make_config("ia3", targets=["0"]))
    with pytest.raises(ValueError, match="unknown option 'feedforward_modules'.*did you mean 'feedforward'"):
        dt.make_config("ia3", feedforward_modules=["ff"])


# --- PEFT ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*Unmerge result can be inaccurate.*")
        yield


@pytest.mark.parametrize("ff", [["ff"], ["ff", "conv"]])
def test_export_loads_in_peft(tmp_path, ff):
    dm = inject(ff=ff)
    perturb(dm, std=0.3)
    ours = dm(X).detach()
    dm.export_peft(tmp_path)
    pm = peft.PeftModel.from_pretrained(Net(), tmp_path)
    assert_close(pm(X), ours, rtol=1e-5, atol=1e-6)
    merged = pm.merge_and_unload()  # PEFT's merge and ours give the same weights
    dm.merge()
    for n in TARGETS:
        assert_close(getattr(merged, n).weight, getattr(dm.model, n).base_layer.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ff_spec", [["ff"], r".*(ff|conv)"])
def test_peft_saved_loads(tmp_path, ff_spec):
    cfg = peft.IA3Config(target_modules=TARGETS, feedforward_modules=ff_spec)
    pm = peft.get_peft_model(Net(), cfg)
    perturb(pm, std=0.3)
    theirs = pm(X).detach()
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(Net(), tmp_path)
    assert_close(dm(X), theirs, rtol=1e-5, atol=1e-6)
    expected_ff = ["ff"] if isinstance(ff_spec, list) else ["conv", "ff"]
    assert dm.adapters["default"].config.feedforward == expected_ff


def test_minilm_loss_goes_down(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("ia3", targets=["key", "value", r"re:.*layer\.\d+\.output\.dense"],
                                                 feedforward=[r"re:.*layer\.\d+\.output\.dense"]),
                   train_modules=["classifier"])
    # 6 layers x (key 384 + value 384 + FFN output input side 1536) + classifier 384*2+2
    assert dm.trainable_parameters() == 6 * (384 + 384 + 1536) + 770
    losses = train_losses(dm, minilm_batch, labels=torch.tensor([1, 0, 1, 1]))
    assert losses[-1] < losses[0], losses


def test_two_active_adapters_match_peft(tmp_path):
    cfg = lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["ff", "conv"])  # noqa: E731
    pm = peft.get_peft_model(Net(), cfg(), adapter_name="p")
    pm.add_adapter("q", cfg())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path)  # tmp_path/p, tmp_path/q
    pm.base_model.set_adapter(["p", "q"])
    theirs = pm(X).detach()
    dm = dt.load_peft(Net(), tmp_path / "p", name="p")
    dm.load_peft(tmp_path / "q", name="q")
    dm.set_active(["p", "q"])
    assert_close(dm(X), theirs)
    dm.merge()
    assert_close(dm(X), theirs)
