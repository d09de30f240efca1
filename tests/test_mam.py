"""The MAM adapter (He et al. 2022): prefix tuning at attention plus a scaled parallel adapter at the FFN, one
adapter made of two deltas (engine UnionConfig). Checked on MiniLM against its two parts added as separate
adapters, and for what one adapter name must give: one save, one switch, one count."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import deltatune as dt
from deltatune.engine.prompt import PROMPT


def randomise(dm, seed: int = 0) -> None:
    """Trained-looking weights: the FFN adapter starts at the identity (up = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def mam(make_minilm, **options):
    dm = dt.inject(make_minilm(), dt.make_config("mam_adapter", **options), name="mam")
    randomise(dm)
    return dm


def test_mam_is_its_two_parts_stacked(make_minilm, minilm_batch):
    dm = mam(make_minilm, prefix_length=6, prefix_hidden=32)
    parts = dm.adapters["mam"].config.parts()
    two = dt.inject(make_minilm(), parts[0], name="prefix")
    two.add_adapter("ffn", parts[1])
    state = dm.adapter_state_dict("mam")
    two.load_adapter_state_dict({k: v for k, v in state.items() if k.startswith(PROMPT)}, "prefix")
    two.load_adapter_state_dict({k: v for k, v in state.items() if not k.startswith(PROMPT)}, "ffn")
    two.set_active(["prefix", "ffn"])
    with torch.no_grad():
        expected = two(**minilm_batch).logits
        assert_close(dm(**minilm_batch).logits, expected)
        with dm.disabled():
            base = dm(**minilm_batch).logits
    assert (expected - base).abs().max() > 1e-3  # both parts change the output, so the test could fail


def test_parameter_count_is_the_prefix_plus_an_ffn_adapter_per_layer(make_minilm):
    dm = mam(make_minilm, prefix_length=30, prefix_hidden=800)
    L, d, n = 6, 384, 30  # MiniLM: 6 layers, hidden 384, 12 heads of 32 (kv_dim = 384)
    m = d // 2
    prefix = n * d + (d * 800 + 800) + (800 * 2 * L * d + 2 * L * d)  # E, then the MLP d -> 800 -> 2·L·d
    ffn = L * (2 * d * m + d + m)
    assert dm.trainable_parameters() == prefix + ffn
    dm.fold_prompt("mam")
    assert dm.trainable_parameters() == 2 * L * n * d + ffn
    assert dm.adapters["mam"].config.prefix_projection is False


def test_gradients_reach_only_the_adapter(make_minilm, minilm_batch):
    dm = mam(make_minilm, prefix_length=4, prefix_hidden=16)
    dm.train()
    dm(**minilm_batch, labels=torch.tensor([0, 1] * (len(minilm_batch["input_ids"]) // 2)
                                               + [0] * (len(minilm_batch["input_ids"]) % 2))).loss.backward()
    grads = {n for n, p in dm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("prompts.mam") for n in grads) and any(".deltas.mam." in n for n in grads)
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert grads <= trainable and all(n.startswith("prompts.") or ".deltas." in n for n in trainable)


def test_save_load_and_fold_round_trip(make_minilm, minilm_batch, tmp_path):
    dm = mam(make_minilm, prefix_length=5, prefix_hidden=24)
    with torch.no_grad():
        before = dm(**minilm_batch).logits
    dm.fold_prompt()
    with torch.no_grad():
        assert_close(dm(**minilm_batch).logits, before)
    dm.save(tmp_path / "mam")
    loaded = dt.load(make_minilm(), tmp_path / "mam")
    assert loaded.adapters["mam"].method == "mam_adapter"
    with torch.no_grad():
        assert torch.equal(loaded(**minilm_batch).logits, dm(**minilm_batch).logits)


def test_one_name_switches_and_deletes_both_parts(make_minilm, minilm_batch):
    dm = mam(make_minilm, prefix_length=4, prefix_hidden=16)
    with pytest.raises(ValueError, match="virtual tokens"):
        dm.merge("mam")
    dm.delete_adapter("mam")
    assert not dm.prompts and not list(dm.layers())
    with torch.no_grad():
        assert torch.equal(dm(**minilm_batch).logits, make_minilm()(**minilm_batch).logits)


def test_parts_on_the_same_module_are_refused(make_minilm):
    class Clash(dt.engine.registry.UnionConfig):
        def parts(self):
            return [dt.LoRAConfig(targets=["query"]), dt.LoRAConfig(targets=["query"])]

    dt.engine.registry.register("clash_for_test", config=Clash, family="test", formula="", paper="",
                                summary="")(type("ClashParts", (dt.engine.registry.UnionParts,), {}))
    try:
        with pytest.raises(ValueError, match="give its parts different targets"):
            dt.inject(make_minilm(), Clash())
    finally:
        dt.engine.registry._METHODS.pop("clash_for_test")
