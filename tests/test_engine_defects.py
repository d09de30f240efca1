"""Engine defects found by porting PEFT's tests/test_custom_models.py, one regression test (or more) each:
MultiheadAttention, train modules shared by adapters, kind-less layers in mixed batches, deleting the
active adapter, nested disabled(), safe merge, disabled() on a merged model, full copies of any module, and
nn.TransformerEncoderLayer's fast path, which bypasses wrapped layers as MultiheadAttention bypasses out_proj."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import Holder, assert_close, assert_rows_match_each_adapter, perturb
from torch import nn

import deltatune as dt
from deltatune.engine import DeltaLayer


class Attention(nn.Module):
    """Token embedding -> nn.MultiheadAttention (self-attention, batch first) -> head."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


TOKENS = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(3))


def _train(dm: dt.DeltaModel, x: torch.Tensor, steps: int = 5) -> None:
    """A few Adam steps towards a fixed random target; the loss must go down."""
    target = torch.randn(dm(x).shape, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.Adam([p for p in dm.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (dm(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# --- 1. nn.MultiheadAttention -----------------------------------------------------------------------


def test_lora_on_multihead_attention_adapts_in_proj_and_out_proj_trains_and_merges_exactly():
    model = Attention().eval()
    base = model(TOKENS).detach()
    w_in, w_out = model.attn.in_proj_weight.detach().clone(), model.attn.out_proj.weight.detach().clone()
    dm = dt.inject(model, dt.LoRAConfig(targets=["attn"], r=2))
    assert isinstance(dm.model.attn, DeltaLayer) and not isinstance(dm.model.attn.out_proj, DeltaLayer)
    assert sorted(dm.adapter_state_dict()) == sorted(
        f"attn.{part}lora_{f}" for part in ("main.", "parts.out_proj.") for f in "AB")
    assert torch.equal(dm(TOKENS), base)  # B = 0 at init
    dm(TOKENS).pow(2).sum().backward()
    parts = dm.model.attn.deltas["default"]
    for d in (parts.main, parts.parts["out_proj"]):  # the gradient reaches both deltas
        assert d.lora_B.grad is not None and d.lora_B.grad.abs().sum() > 0
    _train(dm, TOKENS)
    trained = dm(TOKENS).detach()
    assert (trained - base).abs().max() > 1e-3  # training changed what the attention computes
    # merging adds each ΔW to the weight MHA reads, and gives the same forward
    expected_in = w_in + parts.main.delta_weight(dm.model.attn).detach()
    expected_out = w_out + parts.parts["out_proj"].delta_weight(parts.views["out_proj"]).detach()
    assert (expected_out - w_out).abs().max() > 1e-4
    dm.merge(safe_merge=True)  # checked on a copy of the MHA, both parts
    assert_close(dm.model.attn.in_proj_weight, expected_in)
    assert_close(dm.model.attn.out_proj.weight, expected_out)
    assert_close(dm(TOKENS), trained)
    dm.unmerge()
    assert_close(dm.model.attn.in_proj_weight, w_in)
    assert_close(dm.model.attn.out_proj.weight, w_out)
    assert_close(dm(TOKENS), trained)
    with dm.disabled():
        assert_close(dm(TOKENS), base)
    plain = dm.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention
    assert_close(plain(TOKENS), trained)


def test_each_part_of_multihead_attention_changes_the_output():
    for part in ("main", "out_proj"):
        dm = dt.inject(Attention().eval(), dt.LoRAConfig(targets=["attn"], r=2))
        with dm.disabled():
            base = dm(TOKENS).detach()
        parts = dm.model.attn.deltas["default"]
        perturb(parts.main if part == "main" else parts.parts["out_proj"])
        assert (dm(TOKENS) - base).abs().max() > 1e-3, part


def test_multihead_attention_adapter_round_trips(tmp_path):
    dm = dt.inject(Attention().eval(), dt.LoRAConfig(targets=["attn"], r=2))
    perturb(dm)
    expected = dm(TOKENS).detach()
    dm.save(tmp_path)
    loaded = dt.load(Attention().eval(), tmp_path)
    assert torch.equal(loaded(TOKENS), expected)
    assert dm.parameter_table()[0]["base_shape"] == (24, 8)  # in_proj_weight: q, k, v stacked
    with pytest.raises(ValueError, match="MultiheadAttention layers, which PEFT export does not cover"):
        dm.export_peft(tmp_path / "peft")


def test_targets_that_would_wrap_out_proj_of_multihead_attention_are_refused():
    for targets in (["out_proj"], ["attn.out_proj"], [r"re:.*proj"], [nn.Linear]):
        with pytest.raises(ValueError, match="reads out_proj.weight directly and never calls out_proj.*"
                                             "target the MultiheadAttention itself"):
            dt.inject(Attention(), dt.LoRAConfig(targets=targets))
    with pytest.raises(ValueError, match="reads out_proj.weight directly"):
        dt.inject(Attention(), dt.LoRAConfig(targets=["head"], r=2), train_modules=["attn.out_proj"])
    # excluding it, or a container name, leaves the other layers (a container adapts the MHA as a whole)
    dm = dt.inject(Attention(), dt.LoRAConfig(targets=[nn.Linear], exclude=["out_proj"], r=2))
    assert dm.adapters["default"].paths == ["head"]
    block = Holder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    dm = dt.inject(block, dt.LoRAConfig(targets=["layer"], r=2))
    assert dm.adapters["default"].paths == ["layer.self_attn", "layer.linear1", "layer.linear2"]


def test_non_additive_methods_and_mixed_batches_on_multihead_attention_say_what_to_do():
    with pytest.raises(ValueError, match="reads the weight itself.*train_modules"):
        dt.inject(Attention(), dt.make_config("dora", targets=["attn"]))
    dm = dt.inject(Attention().eval(), dt.LoRAConfig(targets=["attn"]))
    with pytest.raises(ValueError, match="mixed-adapter batches cannot route rows through 'MultiheadAttention'"):
        dm(TOKENS, adapter_names=["default", dt.BASE, "default", dt.BASE])
    with dm.disabled():  # rows of no adapter on this layer: the base runs
        base = dm(TOKENS)
    assert torch.equal(dm(TOKENS, adapter_names=[dt.BASE] * 4), base)


def test_multihead_attention_as_a_train_module_is_a_trainable_copy():
    model = Attention().eval()
    base = model(TOKENS).detach()
    dm = dt.inject(model, dt.LoRAConfig(targets=["head"], r=2), train_modules=["attn"])
    assert torch.equal(dm(TOKENS), base)  # the copy starts equal to the module
    _train(dm, TOKENS)
    trained = dm(TOKENS).detach()
    assert (trained - base).abs().max() > 1e-3
    dm.merge()
    assert_close(dm(TOKENS), trained)


# --- 2. two adapters, each with its own trainable copy of one module ----------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))


def _two_adapters_sharing_a_train_module() -> dt.DeltaModel:
    dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0"], r=2), "a", train_modules=["lin1"])
    dm.add_adapter("b", dt.LoRAConfig(targets=["lin0"], r=2), train_modules=["lin1"])
    for name, seed in (("a", 1), ("b", 2)):
        dm.set_active(name)
        perturb(dm, seed=seed)  # both the LoRA factors and the copy of lin1
    return dm


def test_two_adapters_can_train_the_same_module_each_with_its_own_copy(tmp_path):
    dm = _two_adapters_sharing_a_train_module()
    copies = dm.model.lin1.deltas
    assert not torch.equal(copies["a"].params["weight"], copies["b"].params["weight"])
    outs = {}
    for name in ("a", "b"):
        dm.set_active(name)
        outs[name] = dm(X).detach()
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3
    # a mixed batch: every row through its adapter's LoRA and its adapter's copy of lin1
    names = ["a", "b", dt.BASE, "b"]
    with dm.disabled():
        base = dm(X).detach()
    mixed = dm(X, adapter_names=names)
    for i, n in enumerate(names):
        assert_close(mixed[i], {**outs, dt.BASE: base}[n][i])
    # each saves and loads by itself
    for name in ("a", "b"):
        dm.save(tmp_path / name, name)
        loaded = dt.load(MLP().eval(), tmp_path / name)
        assert torch.equal(loaded(X), outs[name])
    both = dt.load(dt.load(MLP().eval(), tmp_path / "a"), tmp_path / "b")
    both.set_active("b")
    assert torch.equal(both(X), outs["b"])
    # merge / unmerge one, then the other
    w1 = dm.model.lin1.base_layer.weight.detach().clone()
    for name in ("a", "b"):
        dm.set_active(name)
        dm.merge()
        assert_close(dm(X), outs[name])
        dm.unmerge()
        assert torch.equal(dm.model.lin1.base_layer.weight, w1)
    dm.delete_adapter("a")
    dm.set_active("b")
    assert_close(dm(X), outs["b"])  # lin0 holds W0 + ΔW - ΔW now: equal up to rounding


def test_two_minilm_adapters_each_with_its_own_classifier(make_minilm, minilm_batch, tmp_path):
    dm = dt.inject(make_minilm(), dt.LoRAConfig(targets=["query", "value"], r=2), "a", train_modules=["classifier"])
    dm.add_adapter("b", dt.make_config("ia3", targets=["key", "output.dense"]), train_modules=["classifier"])
    outs = {}
    for name, seed in (("a", 1), ("b", 2)):
        dm.set_active(name)
        perturb(dm, std=0.05, seed=seed)
        outs[name] = dm(**minilm_batch).logits.detach()
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3
    names = ["b", "a", "a", "b"]
    mixed = dm(**minilm_batch, adapter_names=names).logits
    for i, n in enumerate(names):
        assert_close(mixed[i], outs[n][i], msg=n)
    dm.save(tmp_path, "b")
    assert torch.equal(dt.load(make_minilm(), tmp_path)(**minilm_batch).logits, outs["b"])


# --- 3. mixed batches through trainable copies of kind-less modules (GRU, LayerNorm) --------------------


class Recurrent(nn.Module):
    """Linear -> LayerNorm -> GRU (batch first, returns (output, h_n)) -> head on the last hidden state."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.gru = nn.GRU(8, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h = self.gru(self.norm(self.proj(x)))
        return self.head(out[:, -1] + h[0])  # h_n is (layers, batch, hidden): its batch dim is 1


SEQ = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(5))


def test_mixed_batch_through_copies_of_a_gru_and_a_layernorm_equals_rows_alone():
    dm = dt.inject(Recurrent().eval(), dt.LoRAConfig(targets=["proj"], r=2), "a", train_modules=["norm", "gru"])
    dm.add_adapter("b", dt.LoRAConfig(targets=["head"], r=2), train_modules=["gru"])
    for name, seed in (("a", 1), ("b", 2)):
        dm.set_active(name)
        perturb(dm, seed=seed)
    names = ["b", "a", dt.BASE, "a"]
    assert_rows_match_each_adapter(dm, SEQ, names, rows_alone=True)
    with torch.no_grad():
        mixed = dm(SEQ, adapter_names=names)
    # the per-row outputs differ, so each row really went through its own copy
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 and (mixed[1] - mixed[2]).abs().max() > 1e-3
    dm.set_active(["a", "b"])  # both train (a mixed batch never stacks them)
    dm(SEQ, adapter_names=names).sum().backward()  # gradients flow through the rows written into both GRU outputs
    assert dm.model.gru.deltas["a"].params["weight_hh_l0"].grad.abs().sum() > 0
    assert dm.model.gru.deltas["b"].params["weight_hh_l0"].grad.abs().sum() > 0


def test_mixed_batch_of_ssf_adapters_on_a_layernorm_equals_rows_alone():
    # SSF adapts the kind-less LayerNorm through its output: the mixed path used to ask it for `stock`
    dm = dt.inject(Recurrent().eval(), dt.make_config("ssf", targets=["norm"]), "a")
    dm.add_adapter("b", dt.make_config("ssf", targets=["norm"]))
    for name, seed in (("a", 1), ("b", 2)):
        dm.set_active(name)
        perturb(dm, seed=seed)
    names = ["a", dt.BASE, "b", "a"]
    assert_rows_match_each_adapter(dm, SEQ, names, rows_alone=True)


# --- 4. deleting the active adapter -----------------------------------------------------------------------


def test_deleting_the_active_adapter_activates_the_first_remaining_and_warns():
    dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0"], r=2), "a")
    dm.add_adapter("b", dt.LoRAConfig(targets=["lin1"], r=2))
    dm.add_adapter("c", dt.LoRAConfig(targets=["lin0"], r=2))
    dm.set_active("c")
    with pytest.warns(UserWarning, match="deleted the active adapter 'c'; activated 'a'"):
        dm.delete_adapter("c")
    assert dm.active == ("a",) and dm.model.lin0.active == ("a",)
    assert all(p.requires_grad for p in dm.model.lin0.deltas["a"].parameters())
    dm.set_active(["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.delete_adapter("a")  # another active one remains: it stays the only active one, no warning
    assert dm.active == ("b",)
    with pytest.warns(UserWarning, match="deleted the active adapter"):
        dm.add_adapter("d", dt.LoRAConfig(targets=["lin0"], r=2))
        dm.set_active("d")
        dm.delete_adapter("d")
    assert dm.active == ("b",)
    dm.delete_adapter("b")  # the last one: nothing left to activate
    assert dm.active == () and not dm.adapters and not any(isinstance(m, DeltaLayer) for m in dm.model.modules())


def test_merge_and_unload_of_another_adapter_than_the_active_one_warns_of_nothing():
    dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0"], r=2), "a")
    dm.add_adapter("b", dt.LoRAConfig(targets=["lin1"], r=2))
    dm.set_active("b")
    perturb(dm)
    expected = dm(X).detach()
    dm.set_active("a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = dm.merge_and_unload("b")
    assert_close(model(X), expected)


# --- 5. nested blocks restore what each layer had -------------------------------------------------------


def test_nested_disabled_blocks_keep_the_outer_block_disabled():
    dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0", "lin1"], r=2))
    perturb(dm)
    adapted = dm(X).detach()
    with dm.disabled():
        base = dm(X).detach()
        with dm.disabled():
            assert torch.equal(dm(X), base)
        assert torch.equal(dm(X), base)  # the inner block's exit must not re-enable the adapters
    assert (base - adapted).abs().max() > 1e-3
    assert torch.equal(dm(X), adapted)


def test_nested_routes_and_token_masks_restore_the_outer_ones():
    dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0"], r=2), "a")
    dm.add_adapter("b", dt.LoRAConfig(targets=["lin0"], r=2))
    layer = dm.model.lin0
    mask = torch.ones(4, 1, dtype=torch.bool)
    with dm._routed(["a", "b", "a", "b"]):
        outer = layer.route
        with dm._routed(["b"] * 4):
            assert layer.route is not outer
        assert layer.route is outer
        with dm._masked_tokens(mask), dm._masked_tokens(~mask):
            assert torch.equal(layer.token_mask, ~mask)
        assert layer.token_mask is None
    assert layer.route is None


def test_disabled_gives_the_base_in_mixed_batches_and_with_token_masks():
    dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0", "lin1"], r=2), "a")
    dm.add_adapter("b", dt.LoRAConfig(targets=["lin0"], r=2))
    for name in ("a", "b"):
        dm.set_active(name)
        perturb(dm)
    x = X[:, None, :]  # (batch, tokens=1, features): the shape a token mask needs
    with dm.disabled():
        base = dm(x).detach()
        assert torch.equal(dm(x, adapter_names=["a", "b", "a", dt.BASE]), base)
        assert torch.equal(dm(x, token_mask=torch.ones(4, 1)), base)
    mixed = dm(x, adapter_names=["a", "b", "a", dt.BASE]).detach()
    assert (mixed[:3] - base[:3]).abs().max() > 1e-3
    with dm._routed(["a", "b", "a", dt.BASE]):  # a disabled block inside a mixed-batch call
        with dm.disabled():
            assert torch.equal(dm.model(x), base)
        assert torch.equal(dm.model(x), mixed)


# --- 6. safe_merge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "full"])
def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(method):
    options = {"r": 2} if method in ("lora", "dora") else {}
    dm = dt.inject(MLP().eval(), dt.make_config(method, targets=["lin0", "lin1"], **options))
    perturb(dm)
    with torch.no_grad():
        next(dm.model.lin1.deltas["default"].parameters()).fill_(float("inf"))
    before = {k: v.clone() for k, v in dm.model.state_dict().items()}
    for merge in (dm.merge, dm.merge_and_unload):
        with pytest.raises(ValueError, match=rf"merging adapter 'default' \({method}\) into 'lin1' would put NaN/inf"):
            merge(safe_merge=True)
        after = dm.model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert dm.model.lin0.merged == () and dm.model.lin1.merged == () and "default" in dm.adapters
    dm.merge()  # without safe_merge the merge does what it is told
    assert not all(torch.isfinite(p).all() for p in dm.model.lin1.base_layer.parameters())


def test_safe_merge_of_finite_adapters_equals_the_plain_merge():
    plain = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0", "lin1"], r=2))
    perturb(plain)
    safe = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0", "lin1"], r=2))
    safe.load_adapter_state_dict(plain.adapter_state_dict())
    expected = plain(X).detach()
    plain.merge()
    safe.merge(safe_merge=True)
    assert torch.equal(safe.model.lin1.base_layer.weight, plain.model.lin1.base_layer.weight)
    assert_close(safe(X), expected)
    model = safe.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert_close(model(X), expected)


# --- 7. disabled() on a merged model --------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False], ids=["full", "lora"])
def test_disabled_on_a_merged_model_runs_the_base_and_merges_back(exact):
    if exact:  # a trainable copy merges by copying values: every step is bitwise
        dm = dt.inject(MLP().eval(), dt.make_config("full", targets=["lin1"]))
    else:
        dm = dt.inject(MLP().eval(), dt.LoRAConfig(targets=["lin0", "lin1"], r=2))
    perturb(dm)
    with dm.disabled():
        base = dm(X).detach()
    adapted = dm(X).detach()
    dm.merge()
    merged = dm(X).detach()
    with dm.disabled():
        inside = dm(X).detach()
        assert not dm.model.lin1.merged
    after = dm(X).detach()
    assert dm.model.lin1.merged == ("default",)
    if exact:
        assert torch.equal(inside, base) and torch.equal(after, merged) and torch.equal(merged, adapted)
    else:
        assert_close(inside, base)
        assert_close(after, merged)
    assert (base - merged).abs().max() > 1e-3


# --- 8. trainable copies of any module with parameters (norms, GRU, BatchNorm) --------------------------


@pytest.mark.parametrize("how", ["full_targets", "train_modules"])
def test_full_copies_of_a_layernorm_and_a_gru_train_save_load_and_merge(how, tmp_path):
    model = Recurrent().eval()
    base = model(SEQ).detach()
    if how == "full_targets":
        dm = dt.inject(model, dt.make_config("full", targets=["norm", "gru"]))
    else:
        dm = dt.inject(model, dt.LoRAConfig(targets=["proj"], r=2), train_modules=["norm", nn.GRU])
    assert dm.adapters["default"].all_paths[-2:] == ["norm", "gru"]
    assert torch.equal(dm(SEQ), base)  # the copies start equal to the modules
    _train(dm, SEQ)
    trained = dm(SEQ).detach()
    assert (trained - base).abs().max() > 1e-3
    assert dm.model.gru.deltas["default"].params["weight_hh_l0"].requires_grad
    assert not dm.model.gru.base_layer.weight_hh_l0.requires_grad
    dm.save(tmp_path)
    assert torch.equal(dt.load(Recurrent().eval(), tmp_path)(SEQ), trained)
    copied = [k for k in dm.model.state_dict() if k.startswith(("norm.base_layer", "gru.base_layer"))]
    originals = {k: dm.model.state_dict()[k].clone() for k in copied}
    dm.merge()
    assert_close(dm(SEQ), trained)
    dm.unmerge()  # a copy merges by copying values: unmerge restores them bitwise
    assert len(copied) == 6 and all(torch.equal(v, dm.model.state_dict()[k]) for k, v in originals.items())
    plain = dm.merge_and_unload()
    assert isinstance(plain.gru, nn.GRU) and isinstance(plain.norm, nn.LayerNorm)
    assert_close(plain(SEQ), trained)


def test_full_copy_of_batchnorm_in_a_train_module():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.bn, self.head = nn.Conv1d(6, 4, 3), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.bn(self.conv(x.transpose(1, 2))).mean(-1))

    model = ConvNet().eval()
    base = model(SEQ).detach()
    dm = dt.inject(model, dt.LoRAConfig(targets=["conv"], r=2), train_modules=["bn"])
    perturb(dm)
    adapted = dm(SEQ).detach()
    assert (adapted - base).abs().max() > 1e-3
    dm.merge()
    assert_close(dm(SEQ), adapted)


def test_full_copies_of_every_minilm_layernorm(make_minilm, minilm_batch, tmp_path):
    model = make_minilm()
    base = model(**minilm_batch).logits.detach()
    dm = dt.inject(model, dt.make_config("full", targets=["LayerNorm"]), "norms")
    assert len(dm.adapters["norms"].paths) == 13  # embeddings + 2 per layer x 6
    dm.add_adapter("lora", dt.LoRAConfig(targets=["query", "value"], r=2), train_modules=["classifier"])
    for name in ("norms", "lora"):
        dm.set_active(name)
        perturb(dm, std=0.05)
    outs = {}
    for name in ("norms", "lora"):
        dm.set_active(name)
        outs[name] = dm(**minilm_batch).logits.detach()
        assert (outs[name] - base).abs().max() > 1e-3
    names = ["lora", "norms", dt.BASE, "norms"]
    mixed = dm(**minilm_batch, adapter_names=names).logits
    for i, n in enumerate(names):
        assert_close(mixed[i], {**outs, dt.BASE: base}[n][i], msg=n)
    dm.save(tmp_path, "norms")
    assert torch.equal(dt.load(make_minilm(), tmp_path)(**minilm_batch).logits, outs["norms"])
    dm.set_active("norms")
    dm.merge()
    assert_close(dm(**minilm_batch).logits, outs["norms"])


@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_other_additive_methods_on_multihead_attention_merge_to_the_same_forward(method):
    dm = dt.inject(Attention().eval(), dt.make_config(method, targets=["attn"], r=2))
    with dm.disabled():
        base = dm(TOKENS).detach()
    perturb(dm)
    adapted = dm(TOKENS).detach()
    assert (adapted - base).abs().max() > 1e-3
    dm.merge()
    assert_close(dm(TOKENS), adapted)
    dm.unmerge()
    assert_close(dm(TOKENS), adapted)


def test_token_mask_on_a_layer_with_several_outputs_says_what_to_do():
    dm = dt.inject(Recurrent().eval(), dt.make_config("full", targets=["gru"]), "a")
    dm.add_adapter("b", dt.make_config("full", targets=["gru"]))
    mask = torch.ones(4, 7)
    with pytest.raises(ValueError, match="token_mask needs a layer with one output tensor; 'GRU' returns tuple"):
        dm(SEQ, token_mask=mask)
    with pytest.raises(ValueError, match="token_mask needs a layer with one output tensor; 'GRU' returns tuple"):
        dm(SEQ, token_mask=mask, adapter_names=["a", "b", "a", "b"])


# --- the same defect as 1 one level up: a fused fast path that bypasses the wrapped layers ----------------


@pytest.mark.parametrize("targets", [["linear1", "linear2"], ["self_attn"]])
def test_transformer_encoder_layer_in_eval_runs_its_adapted_layers(targets):
    # eval + no grad needed by its own weights: nn.TransformerEncoderLayer would run one fused kernel on the
    # base weights and never call its submodules
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(6))
    dm = dt.inject(model, dt.LoRAConfig(targets=targets, r=2))
    perturb(dm)
    with torch.no_grad():
        with dm.disabled():
            base = dm(x)
        adapted = dm(x)
        dm.merge()  # the fused kernel on the merged weights: what the adapted layers must give
        merged = dm(x)
    assert (adapted - base).abs().max() > 1e-3
    assert_close(adapted, merged)


def test_mixed_batch_through_a_sequence_first_gru_says_to_use_batch_first():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(6, 5)  # (sequence, batch, features)

        def forward(self, x):
            return self.gru(x.transpose(0, 1))[1][0]

    dm = dt.inject(SeqFirst(), dt.make_config("full", targets=["gru"]), "a")
    with pytest.raises(ValueError, match=r"batch has 7 rows; 'GRU' \(gru\) takes \(sequence, batch, ...\): build it "
                                         "with batch_first=True"):
        dm(SEQ, adapter_names=["a", dt.BASE, "a", "a"])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_nested_tensors_get_a_clear_error_and_the_fix_works():
    def encoder(nested: bool) -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(6))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    dm = dt.inject(encoder(True), dt.LoRAConfig(targets=["linear1"], r=2))
    with torch.no_grad(), pytest.raises(ValueError, match="nested tensor.*enable_nested_tensor=False"):
        dm(x, src_key_padding_mask=pad)
    dm = dt.inject(encoder(False), dt.LoRAConfig(targets=["linear1"], r=2))
    perturb(dm)
    with torch.no_grad():
        adapted = dm(x, src_key_padding_mask=pad)
        dm.merge()
        assert_close(adapted, dm(x, src_key_padding_mask=pad))


def test_a_deep_copied_model_keeps_its_layer_kinds_and_fast_paths(monkeypatch):
    import copy

    import deltatune.engine.layer as layer_module
    from deltatune.engine.kinds import CONV, LINEAR

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    dm = dt.inject(model, dt.make_config("oft", block_size=2, targets=["0"]))
    dm.add_adapter("lora", dt.LoRAConfig(r=2, targets=["2"]))
    perturb(dm)
    dm.set_active(["default", "lora"])
    perturb(dm)
    twin = copy.deepcopy(dm)
    kinds = {path: layer.kind for path, layer in twin.layers()}
    assert kinds["0"] is CONV and kinds["2"] is LINEAR  # identity, as the engine's `kind is ...` checks need
    x = torch.randn(2, 4, 5, 5)
    calls = []
    fused = layer_module.lowrank_linear
    monkeypatch.setattr(layer_module, "lowrank_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    assert_close(twin(x), dm(x))
    assert len(calls) == 2, "the copy's LoRA layer left the fused path"
