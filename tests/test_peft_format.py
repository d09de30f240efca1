"""PEFT's checkpoint format, checked against the real `peft` package in both directions."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import assert_close, max_diff, perturb

import deltatune as dt
from deltatune.engine import DeltaLayer

peft = pytest.importorskip("peft")

R = 4


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*groups > 1. Merging is not supported.*")
        warnings.filterwarnings("ignore", message=".*have invalid shape.*")  # PEFT's own lora_bias=True save
        yield


# (method, options, train_modules) per case
MINILM_CASES = {
    "lora": ("lora", {}, None),
    "rslora": ("lora", {"rslora": True}, None),
    "dora": ("dora", {}, None),
    "pissa": ("lora", {"init": "pissa_niter_4"}, None),
    "lora_only_bias": ("lora", {"bias": "lora_only"}, None),
    "train_modules": ("lora", {}, ["classifier"]),
    "dora_bias_head": ("dora", {"bias": "lora_only", "rslora": True}, ["classifier"]),
}
SYNTH_CASES = {
    "lora": ("lora", {"bias": "lora_only"}, ["head"]),
    "rslora": ("lora", {"rslora": True}, None),
    "dora": ("dora", {"bias": "lora_only"}, ["head"]),
    "pissa": ("lora", {"init": "pissa"}, ["head"]),
    "dora_pissa": ("dora", {"init": "pissa"}, None),
}


def _minilm_setup(make_minilm, minilm_batch):
    def run(m):
        with torch.no_grad():
            return m(**minilm_batch).logits
    return make_minilm, ["query", "value"], run, 0.02


def _synth_setup(make_synthetic, synthetic_input, method):
    def run(m):
        with torch.no_grad():
            return m(synthetic_input)
    targets = ["lin", "c1", "conv"] + (["emb"] if method == "lora" else [])
    return make_synthetic, targets, run, 0.1


def _export_then_peft_loads(tmp_path, make, targets, run, std, method, options, heads):
    base_out = run(make())
    dm = dt.inject(make(), dt.make_config(method, r=R, alpha=2 * R, targets=targets, **options), train_modules=heads)
    perturb(dm, std)
    ours = run(dm)
    assert max_diff(ours, base_out) > 1e-3  # a real delta: a key PEFT failed to load would show
    dm.export_peft(tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "peft")
    assert_close(run(pm), ours)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == (2 * R if options.get("init", "").startswith("pissa") else R)
    assert cfg["use_dora"] == (method == "dora") and cfg["use_rslora"] == options.get("rslora", False)
    return dm, pm


@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_export_loads_in_peft_minilm(case, tmp_path, make_minilm, minilm_batch):
    method, options, heads = MINILM_CASES[case]
    _export_then_peft_loads(tmp_path, *_minilm_setup(make_minilm, minilm_batch), method, options, heads)


@pytest.mark.parametrize("case", list(SYNTH_CASES))
def test_export_loads_in_peft_synthetic(case, tmp_path, make_synthetic, synthetic_input):
    method, options, heads = SYNTH_CASES[case]
    _, pm = _export_then_peft_loads(tmp_path, *_synth_setup(make_synthetic, synthetic_input, method),
                                    method, options, heads)
    assert pm.base_model.model.c1.fan_in_fan_out  # GPT-2's Conv1D is (d_in, d_out)


def test_exported_config_parses_with_peft(tmp_path, make_minilm):
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=R, alpha=12, dropout=0.1, targets=["query", "value"]),
                   train_modules=["classifier"])
    dm.export_peft(tmp_path)
    cfg = peft.LoraConfig.from_pretrained(tmp_path)
    assert cfg.peft_type == peft.PeftType.LORA
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (R, 12, 0.1, False)
    assert sorted(cfg.target_modules) == sorted(dm.adapters["default"].paths)
    assert list(cfg.modules_to_save) == ["classifier"]


# --- PEFT-saved adapters load in deltatune ----------------------------------------------------------


@pytest.mark.parametrize("use_dora,options", [(False, {}), (True, {}), (False, {"use_rslora": True}),
                                              (False, {"bias": "lora_only"}), (True, {"bias": "lora_only"})],
                         ids=["lora", "dora", "rslora", "lora_only", "dora_lora_only"])
def test_peft_saved_minilm_seq_cls_loads(use_dora, options, tmp_path, make_minilm, minilm_batch):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=2 * R, target_modules=["query", "value"],
                          use_dora=use_dora, **options)
    pm = peft.get_peft_model(make_minilm(), cfg)
    assert "classifier" in pm.peft_config["default"].modules_to_save  # PEFT adds the head itself
    perturb(pm, 0.02)
    pm.eval()
    with torch.no_grad():
        theirs = pm(**minilm_batch).logits
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(make_minilm(), tmp_path)
    adapter = dm.adapters["default"]
    assert adapter.method == ("dora" if use_dora else "lora") and adapter.train_modules == ["classifier"]
    assert len(adapter.paths) == 12
    with torch.no_grad():
        assert_close(dm(**minilm_batch).logits, theirs)
    # and back: our export of what we loaded is what PEFT saved
    dm.export_peft(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "again")
    with torch.no_grad():
        assert_close(again(**minilm_batch).logits, theirs)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_saved_synthetic_loads(use_dora, tmp_path, make_synthetic, synthetic_input):
    targets = ["lin", "c1", "conv"] + ([] if use_dora else ["emb"])
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, modules_to_save=["head"], use_dora=use_dora,
                          fan_in_fan_out=True)
    pm = peft.get_peft_model(make_synthetic(), cfg)
    perturb(pm, 0.1)
    with torch.no_grad():
        theirs = pm(synthetic_input)
        assert max_diff(theirs, make_synthetic()(synthetic_input)) > 1e-3
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(make_synthetic(), tmp_path)
    assert sorted(dm.adapters["default"].paths) == sorted(targets)
    with torch.no_grad():
        assert_close(dm(synthetic_input), theirs)
    dm.merge()  # and what was loaded merges exactly
    with torch.no_grad():
        assert_close(dm(synthetic_input), theirs)


def test_load_peft_as_second_adapter(tmp_path, make_synthetic, synthetic_input):
    pm = peft.get_peft_model(make_synthetic(), peft.LoraConfig(r=2, target_modules=["lin"]))
    perturb(pm, 0.1)
    with torch.no_grad():
        theirs = pm(synthetic_input)
    pm.save_pretrained(tmp_path)
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin", "conv"]), name="mine")
    dm.load_peft(tmp_path, name="theirs")
    assert dm.active == ("mine",)
    dm.set_active("theirs")
    with torch.no_grad():
        assert_close(dm(synthetic_input), theirs)


# --- what is not supported fails clearly ------------------------------------------------------------


def test_unsupported_peft_type(tmp_path, make_synthetic):
    pm = peft.get_peft_model(make_synthetic(), peft.FourierFTConfig(target_modules=["lin"], n_frequency=4))
    pm.save_pretrained(tmp_path)
    model = make_synthetic()
    with pytest.raises(ValueError, match="'FOURIERFT'.*not supported; deltatune imports .*IA3.*LORA"):
        dt.load_peft(model, tmp_path)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_rank_pattern_and_alpha_pattern_import_and_export(tmp_path, make_synthetic, synthetic_input):
    """PEFT's per-layer ranks and alphas load with PEFT's outputs and export back to a file PEFT loads equally."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "c1", "conv"], rank_pattern={"lin": 4, "conv": 3},
                             alpha_pattern={"c1": 3.0, "conv": 1.5})
    pm = peft.get_peft_model(make_synthetic(), config)
    perturb(pm, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(synthetic_input)
    dm = dt.load_peft(make_synthetic(), tmp_path / "peft")
    deltas = {p: dm.model.get_submodule(p).deltas["default"] for p in ("lin", "c1", "conv")}
    assert {p: (d.lora_A.shape[0], d.scale) for p, d in deltas.items()} == \
        {"lin": (4, 4 / 4), "c1": (2, 3.0 / 2), "conv": (3, 1.5 / 3)}
    with torch.no_grad():
        assert_close(dm(synthetic_input), expected)
        dm.export_peft(tmp_path / "back")
        assert_close(peft.PeftModel.from_pretrained(make_synthetic(), tmp_path / "back")(synthetic_input), expected)
    dora = peft.get_peft_model(make_synthetic(), peft.LoraConfig(r=2, target_modules=["lin"], use_dora=True,
                                                                 rank_pattern={"lin": 4}))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA adapter .* per-layer rank_pattern, which deltatune imports for LoRA only"):
        dt.load_peft(make_synthetic(), tmp_path / "dora")


def test_other_unsupported_peft_adapters(tmp_path, make_synthetic):
    pm = peft.get_peft_model(make_synthetic(), peft.LoraConfig(r=2, target_modules=["lin"], bias="all"))
    pm.save_pretrained(tmp_path / "bias_all")
    with pytest.raises(ValueError, match="bias='all'"):
        dt.load_peft(make_synthetic(), tmp_path / "bias_all")
    pm = peft.get_peft_model(make_synthetic(), peft.LoraConfig(r=2, target_modules=["lin"], lora_bias=True,
                                                                bias="lora_only"))
    pm.save_pretrained(tmp_path / "both_biases")
    with pytest.raises(ValueError, match="trains both lora_bias and bias='lora_only'"):
        dt.load_peft(make_synthetic(), tmp_path / "both_biases")
    with pytest.raises(FileNotFoundError, match="nowhere': it does not exist"):
        dt.load_peft(make_synthetic(), tmp_path / "nowhere")


@pytest.mark.parametrize("bias", [
    "none",
    "lora_only",
])
def test_peft_adapter_for_another_model(bias, tmp_path, make_minilm, make_synthetic):
    pm = peft.get_peft_model(make_synthetic(), peft.LoraConfig(r=2, target_modules=["lin"], bias=bias))
    pm.save_pretrained(tmp_path)
    model = make_minilm()
    with pytest.raises(ValueError, match="layer 'lin', which this model .* lacks"):
        dt.load_peft(model, tmp_path)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_export_of_a_non_lora_adapter_is_refused(tmp_path, make_synthetic):
    dm = dt.inject(make_synthetic(), dt.FullConfig(targets=["head"]))
    with pytest.raises(ValueError, match="is full, which PEFT does not have; PEFT export covers .*dora, .*lora.*Save it with DeltaModel.save"):
        dm.export_peft(tmp_path)
    assert not tmp_path.joinpath("adapter_config.json").exists()


# --- grouped convolutions, DoRA on embeddings: parity with PEFT ---------------------------------------------


class GroupedNet(torch.nn.Module):
    """An embedding, a grouped conv (groups=2) and a head: the layers PEFT adapts beyond the stock cases."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)[..., None].expand(-1, -1, -1, 3).contiguous()  # (B, 8, T, 3)
        return self.head(torch.tanh(self.conv(h)).mean((2, 3)))


GX = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(2))


def _out(m):
    with torch.no_grad():
        return m(GX)


def test_grouped_conv_lora_parity_with_peft(tmp_path):
    base = _out(GroupedNet())
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = peft.get_peft_model(GroupedNet(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["conv"],
                                                               init_lora_weights=False))  # random B: a real delta
    theirs = _out(pm)
    assert max_diff(theirs, base) > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(GroupedNet(), tmp_path / "peft")
    delta = dm.model.conv.deltas["default"]
    assert delta.lora_A.shape == (4, 8 * 9) and delta.lora_B.shape == (6, 2)  # PEFT's shapes, flattened
    assert_close(_out(dm), theirs)
    # neither merges: the update spans all input channels, the grouped weight cannot hold it
    with pytest.raises(NotImplementedError):
        pm.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        dm.merge()
    dm.export_peft(tmp_path / "again")  # and back
    again = peft.PeftModel.from_pretrained(GroupedNet(), tmp_path / "again")
    assert_close(_out(again), theirs)
    # a deltatune-made adapter loads in PEFT too
    ours = dt.inject(GroupedNet(), dt.LoRAConfig(r=2, alpha=3, targets=["conv"]))
    perturb(ours, 0.2)
    ours.export_peft(tmp_path / "ours")
    assert_close(_out(peft.PeftModel.from_pretrained(GroupedNet(), tmp_path / "ours")), _out(ours))


@pytest.mark.parametrize("r", [3, 12])  # 12 > min(8, 10): PEFT allows it with a warning, so does deltatune
def test_dora_embedding_parity_with_peft(r, tmp_path):
    pm = peft.get_peft_model(GroupedNet(), peft.LoraConfig(r=r, lora_alpha=6, target_modules=["emb"], use_dora=True))
    perturb(pm, 0.2)  # B and the magnitude move
    theirs = _out(pm)
    assert max_diff(theirs, _out(GroupedNet())) > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if r > 8 else "error")
        dm = dt.load_peft(GroupedNet(), tmp_path / "peft")
    assert dm.adapters["default"].method == "dora"
    assert_close(_out(dm), theirs)
    dm.export_peft(tmp_path / "again")
    assert_close(_out(peft.PeftModel.from_pretrained(GroupedNet(), tmp_path / "again")), theirs)
    merged_theirs = pm.merge_and_unload().emb.weight.detach()
    dm.merge()
    assert_close(dm.model.emb.weight, merged_theirs)
    assert_close(_out(dm), theirs)


# --- PEFT's lora_bias=True (a trained bias on lora_B) -------------------------------------------------------


def test_peft_lora_bias_imports_and_round_trips(tmp_path, make_synthetic, synthetic_input):
    targets = ["lin", "c1", "conv"]
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, lora_bias=True, fan_in_fan_out=True)
    pm = peft.get_peft_model(make_synthetic(), cfg)
    perturb(pm, 0.1)  # lora_B's weight and bias move
    assert pm.base_model.model.lin.lora_B["default"].bias.abs().min() > 0
    theirs = pm(synthetic_input).detach()
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(make_synthetic(), tmp_path / "peft")
    assert dm.adapters["default"].config.bias == "lora_only"
    b = pm.base_model.model.lin.lora_B["default"].bias
    assert_close(dm.model.lin.deltas["default"].lora_bias, 3.0 * b)  # s·b, s = 6 / 2
    assert_close(dm(synthetic_input), theirs)
    dm.export_peft(tmp_path / "again")  # back to PEFT (as its bias='lora_only' form: the same function)
    again = peft.PeftModel.from_pretrained(make_synthetic(), tmp_path / "again")
    assert_close(again(synthetic_input), theirs)
    assert_close(dt.load_peft(make_synthetic(), tmp_path / "again")(synthetic_input), theirs)
    merged = pm.merge_and_unload()  # and both merge to the same weights and biases
    dm.merge()
    for p in targets:
        for t in ("weight", "bias"):
            assert_close(getattr(dm.model.get_submodule(p), t), getattr(merged.get_submodule(p), t), msg=f"{p}.{t}")


def test_peft_lora_bias_on_a_layer_without_bias_fails_clearly(tmp_path, make_synthetic):
    model = make_synthetic()
    model.lin.bias = None
    with pytest.warns(Warning, match="has no bias"):
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lin"], lora_bias=True))
    pm.save_pretrained(tmp_path)
    bare = make_synthetic()
    bare.lin.bias = None
    with pytest.raises(ValueError, match="lora_bias on 'lin', which has no bias of its own"):
        dt.load_peft(bare, tmp_path)
