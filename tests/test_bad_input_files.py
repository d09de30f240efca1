"""Bad input in files and arguments: every case fails in one line naming the file (or argument), the problem
and the fix, and leaves the model and the output folder as they were. Nothing here is ever unpickled."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_close, max_diff, perturb
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.engine import DeltaLayer
from deltatune.engine import io as dio
from deltatune.engine import peft_format as pio

NATIVE, PEFT = "native", "peft"
WEIGHTS = {NATIVE: dio.WEIGHTS_NAME, PEFT: pio.WEIGHTS_NAME}
CONFIG = {NATIVE: dio.CONFIG_NAME, PEFT: pio.CONFIG_NAME}


def no_deltas(model: nn.Module) -> bool:
    return not any(isinstance(m, DeltaLayer) for m in model.modules())


@pytest.fixture
def saved(tmp_path, make_synthetic) -> dict[str, Path]:
    """A trained-looking LoRA on lin and c1, saved in both formats."""
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, alpha=4, targets=["lin", "c1"]))
    perturb(dm)
    dm.save(tmp_path / NATIVE)
    dm.export_peft(tmp_path / PEFT)
    return {NATIVE: tmp_path / NATIVE, PEFT: tmp_path / PEFT}


def load(fmt: str, model: nn.Module, path: Path, **kwargs) -> dt.DeltaModel:
    return dt.load(model, path, **kwargs) if fmt == NATIVE else dt.load_peft(model, path, **kwargs)


def edit_config(fmt: str, path: Path, change: Callable[[dict], None], reseal: bool = False) -> None:
    cfg = path / CONFIG[fmt]
    meta = json.loads(cfg.read_text())
    change(meta)
    if reseal:  # a consistent rewrite, as a buggy tool would make: the checksums match the new files
        meta["weights_sha256"] = dio.sha256(path / WEIGHTS[fmt])
        meta["config_sha256"] = dio.config_sha256(meta)
    cfg.write_text(json.dumps(meta))


def edit_tensors(fmt: str, path: Path, change: Callable[[dict], dict]) -> None:
    """Rewrite the weights; for the native format also reseal both checksums, to reach the checks behind them."""
    save_file(change(load_file(str(path / WEIGHTS[fmt]))), str(path / WEIGHTS[fmt]))
    if fmt == NATIVE:
        edit_config(fmt, path, lambda m: None, reseal=True)


def first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


def truncate(fmt, path):
    data = (path / WEIGHTS[fmt]).read_bytes()
    (path / WEIGHTS[fmt]).write_bytes(data[: len(data) // 2])


def pickle_only(fmt, path):
    (path / WEIGHTS[fmt]).unlink()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04 not unpickled, ever")


def only_notes(fmt, path):
    for f in path.iterdir():
        f.unlink()
    (path / "notes.txt").write_text("mine")


def empty(fmt, path):
    for f in path.iterdir():
        f.unlink()


# (case, format, corruption, load kwargs, exception, message): each message names the file and the fix
CORRUPT = [
    ("truncated", NATIVE, truncate, {}, ValueError, r"adapter\.safetensors': checksum differs.*check_integrity=False"),
    ("truncated_unchecked", NATIVE, truncate, {"check_integrity": False}, ValueError,
     r"corrupt safetensors file '.*adapter\.safetensors'.*truncated or damaged; save the adapter again"),
    ("truncated", PEFT, truncate, {}, ValueError,
     r"corrupt safetensors file '.*adapter_model\.safetensors'.*truncated or damaged"),
    ("zero_bytes", NATIVE, lambda f, p: (p / WEIGHTS[f]).write_bytes(b""), {"check_integrity": False}, ValueError,
     r"corrupt safetensors file '.*adapter\.safetensors'"),
    ("zero_bytes", PEFT, lambda f, p: (p / WEIGHTS[f]).write_bytes(b""), {}, ValueError,
     r"corrupt safetensors file '.*adapter_model\.safetensors' \(.*header too small"),
    *[(f"invalid_json", fmt, lambda f, p: (p / CONFIG[f]).write_text((p / CONFIG[f]).read_text()[:-9]), {},
       ValueError, rf"'.*{CONFIG[fmt]}' is not valid JSON \(.*\): .*save the adapter again") for fmt in (NATIVE, PEFT)],
    *[(f"json_list", fmt, lambda f, p: (p / CONFIG[f]).write_text("[1, 2]"), {}, ValueError,
       rf"'.*{CONFIG[fmt]}' holds a JSON list, not an adapter config") for fmt in (NATIVE, PEFT)],
    ("unknown_key", NATIVE, lambda f, p: edit_config(f, p, lambda m: m.update(targetz=["lin"])), {}, ValueError,
     r"unknown key 'targetz' in '.*deltatune_config\.json'; did you mean 'targets'\?; remove or rename it"),
    ("missing_method", NATIVE, lambda f, p: edit_config(f, p, lambda m: m.pop("method")), {}, ValueError,
     r"deltatune_config\.json' lacks the key 'method'; save the adapter again"),
    ("missing_peft_type", PEFT, lambda f, p: edit_config(f, p, lambda m: m.pop("peft_type")), {}, ValueError,
     r"adapter_config\.json' lacks the key 'peft_type'"),
    ("misspelt_lora_alpha", PEFT, lambda f, p: edit_config(f, p, lambda m: m.update(lora_alph=m.pop("lora_alpha"))),
     {}, ValueError, r"adapter_config\.json' lacks the key 'lora_alpha' \(it has 'lora_alph': misspelt\?\)"),
    ("wrong_field_type", NATIVE, lambda f, p: edit_config(f, p, lambda m: m.update(targets="lin")), {}, ValueError,
     r"'targets' in '.*deltatune_config\.json' must be a JSON list, got 'lin'"),
    ("edited_alpha", NATIVE, lambda f, p: edit_config(f, p, lambda m: m["options"].update(alpha=99.0)), {},
     ValueError, r"deltatune_config\.json' was changed after saving.*pass check_integrity=False"),
    ("unknown_option", NATIVE, lambda f, p: edit_config(f, p, lambda m: m["options"].update(alhpa=1.0)),
     {"check_integrity": False}, ValueError,
     r"invalid options of the lora adapter '.*native': unknown option 'alhpa' for LoRAConfig; did you mean 'alpha'\?"),
    ("wrong_option_type", NATIVE, lambda f, p: edit_config(f, p, lambda m: m["options"].update(r="two")),
     {"check_integrity": False}, ValueError, r"invalid options of the lora adapter .*\(r\)"),
    *[("extra_tensor", fmt, lambda f, p: edit_tensors(f, p, lambda t: {**t, "lin.extra": torch.zeros(2)}), {},
       ValueError, msg) for fmt, msg in ((NATIVE, r"adapter\.safetensors' does not match its deltatune_config\.json: "
                                         r".*unexpected \['lin\.extra'\]; save the adapter again"),
                                        (PEFT, r"unexpected tensor 'lin\.extra' in PEFT adapter .*save the adapter"))],
    *[("missing_tensor", fmt, lambda f, p: edit_tensors(f, p, lambda t: {k: v for k, v in t.items()
                                                                          if k != first_key(t)}), {},
       ValueError, msg) for fmt, msg in ((NATIVE, r"does not match its deltatune_config\.json: .*missing \['c1\.lora_A'\]"),
                                        (PEFT, r"lacks tensor 'c1\.lora_A\.weight' or 'c1\.lora_embedding_A'; its "
                                               r"adapter_model\.safetensors is incomplete"))],
    *[("wrong_shape", fmt, lambda f, p: edit_tensors(f, p, lambda t: {k: v[:, :-1].contiguous() if k == first_key(t) else v
                                                                       for k, v in t.items()}), {},
       ValueError, rf"{WEIGHTS[fmt]}' does not (match|fit) its .*shape mismatch for 'c1\.lora_A'") for fmt in (NATIVE, PEFT)],
    *[("int64", fmt, lambda f, p: edit_tensors(f, p, lambda t: {k: (v * 100).long() for k, v in t.items()}), {},
       ValueError, r"'(lin|c1)\.lora_A' is torch\.int64 in the state but the adapter holds torch\.float32")
      for fmt in (NATIVE, PEFT)],
    *[("nan", fmt, lambda f, p: edit_tensors(f, p, lambda t: {k: v.index_fill(0, torch.tensor([0]), float("nan"))
                                                              for k, v in t.items()}), {},
       ValueError, rf"tensor '.*' in '.*{WEIGHTS[fmt]}' holds \d+ NaN/inf values.*retrain") for fmt in (NATIVE, PEFT)],
    ("inf_unchecked", NATIVE, lambda f, p: edit_tensors(f, p, lambda t: {k: v + float("inf") for k, v in t.items()}),
     {"check_integrity": False}, ValueError, r"NaN/inf values"),
    *[("pickle", fmt, pickle_only, {}, ValueError,
       rf"adapter_model\.bin' is a pickle, which deltatune never loads.*re-save it as safetensors.*{WEIGHTS[fmt]}")
      for fmt in (NATIVE, PEFT)],
    *[("weights_missing", fmt, lambda f, p: (p / WEIGHTS[f]).unlink(), {}, FileNotFoundError,
       rf"weights '.*{WEIGHTS[fmt]}' are missing; save the adapter") for fmt in (NATIVE, PEFT)],
    *[("no_adapter_files", fmt, only_notes, {}, FileNotFoundError,
       rf"{CONFIG[fmt]} is missing \(it holds notes\.txt\)") for fmt in (NATIVE, PEFT)],
    *[("empty_folder", fmt, empty, {}, FileNotFoundError, rf"{CONFIG[fmt]} is missing \(the folder is empty\)")
      for fmt in (NATIVE, PEFT)],
]


@pytest.mark.parametrize("case, fmt, corrupt, kwargs, error, message", CORRUPT,
                         ids=[f"{fmt}-{case}" for case, fmt, *_ in CORRUPT])
def test_a_broken_adapter_folder_fails_in_one_line(case, fmt, corrupt, kwargs, error, message, saved,
                                                   make_synthetic, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    corrupt(fmt, saved[fmt])
    model = make_synthetic()
    with pytest.raises(error, match=message) as info:
        load(fmt, model, saved[fmt], **kwargs)
    assert "\n" not in str(info.value)
    assert no_deltas(model)  # nothing was half-installed


@pytest.mark.parametrize("fmt", [NATIVE, PEFT])
def test_a_path_that_is_a_file_or_missing(fmt, saved, make_synthetic):
    with pytest.raises(NotADirectoryError, match=rf"'.*{WEIGHTS[fmt]}' is a file, not an adapter folder; pass the "
                                                 rf"folder holding {CONFIG[fmt]}"):
        load(fmt, make_synthetic(), saved[fmt] / WEIGHTS[fmt])
    with pytest.raises(FileNotFoundError, match=r"'.*nope': it does not exist; check the path"):
        load(fmt, make_synthetic(), saved[fmt].parent / "nope")


def test_a_folder_of_the_other_format_says_which_loader(saved, make_synthetic):
    with pytest.raises(FileNotFoundError, match="it holds a PEFT adapter: use load_peft"):
        dt.load(make_synthetic(), saved[PEFT])
    with pytest.raises(FileNotFoundError, match="it holds a deltatune adapter: use deltatune.load"):
        dt.load_peft(make_synthetic(), saved[NATIVE])


def test_check_integrity_false_accepts_a_hand_edited_config_knowingly(saved, make_synthetic):
    """The checksum covers the config: alpha edited by hand fails, and loads only when asked, with the new alpha."""
    w0 = make_synthetic().lin.weight.detach()
    original = dt.load(make_synthetic(), saved[NATIVE]).merge_and_unload().lin.weight.detach()
    edit_config(NATIVE, saved[NATIVE], lambda m: m["options"].update(alpha=8.0))  # scale alpha/r: 2 -> 4
    with pytest.raises(ValueError, match="changed after saving"):
        dt.load(make_synthetic(), saved[NATIVE])
    edited = dt.load(make_synthetic(), saved[NATIVE], check_integrity=False)
    assert edited.adapters["default"].config.alpha == 8.0
    assert_close(edited.merge_and_unload().lin.weight - w0, 2 * (original - w0))


def test_the_config_checksum_is_stored_and_reproducible(saved):
    meta = json.loads((saved[NATIVE] / dio.CONFIG_NAME).read_text())
    assert meta["config_sha256"] == dio.config_sha256(meta)
    assert meta["config_sha256"] != dio.config_sha256({**meta, "targets": meta["targets"][:1]})


def test_a_config_saved_before_the_config_checksum_still_loads(saved, make_synthetic, synthetic_input):
    with torch.no_grad():
        expected = dt.load(make_synthetic(), saved[NATIVE])(synthetic_input)
    edit_config(NATIVE, saved[NATIVE], lambda m: m.pop("config_sha256"))
    with torch.no_grad():
        assert max_diff(dt.load(make_synthetic(), saved[NATIVE])(synthetic_input), expected) == 0.0


def test_peft_configs_have_no_checksum_and_unknown_keys_are_ignored_as_peft_does(saved, make_synthetic,
                                                                                 synthetic_input):
    """Documented limit: a PEFT folder cannot be checked for hand edits; keys deltatune does not read (newer
    PEFT fields) are ignored, as PEFT ignores unknown keys, while a misspelt key it needs fails (see CORRUPT)."""
    with torch.no_grad():
        expected = dt.load_peft(make_synthetic(), saved[PEFT])(synthetic_input)
    edit_config(PEFT, saved[PEFT], lambda m: m.update(some_future_option=None))
    with torch.no_grad():
        assert max_diff(dt.load_peft(make_synthetic(), saved[PEFT])(synthetic_input), expected) == 0.0


def test_float64_weights_are_cast_to_the_adapter_dtype(saved, make_synthetic, synthetic_input):
    """A floating file of another precision is castable, so it loads (the check refuses kinds, not precisions)."""
    with torch.no_grad():
        expected = dt.load_peft(make_synthetic(), saved[PEFT])(synthetic_input)
    edit_tensors(PEFT, saved[PEFT], lambda t: {k: v.double() for k, v in t.items()})
    loaded = dt.load_peft(make_synthetic(), saved[PEFT])
    assert loaded.model.lin.deltas["default"].lora_A.dtype == torch.float32
    with torch.no_grad():
        assert_close(loaded(synthetic_input), expected)


def test_values_beyond_the_adapter_dtype_range_are_refused(saved, make_synthetic):
    edit_tensors(PEFT, saved[PEFT], lambda t: {k: v.double() * 1e300 for k, v in t.items()})  # inf in fp32
    with pytest.raises(ValueError, match=r"holds values up to .* beyond torch\.float32's range"):
        dt.load_peft(make_synthetic(), saved[PEFT])


def test_load_adapter_state_dict_refuses_integer_values(make_synthetic):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"]))
    state = {k: v.long() for k, v in dm.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=r"'lin\.lora_A' is torch\.int64 in the state but the adapter holds"):
        dm.load_adapter_state_dict(state)
