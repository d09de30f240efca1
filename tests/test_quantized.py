"""Quantized bases (bitsandbytes NF4 / FP4 / LLM.int8, CPU kernels): the layer kind, deltatune.quantize, LoRA
on them, merging by dequantise-add-requantise with an exact unmerge, and a merged float model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_close, perturb
from test_all_methods import CASES, METHODS, Net
from torch import nn

import deltatune as dt
from deltatune.engine.kinds import LINEAR, QLINEAR4, QLINEAR8, kind_of
from deltatune.engine.quantized import pin_4bit_format

bnb = pytest.importorskip("bitsandbytes")

SCHEMES = ["nf4", "fp4", "int8"]
WIDTH = 64  # layer width: 4-bit blocks of 64 stay within rows (engine/quantized.py keeps unaligned layers in float)
X = torch.randn(4, 3, WIDTH, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def wide_llama():
    """conftest's tiny Llama at width 64: 4-bit blocks within rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_keeps_layers_with_unaligned_in_features_in_float():
    with pytest.warns(UserWarning, match="kept 2 layer.*not a multiple of 64.*blocks.0.up, blocks.1.up"):
        net = dt.quantize(Net(width=32), "nf4", skip=())
    assert type(net.blocks[0].up) is nn.Linear and kind_of(net.blocks[0].down) is QLINEAR4
    assert kind_of(dt.quantize(Net(width=32), "int8", skip=()).blocks[0].up) is QLINEAR8  # int8 has no blocks


def quantized_net(scheme: str, dtype: torch.dtype | None = None) -> Net:
    return dt.quantize(Net(width=WIDTH), scheme, compute_dtype=dtype, skip=())


def packed(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor that holds a bitsandbytes layer's quantized W0: bytes and statistics."""
    w = layer.weight
    if bnb_kind(layer) == "int8":
        scales = w.SCB if w.SCB is not None else layer.state.SCB
        return [w.data, scales]
    qs = w.quant_state
    return [w.data, qs.absmax, qs.code]


def requantized(W: torch.Tensor, scheme: str) -> torch.Tensor:
    """W quantized and dequantised by bitsandbytes' functions, as quantize() stores it (blocks of 64)."""
    F = bnb.functional
    if scheme == "int8":
        CB, SCB, _ = F.int8_vectorwise_quant(W.half())
        return CB.float() * (SCB[:, None] / 127)
    data, state = F.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type=scheme)
    return F.dequantize_4bit(data, state)


def bnb_kind(layer: nn.Module) -> str:
    return "int8" if isinstance(layer, bnb.nn.Linear8bitLt) else "4bit"


def test_bnb_layers_are_a_kind_of_their_own_not_linear():
    """Both subclass nn.Linear; read as LINEAR their packed bytes would be taken for W0 (the fused path)."""
    nf4, int8 = quantized_net("nf4"), quantized_net("int8")
    assert isinstance(nf4.blocks[0].up, nn.Linear) and kind_of(nf4.blocks[0].up) is QLINEAR4
    assert isinstance(int8.blocks[0].up, nn.Linear) and kind_of(int8.blocks[0].up) is QLINEAR8
    assert kind_of(Net(width=WIDTH).blocks[0].up) is LINEAR


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantised_view_is_w0_within_the_scheme_step(scheme):
    """DeltaLayer.matrix() of a quantized layer is the d_out x d_in W0, close to the float weight it came from."""
    float_net, net = Net(width=WIDTH), quantized_net(scheme)
    dm = dt.inject(net, dt.LoRAConfig(r=2, targets=["up"]))
    layer = dm.model.blocks[0].up
    W = float_net.blocks[0].up.weight
    # half the widest gap between codes, of a block's (row's) max |W|: NF4 (1 - 0.696) / 2, FP4 (1 - 2/3) / 2, 1/254
    # (int8 quantizes W in fp16 first: plus its rounding, 2^-11 relative)
    step = {"nf4": 0.153, "fp4": 0.167, "int8": 1 / 254 + 2 ** -11}[scheme]
    assert layer.matrix().shape == W.shape and layer.matrix().dtype == torch.float32
    assert_close(layer.matrix(), W, rtol=step, atol=0)


def test_quantize_swaps_stock_linears_in_place_and_skips_lm_head(wide_llama):
    model = wide_llama
    out = dt.quantize(model, "nf4")
    assert out is model
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is nn.Linear  # as transformers' quantizer does


def test_quantize_refuses_a_linear_subclass_with_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), Scaled(WIDTH, WIDTH))
    with pytest.raises(ValueError, match=r"'1' is a Scaled with its own forward.*skip=\['1'"):
        dt.quantize(model, "nf4")
    assert type(model[0]) is nn.Linear  # nothing swapped before the refusal
    dt.quantize(model, "nf4", skip=["1"])
    assert isinstance(model[0], bnb.nn.Linear4bit) and type(model[1]) is Scaled


def test_quantize_bad_scheme_and_adapted_model():
    with pytest.raises(ValueError, match="unknown quantization scheme 'nf3': use one of nf4, fp4, int8"):
        dt.quantize(Net(width=WIDTH), "nf3")
    dm = dt.inject(Net(width=WIDTH), dt.LoRAConfig(r=2, targets=["up"]))
    with pytest.raises(ValueError, match="quantize the model before injecting"):
        dt.quantize(dm.model, "nf4")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_on_a_quantized_base(scheme):
    """At init the output is the quantized base's; gradients reach A and B only; the base is the bnb kernel."""
    net = quantized_net(scheme)
    base = net(X)
    before = {n: [t.clone() for t in packed(m)] for n, m in net.named_modules() if hasattr(m, "quant_state")
              or isinstance(m, bnb.nn.Linear8bitLt)}
    dm = dt.inject(net, dt.LoRAConfig(r=2, targets=["up", "down"]))
    assert torch.equal(dm(X), base)
    perturb(dm)
    dm(X).square().sum().backward()
    grads = {n for n, p in dm.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in dm.named_parameters() if p.requires_grad} and len(grads) == 8
    assert all("lora_" in n for n in grads)
    layer = dm.model.blocks[0].up
    assert layer.deltas["default"].lora_A.dtype == torch.float32
    # the unmerged forward is the bnb layer's own output plus s B A x
    d = layer.deltas["default"]
    h = torch.randn(5, WIDTH)
    assert_close(layer(h), layer.base_layer(h) + d.scale * h @ d.lora_A.t() @ d.lora_B.t())
    for path, tensors in before.items():  # training never touched the packed weights
        mod = dm.model.get_submodule(path)
        assert all(torch.equal(a, b) for a, b in zip(packed(getattr(mod, "base_layer", mod)), tensors))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_requantises_reports_the_rounding_and_unmerge_restores_the_bytes(scheme):
    dm = dt.inject(quantized_net(scheme), dt.LoRAConfig(r=2, targets=["up", "down"]))
    perturb(dm, std=0.3)
    unmerged = dm(X)
    layer = dm.model.blocks[0].up
    original = [t.clone() for t in packed(layer.base_layer)]
    expected = layer.matrix() + layer.deltas["default"].delta_weight(layer)  # the float merged weight
    with pytest.warns(UserWarning, match=r"merged into 4 quantized layers: requantising moved"):
        report = dm.merge()
    err = report["default"]["blocks.0.up"]
    got = layer.matrix()
    assert err.max_abs == pytest.approx((got - expected).abs().max().item(), rel=1e-6)
    assert err.relative == pytest.approx(err.max_abs / expected.abs().max().item(), rel=1e-6)
    assert 0 < err.max_abs and err.of_delta < 1  # rounded, yet most of the change kept
    assert torch.equal(got, requantized(expected, scheme))  # W0 + ΔW quantized as bitsandbytes does it
    h = torch.randn(5, WIDTH)
    assert_close(layer(h), h @ got.t() + layer.base_layer.bias)  # forward skips the merged adapter
    dm.unmerge()
    assert all(torch.equal(a, b) for a, b in zip(packed(layer.base_layer), original))
    assert torch.equal(dm(X), unmerged)
    assert layer.rounding == {}


def test_merge_twice_and_unmerge_the_first_restores_the_bytes_of_each_step():
    dm = dt.inject(quantized_net("nf4"), dt.LoRAConfig(r=2, targets=["up"]), name="a")
    dm.add_adapter("b", dt.LoRAConfig(r=2, targets=["up"]))
    perturb(dm, std=0.3)
    dm.set_active(["a", "b"])
    layer = dm.model.blocks[0].up
    original = [t.clone() for t in packed(layer.base_layer)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.merge(["a"])
        after_a = [t.clone() for t in packed(layer.base_layer)]
        dm.merge(["b"])
        layer.unmerge("b")  # back to a's merge exactly
        assert all(torch.equal(x, y) for x, y in zip(packed(layer.base_layer), after_a))
        dm.unmerge()
    assert all(torch.equal(x, y) for x, y in zip(packed(layer.base_layer), original))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_in_float_is_the_unmerged_model(scheme, dtype):
    """merge_and_unload(dtype=...) writes plain nn.Linear layers: dequantised W0 plus ΔW, no requantising."""
    dm = dt.inject(quantized_net(scheme), dt.LoRAConfig(r=2, targets=["up"]))
    perturb(dm, std=0.3)
    unmerged = dm(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is requantised, so nothing to warn about
        model = dm.merge_and_unload(dtype=dtype)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 4 and all(type(m) is nn.Linear and m.weight.dtype == dtype for m in layers)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert_close(model.to(torch.float32)(X), unmerged, rtol=tol)


def test_merge_and_unload_float_after_a_merge_unmerges_the_quantized_first():
    dm = dt.inject(quantized_net("nf4"), dt.LoRAConfig(r=2, targets=["up"]))
    perturb(dm, std=0.3)
    unmerged = dm(X)
    with pytest.warns(UserWarning):
        dm.merge()
    model = dm.merge_and_unload(dtype=torch.float32)
    assert_close(model(X), unmerged)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disabled_on_a_merged_quantized_model_is_the_base(scheme):
    dm = dt.inject(quantized_net(scheme), dt.LoRAConfig(r=2, targets=["up"]))
    base = dm(X)
    perturb(dm, std=0.3)
    with pytest.warns(UserWarning):
        dm.merge()
    merged = dm(X)
    with dm.disabled():
        assert torch.equal(dm(X), base)
    assert torch.equal(dm(X), merged)  # merged again to the same bytes


def test_safe_merge_sees_nan_through_the_dequantised_weight():
    dm = dt.inject(quantized_net("nf4"), dt.LoRAConfig(r=2, targets=["up"]))
    layer = dm.model.blocks[0].up
    original = [t.clone() for t in packed(layer.base_layer)]
    with torch.no_grad():
        layer.deltas["default"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="would put NaN/inf into its weight"):
        dm.merge(safe_merge=True)
    assert all(torch.equal(x, y) for x, y in zip(packed(layer.base_layer), original))


def test_save_and_load_on_the_same_quantized_base(tmp_path):
    dm = dt.inject(quantized_net("nf4"), dt.LoRAConfig(r=2, targets=["up", "down"]))
    perturb(dm)
    dm.save(tmp_path / "a")
    again = dt.load(quantized_net("nf4"), tmp_path / "a")
    assert torch.equal(again(X), dm(X))


def test_mixed_batch_rows_match_each_adapter_alone():
    dm = dt.inject(quantized_net("nf4"), dt.LoRAConfig(r=2, targets=["up", "down"]), name="a")
    dm.add_adapter("b", dt.LoRAConfig(r=4, targets=["up"]))
    perturb(dm)
    mixed = dm(X, adapter_names=["a", "b", dt.BASE, "a"])
    for row, name in enumerate(["a", "b", None, "a"]):
        if name is None:
            with dm.disabled():
                alone = dm(X)
        else:
            dm.set_active(name)
            alone = dm(X)
        assert_close(mixed[row], alone[row])


def test_quantize_equals_transformers_bitsandbytes_config(wide_llama):
    """quantize() on a loaded model and from_pretrained(quantization_config=...) give the same bytes, and the
    same outputs with a LoRA injected into either."""
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    src = copy.deepcopy(wide_llama)
    for scheme, cfg in [("nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
                        ("int8", dict(load_in_8bit=True))]:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            src.save_pretrained(d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                d, quantization_config=transformers.BitsAndBytesConfig(**cfg), device_map="cpu")
            own = dt.quantize(transformers.AutoModelForCausalLM.from_pretrained(d), scheme,
                              compute_dtype=torch.float32 if scheme == "nf4" else None)
        for (name, a), (_, b) in zip(hf.named_modules(), own.named_modules()):
            assert type(a) is type(b), name
            if isinstance(a, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                assert all(torch.equal(x, y) for x, y in zip(packed(a), packed(b))), name
        outs = []
        for model in (hf, own):
            torch.manual_seed(3)
            dm = dt.inject(model, dt.LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
            perturb(dm)
            outs.append(dm(ids).logits)
        assert torch.equal(outs[0], outs[1])


def _packed_of(dm) -> dict[str, list[torch.Tensor]]:
    return {p: [t.clone() for t in packed(layer.base_layer)] for p, layer in dm.layers() if layer.quantized}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_weight_delta_method_on_a_quantized_base(method, scheme):
    """Inject, forward/backward, merge (requantised: exactly bitsandbytes' quantization of the float merge) and
    unmerge (the packed bytes back) on a tiny NF4 / int8 model, for every registered weight-delta method."""
    case = CASES[method]
    net = quantized_net(scheme)
    base = net(X)
    config = dt.get_method(method).config(targets=["up", "down"], **case.options)
    dm = dt.inject(net, config)
    if case.at_base is not None:  # the method is the identity at init: the quantized base's own output
        assert_close(dm(X), base, rtol=1e-6, atol=1e-7)
    perturb(dm)
    unmerged = dm(X)
    (unmerged.square().sum() + dm.regularization_loss()).backward()
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and {n for n, p in dm.named_parameters() if p.grad is not None} == trainable
    assert all(".deltas." in n or n.startswith("shared.") for n in trainable)
    if not all(layer.deltas["default"].mergeable for _, layer in dm.layers()):
        return
    dm.eval()  # MonteCLoRA samples in training mode
    unmerged = dm(X)
    original = _packed_of(dm)
    reference = copy.deepcopy(dm).merge_and_unload(dtype=torch.float32)  # the method's merge on float W0
    with pytest.warns(UserWarning, match="quantized layers"):
        report = dm.merge()
    assert set(report["default"]) == {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"}
    for path, layer in dm.layers():
        assert torch.equal(layer.matrix(), requantized(reference.get_submodule(path).weight, scheme)), path
    dm.unmerge()
    assert all(torch.equal(a, b) for p, ts in _packed_of(dm).items() for a, b in zip(ts, original[p]))
    assert torch.equal(dm(X), unmerged)


TARGETS = ["q_proj", "v_proj", "down_proj"]


def _smollm2(scheme: str) -> nn.Module:
    """SmolLM2-135M quantized by transformers' BitsAndBytesConfig path, in eval mode."""
    transformers = pytest.importorskip("transformers")
    from deltatune import assets

    cfg = (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
           if scheme == "nf4" else dict(load_in_8bit=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        assets.smollm2_path(), quantization_config=transformers.BitsAndBytesConfig(**cfg), device_map="cpu").eval()
    for m in model.modules():  # PEFT's side too keeps bitsandbytes' packed format (no bf16 repack on AVX512-BF16)
        if isinstance(m, bnb.nn.Linear4bit):
            pin_4bit_format(m)
    return model


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_peft_qlora_adapter_loads_onto_deltatune_and_back(scheme, tmp_path):
    """PEFT 0.21's bitsandbytes LoRA layers on SmolLM2 and deltatune on the same quantized base: a PEFT adapter
    loads with PEFT's outputs, and deltatune's export loads back into PEFT on a bnb base with deltatune's."""
    peft = pytest.importorskip("peft")
    base = _smollm2(scheme)
    ours_base = copy.deepcopy(base)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                   init_lora_weights=False))  # B random: a "trained" adapter
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(ours_base, tmp_path / "peft")
    dm.eval()
    assert dm.model.model.layers[0].self_attn.q_proj.quantized
    with torch.no_grad():
        got = dm(input_ids=ids).logits
    assert_close(got, expected)
    perturb(dm, std=0.02)  # deltatune "trains" it further, then exports
    with torch.no_grad():
        ours = dm(input_ids=ids).logits
    dm.export_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(pm.unload(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(input_ids=ids).logits, ours)


def test_an_adapter_from_the_float_model_needs_check_base_off_on_its_quantized_copy(tmp_path):
    dm = dt.inject(Net(width=WIDTH), dt.LoRAConfig(r=2, targets=["up"]))
    perturb(dm)
    dm.save(tmp_path / "a")
    with pytest.raises(ValueError, match="saved for another base model.*quantized base"):
        dt.load(quantized_net("nf4"), tmp_path / "a")
    again = dt.load(quantized_net("nf4"), tmp_path / "a", check_base=False)
    layer = again.model.blocks[0].up
    assert torch.equal(layer.deltas["default"].lora_A, dm.model.blocks[0].up.deltas["default"].lora_A)


def test_pruning_and_laser_refuse_a_quantized_layer():
    from deltatune.compression.lowrank import laser
    from deltatune.compression.pruning import prune

    net = quantized_net("nf4")
    with pytest.raises(ValueError, match=r"cannot prune 'blocks.0.up': it is a quantized Linear4bit.*dequantize"):
        prune(net, "magnitude", 0.5, targets=["up"])
    with pytest.raises(ValueError, match=r"cannot reduce the rank of 'blocks.0.up': it is a quantized"):
        laser(net, "blocks.0.up", 0.5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_parameter_accounting_counts_weights_not_packed_bytes(scheme):
    float_dm = dt.inject(Net(width=WIDTH), dt.LoRAConfig(r=2, targets=["up"]))
    dm = dt.inject(quantized_net(scheme), dt.LoRAConfig(r=2, targets=["up"]))
    assert dm.total_parameters() == float_dm.total_parameters()
    assert dm.trainable_parameters() == float_dm.trainable_parameters() == 2 * 2 * (WIDTH + 2 * WIDTH)
    assert {r["base_shape"] for r in dm.parameter_table()} == {(2 * WIDTH, WIDTH)}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_quantized_base_trains_fp32_adapters(scheme):
    """A bf16 model quantized with compute_dtype=bf16: W0 dequantises to bf16, the adapters are fp32 (their
    gradients too), and the output stays bf16 and matches the fp32 arithmetic to bf16 rounding."""
    net = dt.quantize(Net(torch.bfloat16, width=WIDTH), scheme, compute_dtype=torch.bfloat16, skip=())
    dm = dt.inject(net, dt.LoRAConfig(r=2, targets=["up", "down"]))
    layer = dm.model.blocks[0].up
    d = layer.deltas["default"]
    assert layer.matrix().dtype == torch.bfloat16 and d.lora_A.dtype == torch.float32
    perturb(dm)
    h = torch.randn(5, WIDTH).to(torch.bfloat16)
    y = layer(h)
    assert y.dtype == torch.bfloat16
    expected = layer.base_layer(h).float() + d.scale * h.float() @ d.lora_A.t() @ d.lora_B.t()
    assert_close(y, expected, rtol=1e-2)
    dm(X.to(torch.bfloat16)).float().square().sum().backward()
    assert d.lora_A.grad.dtype == torch.float32 and d.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_releases_each_float_weight(scheme):
    """Nothing of the swapped layers' float weights is kept (so the model is never held twice)."""
    import gc
    import weakref

    net = Net(width=WIDTH)
    refs = [weakref.ref(m.weight) for m in net.modules() if isinstance(m, nn.Linear)]
    dt.quantize(net, scheme, skip=())
    gc.collect()
    assert len(refs) == 4 and all(r() is None for r in refs)
