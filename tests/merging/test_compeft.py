"""ComPEFT: top-k survivors, one shared magnitude alpha * std, packed bits, and a real MiniLM round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import perturb
from safetensors.torch import load_file

import deltatune as dt
from deltatune.engine.kinds import kind_of
from deltatune.merging.compeft import apply_compressed_delta, compeft, compress_delta


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_exactly_k_survivors_share_one_magnitude_and_keep_their_signs():
    x = randn(37, 23)
    c = compeft(x, density=0.1, alpha=0.5)
    out = c.decompress()
    kept = out != 0
    k = round(0.1 * x.numel())
    assert c.count == int(kept.sum()) == k == 85
    assert torch.unique(out[kept].abs()).tolist() == [pytest.approx(0.5 * x.std().item(), rel=1e-6)]
    assert torch.equal(out[kept].sign(), x[kept].sign())
    assert x[kept].abs().min() >= x[~kept].abs().max()  # the survivors are the largest |entries|


@pytest.mark.parametrize("density, alpha", [(0.05, 1.0), (0.3, 2.5), (1.0, 0.7)])
def test_decompress_equals_the_formula(density, alpha):
    x = randn(16, 50, seed=1)
    k = round(density * x.numel())
    top = torch.zeros(x.numel(), dtype=torch.bool)
    top[x.flatten().abs().argsort(descending=True)[:k]] = True
    scale = torch.tensor(alpha * x.std().item(), dtype=torch.float32)
    expected = torch.where(top.reshape(x.shape), x.sign() * scale, torch.zeros(()))
    assert torch.equal(compeft(x, density, alpha).decompress(), expected)


@pytest.mark.parametrize("shape, density, mask_bytes, sign_bytes", [((40, 25), 0.1, 125, 13), ((10,), 0.3, 2, 1)])
def test_size_is_one_mask_bit_per_entry_one_sign_bit_per_survivor_and_a_float32(shape, density, mask_bytes,
                                                                                sign_bytes):
    c = compeft(randn(*shape), density)
    assert c.mask.dtype == c.signs.dtype == torch.uint8
    assert (c.mask.numel(), c.signs.numel()) == (mask_bytes, sign_bytes)  # ceil(n/8), ceil(k/8)
    assert c.nbytes == mask_bytes + sign_bytes + 4


def test_a_sign_tensor_is_stored_exactly_and_the_map_is_odd_and_homogeneous():
    c0 = 0.02
    x = c0 * torch.where(randn(30, 7, seed=2) > 0, 1.0, -1.0)
    # Density 1 keeps every entry; alpha = c0 / std(x) makes the shared magnitude c0 again.
    torch.testing.assert_close(compeft(x, 1.0, alpha=c0 / x.std().item()).decompress(), x)
    y = randn(30, 7, seed=3)
    torch.testing.assert_close(compeft(-y, 0.2).decompress(), -compeft(y, 0.2).decompress())
    torch.testing.assert_close(compeft(3 * y, 0.2).decompress(), 3 * compeft(y, 0.2).decompress())


def test_zero_entries_never_survive_and_bad_options_are_refused():
    x = randn(8, 8, seed=4) * (randn(8, 8, seed=5) > 0)
    assert compeft(x, 1.0).count == int((x != 0).sum())
    assert not compeft(torch.zeros(5, 5), 0.5).decompress().any()
    assert compeft(x, 0.0).count == 0
    with pytest.raises(ValueError, match="density"):
        compeft(x, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        compeft(x, 0.1, alpha=0.0)


@pytest.fixture(scope="module")
def checkpoints(make_minilm, tmp_path_factory):
    """Real MiniLM saved twice with save_pretrained: the base and a copy whose first encoder layer moved."""
    root = tmp_path_factory.mktemp("ckpt")
    base = make_minilm()
    base.save_pretrained(root / "base")
    ft = copy.deepcopy(base)
    perturb(ft.bert.encoder.layer[0], std=0.01)
    ft.save_pretrained(root / "ft")
    return root


def test_checkpoint_delta_round_trips_and_reports_true_sizes_and_errors(checkpoints, make_minilm, tmp_path):
    report = compress_delta(checkpoints / "base", checkpoints / "ft", tmp_path / "c", density=0.2, alpha=1.5)
    base, ft = load_file(str(checkpoints / "base" / "model.safetensors")), load_file(str(checkpoints / "ft" /
                                                                                         "model.safetensors"))
    changed = {k for k in ft if not torch.equal(ft[k], base[k])}
    assert {t.key for t in report.tensors} == changed and all(".layer.0." in k for k in changed)
    assert set(report.unchanged) == {k for k in ft if ft[k].is_floating_point()} - changed

    expected, sq, err = {}, 0.0, 0.0
    for row in report.tensors:
        tau = ft[row.key] - base[row.key]
        c = compeft(tau, 0.2, 1.5)
        expected[row.key] = c.decompress()
        rel = (torch.linalg.vector_norm(tau - expected[row.key]) / torch.linalg.vector_norm(tau)).item()
        assert row.rel_error == pytest.approx(rel, rel=1e-5)
        assert row.kept == round(0.2 * tau.numel())
        assert row.dense_bytes == 2 * tau.numel()
        assert row.compressed_bytes == math.ceil(tau.numel() / 8) + math.ceil(row.kept / 8) + 4
        sq, err = sq + tau.square().sum().item(), err + (tau - expected[row.key]).square().sum().item()
    assert report.rel_error == pytest.approx(math.sqrt(err / sq), rel=1e-5)
    assert report.ratio == pytest.approx(report.dense_bytes / report.compressed_bytes)
    assert report.ratio > 8  # 16 bits against 1 + 0.2 bits an entry
    assert "| tensor |" in report.to_markdown()

    model = apply_compressed_delta(make_minilm(), tmp_path / "c")
    state = apply_compressed_delta(dict(base), tmp_path / "c")
    for key, w in model.state_dict().items():
        want = base[key] + expected[key] if key in expected else base[key]
        torch.testing.assert_close(w, want, atol=1e-7, rtol=0)
        torch.testing.assert_close(state[key], want, atol=1e-7, rtol=0)


def test_adapter_deltas_apply_in_each_layer_layout(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D stores W as (d_in, d_out): the d_out x d_in dW must land transposed."""
    reference = copy.deepcopy(tiny_gpt2)
    dm = dt.inject(tiny_gpt2, dt.make_config("lora", r=2, targets=["c_attn", "c_fc"]))
    perturb(dm, 0.05)
    dm.save(tmp_path / "adapter")
    report = compress_delta(None, tmp_path / "adapter", tmp_path / "c", density=0.5)
    assert report.source == "adapter" and len(report.tensors) == 4
    with pytest.raises(ValueError, match="pass the model"):
        apply_compressed_delta(dict(reference.state_dict()), tmp_path / "c")
    applied = apply_compressed_delta(copy.deepcopy(reference), tmp_path / "c")
    for path, layer in dm.layers():
        kind = kind_of(layer.base_layer)
        dW = layer.deltas["default"].delta_weight(layer).detach()
        change = kind.to_matrix(applied.get_submodule(path).weight) - kind.to_matrix(reference.get_submodule(path).weight)
        torch.testing.assert_close(change, compeft(dW, 0.5).decompress(), atol=1e-7, rtol=0)


def test_bad_inputs_are_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="pass the base checkpoint"):
        compress_delta(None, checkpoints / "ft", tmp_path / "c")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        compress_delta(checkpoints / "base", checkpoints / "ft", tmp_path / "busy")
    (tmp_path / "other").mkdir()
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not fine-tune"):
        compress_delta(tmp_path / "other", checkpoints / "ft", tmp_path / "c2")
