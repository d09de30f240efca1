"""The method-independent engine: targeting, wrapping any module, named adapters, gradients, merging,
mixed-adapter batches and parameter accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Holder, assert_close, max_diff, perturb
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.engine import DeltaLayer
from deltatune.engine.targeting import resolve

QUERY_VALUE = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(6) for n in ("query", "value")]


def lora_delta(layer: DeltaLayer, name: str = "default") -> torch.Tensor:
    """s·B@A computed here from the parameters, as a d_out x d_in matrix."""
    d = layer.deltas[name]
    return d.config.alpha / d.config.r * (d.lora_B @ d.lora_A)


@pytest.fixture(scope="module")
def minilm_ro(make_minilm):
    """One MiniLM copy for tests that only resolve targets (never modified)."""
    return make_minilm()


# --- targeting -------------------------------------------------------------------------------------


def test_target_by_name_suffix_and_full_path(minilm_ro):
    paths = resolve(minilm_ro, ["query"])
    assert paths == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(6)]
    assert resolve(minilm_ro, ["self.query"]) == paths  # a dotted suffix
    assert resolve(minilm_ro, ["bert.encoder.layer.2.attention.self.query"]) == [paths[2]]
    # a suffix matches whole path components only: "uery" is not "query"
    with pytest.raises(ValueError, match="matches no module"):
        resolve(minilm_ro, ["uery"])


def test_target_by_regex_is_a_full_match(minilm_ro):
    paths = resolve(minilm_ro, r"re:.*layer\.[01]\..*\.(query|value)")
    assert sorted(paths) == sorted(p for p in QUERY_VALUE if ".layer.0." in p or ".layer.1." in p)
    with pytest.raises(ValueError, match="matches no module"):
        resolve(minilm_ro, "re:query")  # full match on the dotted path, not a search


def test_target_by_type_and_predicate(minilm_ro):
    assert resolve(minilm_ro, [nn.Embedding]) == [
        "bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings"]
    pred = resolve(minilm_ro, lambda path, m: isinstance(m, nn.Linear) and path.endswith("intermediate.dense"))
    assert pred == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(6)]


def test_exclude(minilm_ro):
    paths = resolve(minilm_ro, ["query", "value"], exclude=[r"re:.*\.layer\.0\..*", "value"])
    assert sorted(paths) == sorted(p for p in QUERY_VALUE if p.endswith("query") and ".layer.0." not in p)
    with pytest.raises(ValueError, match="leave no module"):
        resolve(minilm_ro, ["query"], exclude=["query"])


def test_misspelt_target_lists_close_names(minilm_ro):
    with pytest.raises(ValueError, match="quary") as err:
        dt.inject(minilm_ro, dt.LoRAConfig(targets=["quary", "value"]))
    assert "query" in str(err.value).split("closest")[-1]
    assert not any(isinstance(m, DeltaLayer) for m in minilm_ro.modules())  # nothing half-injected


def test_container_name_selects_supported_layers_inside(minilm_ro):
    paths = resolve(minilm_ro, ["attention"])
    expected = [f"bert.encoder.layer.{i}.attention.{n}" for i in range(6)
                for n in ("self.query", "self.key", "self.value", "output.dense")]
    assert sorted(paths) == sorted(expected)


def test_unsupported_module_types_give_a_clear_error(minilm_ro):
    for spec in (["LayerNorm"], [nn.LayerNorm], [nn.Dropout]):
        with pytest.raises(ValueError, match="no layer a weight delta can adapt.*nn.Linear"):
            resolve(minilm_ro, spec)
    with pytest.raises(TypeError, match="cannot target"):
        resolve(minilm_ro, [3])


def test_architecture_default_targets(minilm_ro, tiny_llama, tiny_gpt2):
    assert sorted(resolve(minilm_ro, None)) == sorted(QUERY_VALUE)
    assert sorted(resolve(tiny_llama, None)) == [f"model.layers.{i}.self_attn.{n}" for i in range(2)
                                                 for n in ("q_proj", "v_proj")]
    assert resolve(tiny_gpt2, None) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="no targets given"):
        resolve(nn.Sequential(nn.Linear(2, 2)), None)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_default_targets_inject_and_start_at_base(arch, request):
    model = request.getfixturevalue(arch)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        dm = dt.inject(model, dt.LoRAConfig(r=4))
        assert max_diff(dm(input_ids=ids).logits, base) == 0
        perturb(dm)
        assert max_diff(dm(input_ids=ids).logits, base) > 1e-4


# --- any module: wrapped in place, never rebuilt ----------------------------------------------------


def _reference_synthetic(make_synthetic, dm) -> nn.Module:
    """A plain Synthetic whose weights are W0 + s·B@A, written in each layer's own layout here."""
    ref = make_synthetic()
    with torch.no_grad():
        ref.emb.weight += lora_delta(dm.model.emb).t()  # the table is (num, dim): ΔW is (dim x num)
        ref.lin.weight += lora_delta(dm.model.lin)
        ref.c1.weight += lora_delta(dm.model.c1).t()  # Conv1D stores (d_in, d_out)
        ref.conv.weight += lora_delta(dm.model.conv).reshape(ref.conv.weight.shape)
    return ref


def test_lora_on_embedding_linear_conv1d_conv2d(make_synthetic, synthetic_input):
    model = make_synthetic()
    originals = {n: getattr(model, n) for n in ("emb", "lin", "c1", "conv")}
    base = model(synthetic_input).detach()
    dm = dt.inject(model, dt.LoRAConfig(r=2, alpha=6, targets=list(originals)))
    for n, layer in originals.items():
        assert isinstance(getattr(dm.model, n), DeltaLayer)
        assert getattr(dm.model, n).base_layer is layer
    assert type(dm.model.c1.base_layer) is Conv1D
    assert max_diff(dm(synthetic_input), base) == 0
    perturb(dm)
    out = dm(synthetic_input)
    assert max_diff(out, base) > 1e-3
    assert_close(out, _reference_synthetic(make_synthetic, dm)(synthetic_input))


class TaggedLinear(nn.Linear):
    """A user Linear: extra required constructor args, and a forward that adds a constant shift."""

    def __init__(self, in_features: int, out_features: int, tag: str, shift: float):
        super().__init__(in_features, out_features)
        self.tag = tag
        self.register_buffer("shift", torch.tensor(shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shift


class GainLinear(nn.Linear):
    """A user Linear whose custom forward rescales and clips its input before the stock op."""

    def __init__(self, in_features: int, out_features: int, gain: float, *, clip: float):
        super().__init__(in_features, out_features)
        self.gain, self.clip = gain, clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear((x * self.gain).clamp(-self.clip, self.clip), self.weight, self.bias)


class Conv2dStaticSamePadding(nn.Conv2d):
    """As in EfficientNet: TF 'SAME' padding computed from image_size at construction, applied in forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, image_size: tuple[int, int],
                 stride: int = 1, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, **kwargs)
        ih, iw = image_size
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = -(-ih // sh), -(-iw // sw)
        ph = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        self.static_padding = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _subclass_case(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    if kind == "tagged_linear":
        return TaggedLinear(6, 5, "proj", shift=0.7), torch.randn(4, 6)
    if kind == "gain_linear":
        return GainLinear(6, 5, 1.5, clip=1.0), torch.randn(4, 6)
    return Conv2dStaticSamePadding(3, 4, 3, image_size=(9, 9), stride=2), torch.randn(2, 3, 9, 9)


def _check_subclass_kept_and_exact(kind: str) -> None:
    layer, x = _subclass_case(kind)
    base = layer(x).detach()
    dm = dt.inject(Holder(layer), dt.LoRAConfig(r=2, alpha=4, targets=["layer"]))
    assert dm.model.layer.base_layer is layer  # the user's object, not a re-constructed copy
    assert type(dm.model.layer.base_layer) is type(layer)
    assert max_diff(dm(x), base) == 0
    perturb(dm)
    W0 = layer.weight.detach().clone()
    expected = functional_call(layer, {"weight": W0 + lora_delta(dm.model.layer).reshape(W0.shape)}, (x,))
    assert max_diff(dm(x), base) > 1e-3
    assert_close(dm(x), expected)
    dm.merge()
    assert_close(dm(x), expected)


@pytest.mark.parametrize("kind", ["gain_linear", "same_padding_conv"])
def test_user_subclass_is_kept_and_runs_its_own_forward(kind):
    _check_subclass_kept_and_exact(kind)


def test_user_linear_subclass_with_additive_forward_is_exact():
    _check_subclass_kept_and_exact("tagged_linear")


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv1d(3, 5, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    (nn.Conv2d(3, 5, (3, 2), padding=1, padding_mode="reflect"), (2, 3, 7, 6)),
    (nn.Conv3d(2, 4, 2, stride=(1, 2, 1)), (1, 2, 4, 5, 4)),
    (nn.Embedding(12, 6, padding_idx=0), None),
], ids=["conv1d_dilated", "conv2d_reflect", "conv3d", "embedding_padding_idx"])
def test_other_layer_kinds_match_an_explicit_weight(layer, shape):
    torch.manual_seed(0)
    x = torch.randint(0, 12, (3, 4)) if shape is None else torch.randn(shape)
    W0 = layer.weight.detach().clone()
    dm = dt.inject(Holder(layer), dt.LoRAConfig(r=2, alpha=4, targets=["layer"]))
    perturb(dm)
    dW = lora_delta(dm.model.layer)
    dW = dW.t() if isinstance(layer, nn.Embedding) else dW.reshape(W0.shape)
    expected = functional_call(layer, {"weight": W0 + dW}, (x,))
    assert_close(dm(x), expected)


# --- named adapters ---------------------------------------------------------------------------------


def _two_adapters(make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, alpha=4, targets=["lin", "conv"]), name="a")
    dm.add_adapter("b", dt.LoRAConfig(r=3, alpha=3, targets=["lin", "c1"]))
    dm.set_active(["a", "b"])  # so that perturb reaches both
    perturb(dm)
    return dm


def test_two_named_adapters_each_match_that_adapter_alone(make_synthetic, synthetic_input):
    x = synthetic_input
    dm = _two_adapters(make_synthetic)
    outs = {}
    for name in ("a", "b"):
        dm.set_active(name)
        assert dm.active == (name,)
        outs[name] = dm(x).detach()
        alone = dt.inject(make_synthetic(), dm.adapters[name].config, name=name)
        alone.load_adapter_state_dict(dm.adapter_state_dict(name))
        assert_close(alone(x), outs[name], rtol=1e-5, atol=1e-6)
    assert max_diff(outs["a"], outs["b"]) > 1e-3


def test_stacked_lora_adapters_add_their_deltas(make_synthetic, synthetic_input):
    dm = _two_adapters(make_synthetic)
    h = torch.randn(4, 8)
    lin = dm.model.lin
    with torch.no_grad():
        base = lin.base_layer(h)
        dm.set_active("a")
        ya = lin(h)
        dm.set_active("b")
        yb = lin(h)
        dm.set_active(["a", "b"])
        yab = lin(h)
    assert_close(yab - base, (ya - base) + (yb - base), rtol=1e-5, atol=1e-6)
    assert_close(yab, F.linear(h, lin.weight + lora_delta(lin, "a") + lora_delta(lin, "b"), lin.bias), rtol=1e-5, atol=1e-6)
    # the whole model: a on lin+conv, b on lin+c1, all folded into plain weights by hand
    ref = make_synthetic()
    with torch.no_grad():
        ref.lin.weight += lora_delta(lin, "a") + lora_delta(lin, "b")
        ref.conv.weight += lora_delta(dm.model.conv, "a").reshape(ref.conv.weight.shape)
        ref.c1.weight += lora_delta(dm.model.c1, "b").t()
    assert_close(dm(synthetic_input), ref(synthetic_input))


def test_disabled_context_gives_the_base_output(make_synthetic, synthetic_input):
    x = synthetic_input
    base = make_synthetic()(x)
    dm = _two_adapters(make_synthetic)
    adapted = dm(x).detach()
    assert max_diff(adapted, base) > 1e-3
    with dm.disabled():
        assert max_diff(dm(x), base) == 0
    assert max_diff(dm(x), adapted) == 0


def test_delete_adapter_restores_the_original_modules(make_synthetic, synthetic_input):
    model = make_synthetic()
    lin, conv, c1 = model.lin, model.conv, model.c1
    base = model(synthetic_input).detach()
    dm = dt.inject(model, dt.LoRAConfig(r=2, targets=["lin", "conv"]), name="a")
    dm.add_adapter("b", dt.LoRAConfig(r=2, targets=["lin", "c1"]))
    dm.set_active(["a", "b"])
    perturb(dm)
    dm.delete_adapter("a")
    assert dm.model.conv is conv and type(dm.model.conv) is nn.Conv2d  # only "a" was there
    assert isinstance(dm.model.lin, DeltaLayer) and list(dm.model.lin.deltas) == ["b"]
    assert dm.active == ("b",)
    dm.delete_adapter("b")
    assert dm.model.lin is lin and dm.model.c1 is c1
    assert not any(isinstance(m, DeltaLayer) for m in dm.model.modules())
    assert dm.adapters == {} and dm.active == ()
    assert max_diff(dm(synthetic_input), base) == 0
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        dm.delete_adapter("b")


def test_only_active_adapters_train_and_base_never(make_synthetic):
    dm = _two_adapters(make_synthetic)

    def trainable(name):
        return [p.requires_grad for layer in (dm.model.lin, dm.model.conv, dm.model.c1)
                if name in layer.deltas for p in layer.deltas[name].parameters()]

    def base_trainable():
        return [p.requires_grad for n, p in dm.model.named_parameters() if ".deltas." not in n]

    for active, a, b in (("a", True, False), ("b", False, True), (["a", "b"], True, True)):
        dm.set_active(active)
        assert set(trainable("a")) == {a} and set(trainable("b")) == {b}
        assert not any(base_trainable())
    dm.add_adapter("c", dt.LoRAConfig(r=1, targets=["lin"]))  # a new adapter is not active, so frozen
    assert set(trainable("c")) == {False}
    with pytest.raises(ValueError, match="did you mean 'a'"):
        dm.set_active("aa")


def test_failed_inject_or_add_adapter_leaves_no_trace():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    first = model[0]
    with pytest.raises(ValueError, match="PiSSA init needs r <= 2"):  # layer "1" fails after "0" was built
        dt.inject(model, dt.LoRAConfig(r=4, init="pissa", targets=["0", "1"]))
    assert model[0] is first and not any(isinstance(m, DeltaLayer) for m in model.modules())
    dm = dt.inject(model, dt.LoRAConfig(r=2, targets=["0"]), name="a")
    n = dm.trainable_parameters()
    with pytest.raises(ValueError, match="PiSSA init needs r <= 2"):
        dm.add_adapter("b", dt.LoRAConfig(r=4, init="pissa", targets=["0", "1"]))
    assert dm.trainable_parameters() == n and list(dm.model[0].deltas) == ["a"]


def test_adapter_name_errors(make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"]), name="a")
    for bad, msg in (("a", "exists already"), ("x.y", "invalid adapter name"), (dt.BASE, "invalid adapter name")):
        with pytest.raises(ValueError, match=msg):
            dm.add_adapter(bad, dt.LoRAConfig(r=2, targets=["lin"]))
    with pytest.raises(ValueError, match="already carries deltas"):
        dt.DeltaModel(dm.model)


# --- gradients reach only the delta -----------------------------------------------------------------


def test_gradients_reach_only_the_delta_on_minilm(make_minilm, minilm_batch):
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=8, targets=["query", "value"]), train_modules=["classifier"])
    labels = torch.tensor([1, 0, 0, 1])

    def backward():
        dm.zero_grad(set_to_none=True)
        dm(**minilm_batch, labels=labels).loss.backward()
        A = {p: layer.deltas["default"].lora_A.grad for p, layer in dm.layers() if p in QUERY_VALUE}
        B = {p: layer.deltas["default"].lora_B.grad for p, layer in dm.layers() if p in QUERY_VALUE}
        base = {n: p.grad for n, p in dm.model.named_parameters() if ".deltas." not in n}
        return A, B, base

    A, B, base = backward()
    assert len(A) == len(B) == 12 and base
    assert all(g is None for g in base.values())
    assert all(g is not None and g.abs().max() > 0 for g in B.values())
    assert all(g is not None and g.abs().max() == 0 for g in A.values())  # B = 0 at init, so dL/dA = 0
    head = dm.model.classifier.deltas["default"].params
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in head.values())

    with torch.no_grad():
        for _, layer in dm.layers():
            if hasattr(layer.deltas["default"], "lora_B"):
                layer.deltas["default"].lora_B.normal_(0, 0.02)
    A, B, base = backward()
    assert all(g is None for g in base.values())
    assert all(g.abs().max() > 0 for g in B.values()) and all(g.abs().max() > 0 for g in A.values())


# --- merge / unmerge --------------------------------------------------------------------------------

MERGE_CONFIGS = {
    "lora": lambda t: dt.LoRAConfig(r=4, alpha=8, targets=t),
    "dora": lambda t: dt.DoRAConfig(r=4, alpha=8, targets=t),
    "pissa": lambda t: dt.LoRAConfig(r=4, alpha=8, targets=t, init="pissa"),
    "pissa_niter_4": lambda t: dt.LoRAConfig(r=4, alpha=8, targets=t, init="pissa_niter_4"),
}


def _setup(model_kind, method, make_minilm, make_synthetic, minilm_batch, synthetic_input):
    if model_kind == "minilm":
        model, targets, head = make_minilm(), ["query", "value"], ["classifier"]

        def run(m):
            return m(**minilm_batch).logits
    else:
        model, head = make_synthetic(), ["head"]
        targets = ["lin", "c1", "conv"] + (["emb"] if method == "lora" else [])

        def run(m):
            return m(synthetic_input)
    dm = dt.inject(model, MERGE_CONFIGS[method](targets), train_modules=head)
    perturb(dm, std=0.02 if model_kind == "minilm" else 0.1)
    return dm, run


@pytest.mark.parametrize("model_kind,method", [
    ("minilm", "lora"), ("minilm", "dora"), ("minilm", "pissa_niter_4"),  # exact SVDs of 12 layers: slow on CPU
    ("synthetic", "lora"), ("synthetic", "dora"), ("synthetic", "pissa")])
def test_merge_equals_unmerged_and_unmerge_restores(model_kind, method, make_minilm, make_synthetic,
                                                    minilm_batch, synthetic_input):
    dm, run = _setup(model_kind, method, make_minilm, make_synthetic, minilm_batch, synthetic_input)
    with torch.no_grad():
        before = {n: p.clone() for n, p in dm.model.named_parameters() if ".deltas." not in n}
        y = run(dm)
        dm.merge()
        assert all(layer.merged == ("default",) for _, layer in dm.layers())
        changed = [n for n, p in dm.model.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert changed  # the deltas really went into the weights
        assert_close(run(dm), y)
        dm.unmerge()
        assert all(layer.merged == () for _, layer in dm.layers())
        after = dict(dm.model.named_parameters())
        for n, w in before.items():
            assert_close(after[n], w, rtol=1e-5, atol=1e-6, msg=n)
        assert_close(run(dm), y)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_merge_and_unload(method, make_synthetic, synthetic_input):
    dm, run = _setup("synthetic", method, None, make_synthetic, None, synthetic_input)
    with torch.no_grad():
        y = run(dm)
        plain = dm.merge_and_unload()
        assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
        assert type(plain.lin) is nn.Linear and type(plain.c1) is Conv1D
        assert_close(plain(synthetic_input), y)
        assert dm.adapters == {}


def _lora_then_dora(make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin", "conv"]), name="a")
    dm.add_adapter("b", dt.DoRAConfig(r=2, targets=["lin", "c1"]))
    dm.set_active(["a", "b"])
    perturb(dm)
    return dm


def test_merge_two_then_unmerge_one(make_synthetic, synthetic_input):
    x = synthetic_input
    dm = _lora_then_dora(make_synthetic)
    lin = dm.model.lin
    W0 = lin.weight.detach().clone()
    with torch.no_grad():
        dm.merge()  # a first, then b (DoRA: not commuting with a) on top
        assert lin.merged == ("a", "b") and dm.model.conv.merged == ("a",) and dm.model.c1.merged == ("b",)
        merged_out = dm(x)
        dm.unmerge("b")  # the newest: W0 + ΔW_a remains
        assert lin.merged == ("a",) and dm.model.c1.merged == ()
        assert_close(lin.weight, W0 + lora_delta(lin, "a"), rtol=1e-5, atol=1e-6)
        assert_close(dm(x), merged_out)  # b runs unmerged on top of merged a
        dm.merge("b")
        dm.unmerge("a")  # the oldest: b must be re-folded onto W0 alone
        assert lin.merged == ("b",) and dm.model.conv.merged == ()
        only_b = dt.inject(make_synthetic(), dm.adapters["b"].config, name="b")
        only_b.load_adapter_state_dict(dm.adapter_state_dict("b"))
        only_b.merge()
        assert_close(lin.weight, only_b.model.lin.weight, rtol=1e-5, atol=1e-6)
        dm.unmerge()
        assert lin.merged == ()
        assert_close(lin.weight, W0, rtol=1e-5, atol=1e-6)
        dm.set_active("a")  # two LoRAs commute: stacked == merged in any order
        dm.add_adapter("c", dt.LoRAConfig(r=3, targets=["lin", "c1"]))
        dm.set_active(["a", "c"])
        perturb(dm, seed=7)
        stacked = dm(x)
        dm.merge(["c", "a"])
        assert_close(dm(x), stacked)
        dm.unmerge("c")
        assert_close(lin.weight, W0 + lora_delta(lin, "a"), rtol=1e-5, atol=1e-6)
        assert_close(dm(x), stacked)


def test_stacked_dora_runs_only_on_merged_others(make_synthetic, synthetic_input):
    """DoRA rescales the whole weight, so stacked on an unmerged LoRA it would not match its own merge."""
    dm = _lora_then_dora(make_synthetic)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot stack unmerged adapters.*merge the others"):
        dm(synthetic_input)
    with torch.no_grad():
        dm.merge("a")  # DoRA now runs on W0 + ΔW_a, exactly as merging it next will fold it
        stacked = dm(synthetic_input)
        dm.merge("b")
        assert_close(dm(synthetic_input), stacked)


def test_mixed_batch_while_merged_raises(make_synthetic, synthetic_input):
    # (disabled() on a merged model unmerges for the block: tests/test_engine_defects.py)
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"]))
    dm.merge()
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        dm(synthetic_input, adapter_names=["default"] * synthetic_input.shape[0])
    dm.unmerge()
    with dm.disabled():
        dm(synthetic_input)


# --- mixed-adapter batches --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_minilm(make_minilm):
    torch.manual_seed(0)  # module scope: set up before the per-test seed
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=8, targets=["query", "value"]), name="lora_a",
                   train_modules=["classifier"])
    dm.add_adapter("lora_b", dt.LoRAConfig(r=4, alpha=8, targets=["key", "intermediate.dense"]))
    dm.add_adapter("dora_c", dt.DoRAConfig(r=4, targets=["value", "output.dense"]))
    dm.set_active(["lora_a", "lora_b", "dora_c"])
    perturb(dm, std=0.02)
    dm.set_active("lora_a")
    return dm


def test_mixed_adapter_batch_equals_rows_alone(mixed_minilm, minilm_batch):
    dm = mixed_minilm
    names = ["dora_c", dt.BASE, "lora_a", "lora_b"]
    with torch.no_grad():
        mixed = dm(**minilm_batch, adapter_names=names).logits
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in minilm_batch.items()}
            if name == dt.BASE:
                with dm.disabled():
                    alone = dm(**row).logits
            else:
                dm.set_active(name)
                alone = dm(**row).logits
            assert_close(mixed[i], alone[0], msg=name)
        dm.set_active("lora_a")
        all_base = dm(**minilm_batch, adapter_names=[dt.BASE] * 4).logits
        assert_close(all_base[1], mixed[1])
        assert all(max_diff(all_base[i], mixed[i]) > 1e-3 for i in (0, 2, 3))  # the adapters really act


def test_mixed_adapter_batch_errors(mixed_minilm, minilm_batch):
    dm = mixed_minilm
    dm.set_active("lora_b")
    with torch.no_grad():
        expected = dm(**minilm_batch).logits
        with pytest.raises(ValueError, match="3 entries but the batch has 4 rows"):
            dm(**minilm_batch, adapter_names=["lora_a", "lora_b", dt.BASE])
        with pytest.raises(ValueError, match="unknown adapter 'lora_aa'.*did you mean 'lora_a'"):
            dm(**minilm_batch, adapter_names=["lora_aa", "lora_b", dt.BASE, dt.BASE])
        # a failed mixed forward leaves no routing behind: the next plain call uses the active adapter
        assert max_diff(dm(**minilm_batch).logits, expected) == 0
    dm.set_active("lora_a")


def test_mixed_batch_generate_matches_rows_alone(tiny_gpt2):
    dm = dt.inject(tiny_gpt2, dt.LoRAConfig(r=4), name="a")
    dm.add_adapter("b", dt.LoRAConfig(r=2, alpha=8, targets=["c_proj"]))
    dm.set_active(["a", "b"])
    perturb(dm, std=0.3)
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["b", dt.BASE, "a"]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
        for i, name in enumerate(names):
            row = {"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])}
            if name == dt.BASE:
                with dm.disabled():
                    alone = dm.generate(**row, **kw)
            else:
                dm.set_active(name)
                alone = dm.generate(**row, **kw)
            assert torch.equal(mixed[i], alone[0]), name
        with dm.disabled():
            base = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert not torch.equal(mixed[0], base[0]) or not torch.equal(mixed[2], base[2])  # adapters change tokens


# --- accounting -------------------------------------------------------------------------------------


def test_minilm_lora_parameter_accounting(make_minilm):
    model = make_minilm()
    n_base = sum(p.numel() for p in model.parameters())
    dm = dt.inject(model, dt.LoRAConfig(r=8, targets=["query", "value"]))
    formula = sum(8 * (layer.in_features + layer.out_features) for _, layer in dm.layers())
    assert dm.trainable_parameters() == formula == 73_728
    assert dm.total_parameters() == n_base + 73_728
    rows = dm.parameter_table()
    assert sorted(r["layer"] for r in rows) == sorted(QUERY_VALUE)
    assert all(r["trainable"] == r["parameters"] == 8 * (384 + 384) and r["base_shape"] == (384, 384)
               and r["method"] == "lora" for r in rows)
    assert "73,728" in dm.summary()


def test_minilm_accounting_with_head_and_dora(make_minilm):
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=8, targets=["query", "value"]), train_modules=["classifier"])
    assert dm.trainable_parameters() == 73_728 + 770
    head = [r for r in dm.parameter_table() if r["layer"] == "classifier"]
    assert head == [{"layer": "classifier", "adapter": "default", "method": "full", "base_shape": (2, 384),
                     "parameters": 770, "trainable": 770}]
    dm.add_adapter("d", dt.DoRAConfig(r=8, targets=["query", "value"]))
    d_rows = [r for r in dm.parameter_table() if r["adapter"] == "d"]
    assert len(d_rows) == 12 and all(r["parameters"] == 8 * 768 + 384 and r["trainable"] == 0 for r in d_rows)
    dm.set_active("d")
    assert dm.trainable_parameters() == 12 * (8 * 768 + 384)


def test_fingerprint_reaches_the_last_entry_of_tensors_beyond_float32_index_precision():
    from deltatune.engine.model import fingerprint

    w = torch.zeros(2**24 + 3)  # float32 linspace rounds the last index past the end here
    before = fingerprint(w)
    w[-1] = 1.0
    assert fingerprint(w) != before
