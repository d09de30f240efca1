"""SHiRA: r(d_in + d_out) entries per weight, PEFT's random mask drawn identically, and PEFT's files both ways
on MiniLM (the same logits in deltatune and in peft 0.21.2). The engine's properties are tests/test_selection.py's."""

from __future__ import annotations

import peft
import pytest
import torch
from helpers import assert_close, perturb
from torch import nn

import deltatune as dt


def _shira_layers(pm):
    return {n: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.shira.layer.Linear)}


def test_the_random_mask_is_peft_s_draw_and_the_count_is_lora_s(make_minilm):
    dm = dt.inject(make_minilm(), dt.make_config("shira", r=8, random_seed=3, targets=["query", "value"]))
    pm = peft.get_peft_model(make_minilm(), peft.ShiraConfig(r=8, random_seed=3, target_modules=["query", "value"]))
    theirs = _shira_layers(pm)
    assert len(theirs) == 12
    for path, layer in dm.layers():
        rows, cols = theirs[f"base_model.model.{path}"].shira_indices["default"].long()
        assert torch.equal(layer.deltas["default"].index("weight"), rows * 384 + cols), path
    assert dm.trainable_parameters() == 12 * 8 * (384 + 384)  # LoRA r=8's 73,728 on query/value


def test_weight_magnitude_takes_the_largest_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    dm = dt.inject(model, dt.make_config("shira", r=1, mask_type="weight_magnitude", targets=["0"]))
    idx = dict(dm.layers())["0"].deltas["default"].index("weight")
    w = model[0].base_layer.weight.detach().abs().reshape(-1)
    assert idx.numel() == 16
    assert w[idx].min() >= w[~torch.isin(torch.arange(60), idx)].max()


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="use r <= 3"):
        dt.inject(nn.Sequential(nn.Linear(8, 6)), dt.make_config("shira", r=4, targets=["0"]))
    with pytest.raises(ValueError, match="linear layers"):
        dt.inject(nn.Sequential(nn.Embedding(8, 6)), dt.make_config("shira", r=1, targets=["0"]))
    with pytest.raises(ValueError, match="mask_type"):
        dt.make_config("shira", mask_type="grad")


def test_peft_saved_shira_loads_with_the_same_logits_and_exports_back(tmp_path, make_minilm, minilm_batch):
    cfg = peft.ShiraConfig(r=4, random_seed=7, target_modules=["query", "value"], init_weights=False)
    pm = peft.get_peft_model(make_minilm(), cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = pm(**minilm_batch).logits
        dm = dt.load_peft(make_minilm(), tmp_path / "peft").eval()
        ours = dm(**minilm_batch).logits
    assert_close(ours, theirs)
    with torch.no_grad():
        assert not torch.allclose(ours, make_minilm()(**minilm_batch).logits, atol=1e-3)  # the adapter does act
    dm.export_peft(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "again").eval()
    with torch.no_grad():
        assert_close(again(**minilm_batch).logits, theirs)


@pytest.mark.parametrize("mask_type", ["random", "weight_magnitude"])
def test_deltatune_shira_exports_to_peft_with_the_same_logits(mask_type, tmp_path, make_minilm, minilm_batch):
    dm = dt.inject(make_minilm(), dt.make_config("shira", r=4, mask_type=mask_type, targets=["query", "value"]))
    perturb(dm, std=0.05)
    dm.eval()
    dm.export_peft(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "ours").eval()
    with torch.no_grad():
        ours = dm(**minilm_batch).logits
        assert_close(pm(**minilm_batch).logits, ours)
        pm.merge_adapter()  # PEFT's merge of our file equals our unmerged model too
        assert_close(pm(**minilm_batch).logits, ours)
