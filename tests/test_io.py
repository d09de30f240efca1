"""Saving and loading deltatune adapters: round trips, atomic files, and a clear error for every broken case."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close, max_diff, perturb
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.engine import DeltaLayer
from deltatune.engine import io as dio

FILES = sorted([dio.CONFIG_NAME, dio.WEIGHTS_NAME])

VARIANTS = {
    "lora": ("lora", {}),
    "rslora": ("lora", {"rslora": True, "alpha": 3.0}),
    "pissa": ("lora", {"init": "pissa"}),
    "pissa_niter_4": ("lora", {"init": "pissa_niter_4"}),
    "dora": ("dora", {}),
    "lora_only_bias": ("lora", {"bias": "lora_only", "dropout": 0.1}),
}


def no_deltas(model: nn.Module) -> bool:
    return not any(isinstance(m, DeltaLayer) for m in model.modules())


def _saved_synthetic(tmp_path, make_synthetic, variant="lora", heads=("head",)):
    method, options = VARIANTS[variant]
    targets = ["lin", "c1", "conv"] + (["emb"] if method == "lora" else [])
    dm = dt.inject(make_synthetic(), dt.make_config(method, r=2, targets=targets, **options),
                   train_modules=list(heads) or None)
    perturb(dm)
    dm.eval()  # the new delta modules start in training mode (see test_load_onto_an_eval_model_is_deterministic)
    dm.save(tmp_path / "adapter")
    return dm, tmp_path / "adapter"


@pytest.mark.parametrize("heads", [(), ("head",)], ids=["no_head", "head"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_synthetic(variant, heads, tmp_path, make_synthetic, synthetic_input):
    dm, path = _saved_synthetic(tmp_path, make_synthetic, variant, heads)
    with torch.no_grad():
        ours = dm(synthetic_input)
        assert max_diff(ours, make_synthetic()(synthetic_input)) > 1e-3
    assert sorted(p.name for p in path.iterdir()) == FILES  # nothing else, no temp files
    meta = json.loads((path / dio.CONFIG_NAME).read_text())
    assert meta["method"] == VARIANTS[variant][0] and meta["train_modules"] == list(heads)
    assert sorted(meta["targets"]) == sorted(dm.adapters["default"].paths)
    loaded = dt.load(make_synthetic(), path).eval()
    a = loaded.adapters["default"]
    assert a.config == dm.adapters["default"].config and a.train_modules == list(heads)
    assert loaded.trainable_parameters() == dm.trainable_parameters()
    with torch.no_grad():
        assert_close(loaded(synthetic_input), ours, rtol=1e-5, atol=1e-6)
    sd, loaded_sd = dm.adapter_state_dict(), loaded.adapter_state_dict()
    assert sd.keys() == loaded_sd.keys() and all(torch.equal(sd[k], loaded_sd[k]) for k in sd)
    if variant.startswith("pissa"):  # the residual is re-derived on the fresh base
        assert_close(loaded.model.lin.weight, dm.model.lin.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,heads", [("lora", ["classifier"]), ("dora", None), ("pissa_niter_4", None)])
def test_round_trip_minilm(variant, heads, tmp_path, make_minilm, minilm_batch):
    method, options = VARIANTS[variant]
    dm = dt.inject(make_minilm(), dt.make_config(method, r=4, targets=["query", "value"], **options),
                   train_modules=heads)
    perturb(dm, 0.02)
    dm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    loaded = dt.load(make_minilm(), tmp_path)
    with torch.no_grad():
        assert_close(loaded(**minilm_batch).logits, dm(**minilm_batch).logits, rtol=1e-5, atol=1e-6)


def test_overwrite_and_failed_save_leave_no_temp_files(tmp_path, make_synthetic, monkeypatch):
    dm, path = _saved_synthetic(tmp_path, make_synthetic)
    first = (path / dio.CONFIG_NAME).read_text()
    perturb(dm, seed=5)
    dm.save(path)  # overwrite in place
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert json.loads((path / dio.CONFIG_NAME).read_text())["weights_sha256"] != json.loads(first)["weights_sha256"]
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        dm.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # old save intact, no temp file


def test_load_onto_a_changed_base_names_the_layer(tmp_path, make_minilm):
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=4, targets=["query", "value"]))
    dm.save(tmp_path)
    model = make_minilm()
    with torch.no_grad():
        model.bert.encoder.layer[3].attention.self.value.weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"another base model.*'bert\.encoder\.layer\.3\.attention\.self\.value'"):
        dt.load(model, tmp_path)
    assert no_deltas(model)
    dm2 = dt.load(model, tmp_path, check_base=False)  # the user may insist
    assert len(dm2.adapters["default"].paths) == 12
    # an fp32 -> bf16 copy of the right base is still the right base
    dt.load(make_minilm().to(torch.bfloat16), tmp_path)


def test_load_onto_another_architecture(tmp_path, make_minilm, tiny_llama, make_synthetic):
    dm = dt.inject(make_minilm(), dt.LoRAConfig(r=4, targets=["query", "value"]), train_modules=["classifier"])
    dm.save(tmp_path)
    with pytest.raises(ValueError, match=r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query'.*lacks"):
        dt.load(tiny_llama, tmp_path)
    assert no_deltas(tiny_llama)
    _, path = _saved_synthetic(tmp_path, make_synthetic)
    with pytest.raises(ValueError, match="lacks"):
        dt.load(make_minilm(), path)


def test_corrupt_or_truncated_weights(tmp_path, make_synthetic):
    _, path = _saved_synthetic(tmp_path, make_synthetic)
    weights = path / dio.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        dt.load(make_synthetic(), path)
    # a damaged file whose checksum was also rewritten is still caught, by the reader
    weights.write_bytes(b"\xff" * 64)
    meta = json.loads((path / dio.CONFIG_NAME).read_text())
    meta["weights_sha256"] = dio.sha256(weights)
    meta["config_sha256"] = dio.config_sha256(meta)
    (path / dio.CONFIG_NAME).write_text(json.dumps(meta))
    model = make_synthetic()
    with pytest.raises(ValueError, match="corrupt"):
        dt.load(model, path)
    assert no_deltas(model)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        dt.load(make_synthetic(), path)


def test_missing_or_foreign_config(tmp_path, make_synthetic):
    with pytest.raises(FileNotFoundError, match="deltatune_config.json is missing"):
        dt.load(make_synthetic(), tmp_path)
    (tmp_path / dio.CONFIG_NAME).write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="not a deltatune.adapter/1"):
        dt.load(make_synthetic(), tmp_path)


def test_peft_directory_hints_at_load_peft(tmp_path, make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"]))
    dm.export_peft(tmp_path)
    with pytest.raises(FileNotFoundError, match="PEFT adapter.*load_peft"):
        dt.load(make_synthetic(), tmp_path)
    dt.load_peft(make_synthetic(), tmp_path)  # and the hint is right


def test_load_a_second_adapter_under_another_name(tmp_path, make_synthetic, synthetic_input):
    first, path = _saved_synthetic(tmp_path, make_synthetic)
    with torch.no_grad():
        first_out = first(synthetic_input)
    other = dt.inject(make_synthetic(), dt.DoRAConfig(r=2, targets=["lin", "conv"]), name="other")
    perturb(other, seed=9)
    with torch.no_grad():
        other_out = other(synthetic_input)
    other.load_adapter(path, name="second")
    assert set(other.adapters) == {"other", "second"} and other.active == ("other",)
    assert not any(p.requires_grad for p in other.model.lin.deltas["second"].parameters())
    with pytest.raises(ValueError, match="'second' exists already"):
        other.load_adapter(path, name="second")
    with torch.no_grad():
        assert max_diff(other(synthetic_input), other_out) == 0
        other.set_active("second")
        assert_close(other(synthetic_input), first_out, rtol=1e-5, atol=1e-6)
    other.save(tmp_path / "again", name="second")  # re-saved under its new name
    assert json.loads((tmp_path / "again" / dio.CONFIG_NAME).read_text())["name"] == "second"


def test_load_adapter_state_dict_checks_keys_and_shapes(tmp_path, make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin", "conv"]))
    state = {k: v.clone() for k, v in dm.adapter_state_dict().items()}
    assert set(state) == {"lin.lora_A", "lin.lora_B", "conv.lora_A", "conv.lora_B"}
    bad = {**state, "conv.lora_A": torch.zeros(3, 72)}
    with pytest.raises(ValueError, match=r"shape mismatch for 'conv\.lora_A'.*\(2, 72\).*\(3, 72\)"):
        dm.load_adapter_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "lin.lora_B"}
    with pytest.raises(ValueError, match=r"missing \['lin\.lora_B'\]"):
        dm.load_adapter_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected \['head\.weight'\]"):
        dm.load_adapter_state_dict({**state, "head.weight": torch.zeros(2, 4)})


def test_a_file_with_wrong_shapes_fails_and_leaves_nothing_behind(tmp_path, make_synthetic):
    _, path = _saved_synthetic(tmp_path, make_synthetic, heads=())
    weights = path / dio.WEIGHTS_NAME
    tensors = load_file(str(weights))
    tensors["lin.lora_B"] = torch.zeros(8, 3)
    save_file(tensors, str(weights))
    meta = json.loads((path / dio.CONFIG_NAME).read_text())
    meta["weights_sha256"] = dio.sha256(weights)
    meta["config_sha256"] = dio.config_sha256(meta)
    (path / dio.CONFIG_NAME).write_text(json.dumps(meta))
    model = make_synthetic()
    with pytest.raises(ValueError, match=r"'lin\.lora_B'"):
        dt.load(model, path)
    assert no_deltas(model)


def test_adapter_added_after_pissa_loads_onto_the_base(tmp_path, make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"], init="pissa"), name="p")
    dm.add_adapter("l", dt.LoRAConfig(r=2, targets=["lin"]))
    dm.save(tmp_path, name="l")
    dt.load(make_synthetic(), tmp_path)


@pytest.mark.parametrize("state", ["pissa_attached", "other_merged"])
def test_load_onto_a_model_whose_base_weight_is_modified_by_another_adapter(state, tmp_path, make_synthetic):
    _, path = _saved_synthetic(tmp_path, make_synthetic, heads=())
    if state == "pissa_attached":  # PiSSA leaves the base weight alone, so the base is still recognised
        dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"], init="pissa"), name="p")
        dm.load_adapter(path, name="second")
        return
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"]), name="p")
    perturb(dm)
    dm.merge()  # a merged base is not the saved base: a clear error, not a wrong load
    with pytest.raises(ValueError, match="merged adapters.*unmerge"):
        dm.load_adapter(path, name="second")
    dm.unmerge()
    dm.load_adapter(path, name="second")


def test_load_onto_an_eval_model_is_deterministic(tmp_path, make_synthetic, synthetic_input):
    _, path = _saved_synthetic(tmp_path, make_synthetic, "lora_only_bias", heads=())  # dropout=0.1
    model = make_synthetic()
    assert not model.training
    loaded = dt.load(model, path)
    with torch.no_grad():
        assert max_diff(loaded(synthetic_input), loaded(synthetic_input)) == 0
