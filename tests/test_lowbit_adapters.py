"""Low-bit bottleneck adapters (BottleneckConfig.bits, Jie et al. ICCV 2023): the quantiser, its gradient,
the adapted forward, packed storage and a real-data run.

References are written from the official code (JieShibo/PETL-ViT binary_adapter/utils.py QLinear): the
sum-of-signs quantiser `func` and the `q.data + w - w.data` straight-through trick, not deltatune's code.
"""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import fresh
from helpers import assert_close, perturb
from torch.special import ndtr, ndtri
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import deltatune as dt
from deltatune import assets
from deltatune.methods.adapters import lowbit
from deltatune.methods.adapters._quantize import codebook, fake_quantise, pack, unpack


def official_quantised(w: torch.Tensor, bits: int) -> torch.Tensor:
    """QLinear.forward's weight: q(n) = sum_i sign(n - t_i) (v_i+1 - v_i) / 2, straight-through via .data."""
    v, t = codebook(bits)
    mean_w, std_w = w.mean(), w.std()
    n = (w - mean_w) / (std_w + 1e-5)
    q = (torch.sign(n.unsqueeze(-1) - t) * (v[1:] - v[:-1]) / 2).sum(-1)
    return (q.data + n - n.data) * std_w + mean_w


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_the_levels_are_the_bin_medians_of_a_gaussian_with_midpoint_thresholds(bits):
    v, t = (x.double() for x in codebook(bits))
    assert v.shape == (2 ** bits,) and t.shape == (2 ** bits - 1,)
    assert torch.all(v[1:] > v[:-1]) and torch.equal(v, -v.flip(0))
    assert_close(t, (v[1:] + v[:-1]) / 2, atol=1e-6)  # nearest-level thresholds
    edges = torch.cat([t.new_zeros(1), ndtr(t), t.new_ones(1)])
    assert_close(ndtr(v), (edges[1:] + edges[:-1]) / 2, atol=1e-6)  # each level halves its bin's mass


def test_one_bit_is_mean_plus_or_minus_0_6745_std_times_the_sign():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * 0.3 + 0.05
    alpha = ndtri(torch.tensor(0.75)).item()  # 0.6745, the median of |N(0, 1)|
    expected = w.mean() + alpha * w.std() * torch.sign(w - w.mean())
    assert_close(fake_quantise(w, 1), expected)
    assert fake_quantise(w, 1).unique().numel() == 2


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_the_quantiser_equals_the_official_one_and_takes_at_most_2_to_the_b_values(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 48) * 0.02 - 0.01
    wq = fake_quantise(w, bits)
    assert_close(wq, official_quantised(w, bits))
    values = wq.unique()
    assert values.numel() <= 2 ** bits
    if bits < 8:  # 3072 draws hit every level of 16
        assert_close(values, codebook(bits)[0] * w.std() + w.mean())


@pytest.mark.parametrize("bits", [1, 4])
def test_the_gradient_is_the_official_straight_through_one(bits):
    torch.manual_seed(0)
    w = (torch.randn(16, 32) * 0.1).requires_grad_()
    g = torch.randn(16, 32)  # an upstream gradient dL/dW_q
    ours = torch.autograd.grad((g * fake_quantise(w, bits)).sum(), w)[0]
    ref = torch.autograd.grad((g * official_quantised(w, bits)).sum(), w)[0]
    assert_close(ours, ref)
    # q itself has zero gradient almost everywhere: the straight-through one is the normalise/denormalise map's
    # (about g, as std / (std + eps) ~ 1), plus the mean/std terms the official code leaves attached
    n_only = torch.autograd.grad((g * ((w - w.mean()) / (w.std() + 1e-5) * w.std() + w.mean())).sum(), w)[0]
    assert_close(n_only, g, rtol=1e-3)
    assert not torch.allclose(ours, n_only, atol=1e-4)  # the C * d std / dW term is there


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packed_weights_unpack_to_the_forward_weights_bit_for_bit(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 384) * 0.05
    codes, mean_std = pack(w, bits)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() * bits // 8
    assert torch.equal(unpack(codes, mean_std, bits, w.shape), fake_quantise(w, bits))


def test_the_byte_layout_is_the_official_dump():
    torch.manual_seed(0)
    w, bits = torch.randn(4, 6), 2
    v = codebook(bits)[0]
    index = (official_quantised(w, bits).sub(w.mean()).div(w.std()).reshape(-1, 1) - v).abs().argmin(dim=1)
    k = 8 // bits
    expected = [sum(int(index[i + j]) * (2 ** bits) ** j for j in range(k)) for i in range(0, len(index), k)]
    assert pack(w, bits)[0].tolist() == expected




@pytest.mark.parametrize("method", ["houlsby", "parallel_adapter"])
def test_the_forward_is_the_bottleneck_with_quantised_weights(method, minilm):
    path, batch = minilm
    torch.manual_seed(0)
    dm = dt.inject(fresh(path), dt.make_config(method, bits=1), name=method)
    cfg, d = dm.adapters[method].config, 384
    m, sites = cfg.bottleneck_size(d), dm.adapters[method].paths
    assert cfg.init == "binary" and dm.trainable_parameters() == len(sites) * 2 * d * m  # no biases
    ups = [dm.model.get_submodule(p).deltas[method].up.weight for p in sites]
    assert all(u.abs().max() <= 2e-3 and u.std() > 0 for u in ups)  # official init: not 0, so not the identity
    perturb(dm, std=0.05)
    out = dm(**batch).last_hidden_state

    ref = dt.inject(fresh(path), dt.make_config(method), name=method)  # the full-precision bottleneck
    with torch.no_grad():
        for p in sites:
            ours, theirs = dm.model.get_submodule(p).deltas[method], ref.model.get_submodule(p).deltas[method]
            for part in ("down", "up"):
                getattr(theirs, part).weight.copy_(official_quantised(getattr(ours, part).weight, 1))
                getattr(theirs, part).bias.zero_()
    assert_close(out, ref(**batch).last_hidden_state)
    with dm.disabled():
        assert torch.equal(dm(**batch).last_hidden_state, fresh(path)(**batch).last_hidden_state)


def test_save_load_and_packed_round_trips(minilm, tmp_path):
    path, batch = minilm
    torch.manual_seed(0)
    cfg = dt.make_config("houlsby", bits=1, ln_before=True, scaling="learned")
    dm = dt.inject(fresh(path), cfg, name="default")
    perturb(dm, std=0.05)
    out = dm(**batch).last_hidden_state
    dm.save(tmp_path / "full")
    assert torch.equal(dt.load(fresh(path), tmp_path / "full")(**batch).last_hidden_state, out)

    file = lowbit.save_packed(dm, tmp_path / "packed.safetensors")
    tensors = lowbit.export_packed(dm)
    quantised = sum(t.numel() for k, t in dm.adapter_state_dict().items() if k.endswith(("down.weight", "up.weight")))
    assert sum(t.numel() for k, t in tensors.items() if k.endswith(".codes")) == quantised // 8  # 1 bit a weight
    payload = sum(t.numel() * t.element_size() for t in tensors.values())  # + LayerNorm, scale, mean/std
    assert payload < quantised / 8 + 4 * (dm.trainable_parameters() - quantised) + 8 * 24 + 12
    assert file.stat().st_size < payload + 16384  # + the safetensors header
    packed = dt.inject(fresh(path), cfg, name="default")
    lowbit.load_packed(packed, file)
    assert torch.equal(packed(**batch).last_hidden_state, out)
    with pytest.raises(ValueError, match="loaded from a packed file"):
        lowbit.export_packed(packed)
    packed.save(tmp_path / "unpacked")  # a save of it keeps the quantiser off
    assert torch.equal(dt.load(fresh(path), tmp_path / "unpacked")(**batch).last_hidden_state, out)


def test_bad_options_name_the_fix(minilm):
    with pytest.raises(ValueError, match="init='binary'"):
        dt.make_config("houlsby", bits=1, init="mam_adapter")
    with pytest.raises(ValueError, match="bits"):
        dt.make_config("houlsby", bits=3)
    dm = dt.inject(fresh(minilm[0]), dt.make_config("houlsby"), name="default")
    with pytest.raises(ValueError, match="bits=1"):
        lowbit.export_packed(dm)


def test_one_bit_adapters_learn_rotten_tomatoes(minilm):
    path, _ = minilm
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    dm = dt.inject(model, dt.make_config("parallel_adapter", bits=1, reduction_factor=16))  # no head training
    rows = assets.rotten_tomatoes()[:16]
    tok = AutoTokenizer.from_pretrained(path)
    b = dict(tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    b["labels"] = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = dm(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
