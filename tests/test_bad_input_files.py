"""Bad input in files and arguments: every case fails in one line naming the file (or argument), the problem
and the fix, and leaves the model and the output folder as they were. Nothing here is ever unpickled."""

from __future__ import annotations

import json
import re
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


def only_pickle(name):
    def corrupt(fmt, path):
        empty(fmt, path)
        (path / name).write_bytes(b"\x80\x04 not unpickled, ever")
    return corrupt


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
    *[("invalid_json", fmt, lambda f, p: (p / CONFIG[f]).write_text((p / CONFIG[f]).read_text()[:-9]), {},
       ValueError, rf"'.*{CONFIG[fmt]}' is not valid JSON \(.*\): .*save the adapter again") for fmt in (NATIVE, PEFT)],
    *[("json_list", fmt, lambda f, p: (p / CONFIG[f]).write_text("[1, 2]"), {}, ValueError,
       rf"'.*{CONFIG[fmt]}' holds a JSON list, not an adapter config") for fmt in (NATIVE, PEFT)],
    ("unknown_key", NATIVE, lambda f, p: edit_config(f, p, lambda m: m.update(targetz=["lin"])), {}, ValueError,
     r"unknown key 'targetz' in '.*deltatune_config\.json' \(did you mean 'targets'\?\); remove or rename it"),
    ("missing_method", NATIVE, lambda f, p: edit_config(f, p, lambda m: m.pop("method")), {}, ValueError,
     r"deltatune_config\.json' lacks the key 'method'; save the adapter again"),
    ("missing_peft_type", PEFT, lambda f, p: edit_config(f, p, lambda m: m.pop("peft_type")), {}, ValueError,
     r"adapter_config\.json' has no 'peft_type', so it is no PEFT adapter config; save the adapter from PEFT"),
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
                                         r".*state does not fit: unexpected \['lin\.extra'\]; save the adapter again"),
                                        (PEFT, r"unexpected tensor 'lin\.extra' in PEFT adapter .*damaged file\); save the adapter"))],
    *[("missing_tensor", fmt, lambda f, p: edit_tensors(f, p, lambda t: {k: v for k, v in t.items()
                                                                          if k != first_key(t)}), {},
       ValueError, msg) for fmt, msg in ((NATIVE, r"does not match its deltatune_config\.json: .*fit: missing \['c1\.lora_A'\]; save"),
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
    ("only_adapter_model_bin", PEFT, only_pickle("adapter_model.bin"), {}, ValueError,
     r"adapter_model\.bin' is a pickle, which deltatune never loads"),
    ("model_pickle_not_an_adapter", PEFT, only_pickle("pytorch_model.bin"), {}, FileNotFoundError,
     r"adapter_config\.json is missing \(it holds pytorch_model\.bin\)"),
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


# --- merging adapters ------------------------------------------------------------------------
MERGE_INPUTS = [
    ("truncated", PEFT, truncate, ValueError, r"corrupt safetensors file '.*adapter_model\.safetensors'"),
    ("edited", NATIVE, lambda f, p: edit_config(f, p, lambda m: m["options"].update(alpha=99.0)), ValueError,
     r"deltatune_config\.json' was changed after saving"),
    ("pickle", PEFT, pickle_only, ValueError, r"adapter_model\.bin' is a pickle, which deltatune never loads"),
    ("nan", NATIVE, CORRUPT[[c[:2] for c in CORRUPT].index(("nan", NATIVE))][2], ValueError, r"NaN/inf values"),
    ("int64", PEFT, CORRUPT[[c[:2] for c in CORRUPT].index(("int64", PEFT))][2], ValueError,
     r"layer 'c1', holds tensors that are not floating point: lora_A \(torch\.int64\), lora_B \(torch\.int64\); "
     r"the file is damaged"),
    ("no_adapter_files", NATIVE, only_notes, FileNotFoundError,
     r"no adapter at '.*': expected deltatune_config\.json \(deltatune\) or adapter_config\.json \(PEFT\)"),
]


@pytest.mark.parametrize("case, fmt, corrupt, error, message", MERGE_INPUTS, ids=[f"{f}-{c}" for c, f, *_ in MERGE_INPUTS])
def test_merge_adapters_refuses_a_broken_input_and_writes_nothing(case, fmt, corrupt, error, message, saved, tmp_path):
    from deltatune.merging import merge_adapters

    good = saved[NATIVE if fmt == PEFT else PEFT]
    corrupt(fmt, saved[fmt])
    with pytest.raises(error, match=message):
        merge_adapters([good, saved[fmt]], [0.5, 0.5], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["file", "missing"])
def test_merge_adapters_names_a_path_that_is_a_file_or_missing(target, saved, tmp_path):
    from deltatune.merging import merge_adapters

    bad = saved[NATIVE] / dio.WEIGHTS_NAME if target == "file" else tmp_path / "nope"
    why = "it is a file; pass the adapter folder" if target == "file" else "it does not exist; check the path"
    with pytest.raises(FileNotFoundError, match=f"no adapter at '.*': {why}"):
        merge_adapters([saved[NATIVE], bad], [0.5, 0.5], out=tmp_path / "out")


def _lora_on(model: nn.Module, path: Path, fmt: str, seed: int = 0) -> Path:
    dm = dt.inject(model, dt.LoRAConfig(r=2, targets=["lin", "c1"]))
    perturb(dm, seed=seed)
    dm.save(path) if fmt == NATIVE else dm.export_peft(path)
    return path


def _two_bases(saved):
    shutil.copytree(saved[PEFT], saved[PEFT].parent / "peft2")
    for path, name in ((saved[PEFT], "org/model-a"), (saved[PEFT].parent / "peft2", "org/model-b")):
        edit_config(PEFT, path, lambda m, name=name: m.update(base_model_name_or_path=name))
    return [saved[PEFT], saved[PEFT].parent / "peft2"]


def test_merge_adapters_refuses_adapters_of_different_base_models(saved, tmp_path):
    """Native adapters carry fingerprints, PEFT ones a base name and shapes: each mismatch names both folders."""
    from conftest import Synthetic

    from deltatune.merging import merge_adapters

    torch.manual_seed(7)  # same architecture, other weights
    other = _lora_on(Synthetic().eval(), tmp_path / "other", NATIVE)
    with pytest.raises(ValueError, match=r"adapters '.*native' and '.*other' were trained on different base models "
                                         r"\(layer '(lin|c1)' differs\)"):
        merge_adapters([saved[NATIVE], other], [0.5, 0.5], out=tmp_path / "out")
    wide = _lora_on(Synthetic(dim=12).eval(), tmp_path / "wide", PEFT)  # other shapes
    with pytest.raises(ValueError, match=r"layer 'c1' differs across the adapters \('.*peft': 8x8 linear, '.*wide': "
                                         r"12x12 linear\): they were trained on different base models"):
        merge_adapters([saved[PEFT], wide], [0.5, 0.5], out=tmp_path / "out")
    _two_bases(saved)
    with pytest.raises(ValueError, match=r"adapters '.*peft' \(base 'org/model-a'\) and '.*peft2' \(base "
                                         r"'org/model-b'\) were trained on different base models.*save it again"):
        merge_adapters([saved[PEFT], saved[PEFT].parent / "peft2"], [0.5, 0.5], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a hub id and a local copy of it are one base
    edit_config(PEFT, saved[PEFT].parent / "peft2", lambda m: m.update(base_model_name_or_path="/models/model-a"))
    merge_adapters([saved[PEFT], saved[PEFT].parent / "peft2"], [0.5, 0.5], out=tmp_path / "out")


@pytest.mark.parametrize("adapters, weights, kwargs, message", [
    ("one_str", [1.0], {}, "adapters and weights are lists"),
    ([NATIVE], 1.0, {}, "adapters and weights are lists"),
    ([NATIVE, PEFT], [1.0], {}, "need one weight per adapter, got 1 weights for 2 adapters"),
    ([], [], {}, "need one weight per adapter"),
    ([NATIVE], [float("nan")], {}, r"weights must be finite numbers, got \[nan\]"),
    ([NATIVE], ["half"], {}, r"weights must be finite numbers, got \['half'\]"),
    ([NATIVE], [1.0], {"method": "tie"}, "unknown merge method 'tie'; did you mean 'ties'?"),
    ([NATIVE], [1.0], {"rank": 0}, "rank must be >= 1, got 0"),
    ([NATIVE], [1.0], {"energy": 1.5}, r"energy is a fraction of sum s\^2 in \(0, 1\], got 1.5"),
    ([NATIVE], [1.0], {"rank": 2, "energy": 0.5}, "pass rank or energy, not both"),
    ([NATIVE], [1.0], {"format": "pef"}, "unknown format 'pef'; did you mean 'peft'?"),
])
def test_merge_adapters_bad_arguments(adapters, weights, kwargs, message, saved, tmp_path):
    from deltatune.merging import merge_adapters

    adapters = str(saved[NATIVE]) if adapters == "one_str" else [saved[a] for a in adapters]
    with pytest.raises(ValueError, match=message):
        merge_adapters(adapters, weights, out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


CLI_MERGES = [
    ("truncated", lambda s: (truncate(PEFT, s[PEFT]), [s[NATIVE], s[PEFT]])[1],
     r"corrupt safetensors file '.*peft/adapter_model\.safetensors'"),
    ("pickle", lambda s: (pickle_only(PEFT, s[PEFT]), [s[NATIVE], s[PEFT]])[1],
     r"peft/adapter_model\.bin' is a pickle, which deltatune never loads"),
    ("two_bases", _two_bases, r"adapters '.*peft' \(base 'org/model-a'\) and '.*peft2' \(base 'org/model-b'\)"),
    ("a_file", lambda s: [s[NATIVE], s[NATIVE] / dio.WEIGHTS_NAME], r"models\.1\.path: .*adapter\.safetensors"),
]


@pytest.mark.parametrize("case, inputs, message", CLI_MERGES, ids=[c[0] for c in CLI_MERGES])
def test_deltatune_merge_of_bad_adapters_exits_2_naming_them(case, inputs, message, saved, tmp_path, capsys):
    import yaml

    from deltatune.cli.main import main

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "linear", "models": [{"path": str(p)} for p in inputs(saved)],
                                   "output": {"path": str(tmp_path / "out")}}))
    assert main(["merge", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune merge: error: ") and re.search(message, err), err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


# --- deltatune export --out ------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_adapter(tmp_path_factory) -> Path:
    """An adapter folder as `deltatune train` leaves it (adapter + recipe.yaml), without training."""
    from deltatune.training.loop import ADAPTER, RECIPE, build_model, make_task
    from deltatune.training.recipe import load_recipe

    recipe = load_recipe(None, ["train.max_length=32", "model.labels=[neg, pos]"])
    model = build_model(recipe, make_task(recipe, recipe.model.labels))
    path = tmp_path_factory.mktemp("run") / ADAPTER
    model.save(path)
    (path / RECIPE).write_text(recipe.to_yaml())
    return path


def export(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from deltatune.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", *argv])
    return code, err.getvalue()


def test_export_refuses_a_folder_with_other_files_unless_overwrite(run_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = export(str(run_adapter), "--out", str(out))
    assert code == 2 and "--out" in err and "holds files that are not a PEFT export (notes.txt)" in err
    assert "pass --overwrite" in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, err = export(str(run_adapter), "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", pio.CONFIG_NAME, pio.WEIGHTS_NAME])
    assert (out / "notes.txt").read_text() == "mine"


def test_export_replaces_a_previous_export_and_its_leftover_temp_files(run_adapter, tmp_path):
    out = tmp_path / "out"
    assert export(str(run_adapter), "--out", str(out))[0] == 0
    first = load_file(str(out / pio.WEIGHTS_NAME))
    (out / f".{pio.WEIGHTS_NAME}.abc123.tmp").write_bytes(b"half")  # as a killed export leaves it
    code, err = export(str(run_adapter), "--out", str(out))
    assert code == 0, err
    again = load_file(str(out / pio.WEIGHTS_NAME))
    assert sorted(again) == sorted(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_export_refuses_a_file_as_out_and_the_adapter_folder_itself(run_adapter, tmp_path):
    (tmp_path / "f").write_text("x")
    code, err = export(str(run_adapter), "--out", str(tmp_path / "f"))
    assert code == 2 and "is a file: give a folder" in err
    code, err = export(str(run_adapter), "--out", str(run_adapter))
    assert code == 2 and f"holds files that are not a PEFT export ({dio.WEIGHTS_NAME}, {dio.CONFIG_NAME}" in err


# --- prune: low rank, FLoRA's rank -----------------------------------------------------------
def test_a_lowrank_step_that_would_change_nothing_is_refused_with_the_largest_useful_rank(tiny_llama):
    from deltatune.compression.config import validate_prune_config
    from deltatune.compression.lowrank import LowRankLinear, max_useful_rank

    # tiny Llama blocks: 32x32 (useful rank <= 15), 16x32 (k/v), 64x32 and 32x64 (the MLP: <= 21)
    assert max_useful_rank(64, 32) == 21
    step = validate_prune_config({"steps": [{"method": "lowrank", "rank": 22}]}).steps[0]
    with pytest.raises(ValueError, match=r"lowrank: rank 22 factorises none of the 14 target layers, so the model would "
                                         r"be unchanged.*largest useful rank is 21 \(layer 'model\.layers\.0\.mlp\."
                                         r"\w+_proj', (64x32|32x64)\): pass rank <= 21"):
        step.apply(tiny_llama, None)
    assert not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    energy = validate_prune_config({"steps": [{"method": "lowrank", "energy": 1.0}]}).steps[0]
    with pytest.raises(ValueError, match=r"energy 1\.0 \(rank \d+ or more\) factorises none.*lower the energy"):
        energy.apply(tiny_llama, None)
    summary = validate_prune_config({"steps": [{"method": "lowrank", "rank": 21}]}).steps[0].apply(tiny_llama, None)
    assert summary.startswith("Low-rank factorisation: 6 of 14 layers factorised")  # gate/up/down of 2 blocks


def test_a_lowrank_step_on_no_linear_layer_says_so():
    from deltatune.compression.config import validate_prune_config

    step = validate_prune_config({"steps": [{"method": "lowrank", "rank": 1, "targets": ["conv"]}]}).steps[0]
    holder = nn.Module()
    holder.conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"none of the 1 target layers is an nn\.Linear.*target linear layers"):
        step.apply(holder, None)


def test_flora_warns_when_its_rank_gives_more_parameters_than_the_layer(caplog):
    import logging

    from deltatune.methods.structured.flora import parameter_count

    holder = nn.Module()
    holder.layer = nn.Linear(64, 32)  # 2,048 weights; r=18: 324 + 18*96 = 2,052 >= 2,048; r=17: 1,921
    assert parameter_count((32, 64), 17, 2) < 2048 <= parameter_count((32, 64), 18, 2)
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.structured.flora"):
        dm = dt.inject(holder, dt.make_config("flora", r=10000, targets=["layer"]))
    assert dm.trainable_parameters() == parameter_count((32, 64), 64, 2) == 32 * 64 + 32**2 + 64**2
    (record,) = caplog.records
    assert "flora r=10000 (capped at the mode sizes [32, 64])" in record.getMessage()
    assert "holds 7,168 parameters, as many as the layer's 2,048 or more; use r <= 17" in record.getMessage()
    caplog.clear()
    other = nn.Module()
    other.layer = nn.Linear(64, 32)
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.structured.flora"):
        dt.inject(other, dt.make_config("flora", r=17, targets=["layer"]))
    assert not caplog.records  # the largest rank below the layer's size is accepted quietly


# --- the Python API and merge / prune configs --------------------------------------------------
def _api(make_synthetic, call):
    dm = dt.inject(make_synthetic(), dt.LoRAConfig(r=2, targets=["lin"]))
    return call(dm, torch.randint(0, 10, (3, 5)))


API = [
    ("unknown_target", lambda dm, x: dm.add_adapter("b", dt.LoRAConfig(targets=["lni"])), ValueError,
     r"target 'lni' matches no module of the model; closest module names: lin"),
    ("unknown_option", lambda dm, x: dt.LoRAConfig(alhpa=3), ValueError,
     r"unknown option 'alhpa' for LoRAConfig; did you mean 'alpha'\?"),
    ("wrong_option_type", lambda dm, x: dt.LoRAConfig(r="eight"), ValueError, r"r\n.*valid integer"),
    ("unknown_method", lambda dm, x: dt.make_config("lorra"), ValueError, r"unknown method 'lorra'; did you mean 'lora'\?"),
    # plain LoRA ranks above the layer warn, as PEFT (tests/methods/test_lora_family.py); an SVD init cannot
    ("pissa_rank_above_layer", lambda dm, x: dm.add_adapter("b", dt.LoRAConfig(r=100, init="pissa", targets=["lin"])),
     ValueError, r"PiSSA init needs r <= 8 on this 8 x 8 layer \(Linear\): its SVD has only that many singular"),
    ("name_with_dot", lambda dm, x: dm.add_adapter("a.b", dt.LoRAConfig(targets=["lin"])), ValueError,
     r"invalid adapter name 'a\.b': use a non-empty name without dots"),
    ("existing_name", lambda dm, x: dm.add_adapter("default", dt.LoRAConfig(targets=["lin"])), ValueError,
     r"adapter 'default' exists already; delete_adapter\('default'\) first"),
    ("set_active_unknown", lambda dm, x: dm.set_active("defualt"), ValueError,
     r"unknown adapter 'defualt'; did you mean 'default'\? \(adapters: default\)"),
    ("adapter_names_unknown", lambda dm, x: dm(x, adapter_names=["default", "defualt", "default"]), ValueError,
     r"unknown adapter 'defualt'; did you mean 'default'\?"),
    ("adapter_names_length", lambda dm, x: dm(x, adapter_names=["default"]), ValueError,
     r"adapter_names has 1 entries but the batch has 3 rows"),
    ("adapter_names_string", lambda dm, x: dm(x, adapter_names="default"), ValueError,
     r"adapter_names takes one adapter name per batch row, got the string 'default'; pass \['default'\] \* batch_size"),
    ("token_mask_shape", lambda dm, x: dm(x, token_mask=torch.ones(3, 4)), ValueError,
     r"token_mask has shape \(3, 4\) but this layer's output has tokens \(3, 5\)"),
]


@pytest.mark.parametrize("case, call, error, message", API, ids=[c[0] for c in API])
def test_bad_api_input(case, call, error, message, make_synthetic):
    with pytest.raises(error, match=message):
        _api(make_synthetic, call)


MERGE = {"method": "ties", "base_model": "base", "models": [{"path": "a"}, {"path": "b"}], "output": {"path": "o"}}
MERGE_CONFIGS = [
    ("bad_key", {"methd": "ties"}, r"unknown key 'methd'; did you mean 'method'\?"),
    ("unknown_method", {"method": "tise"}, r"unknown method 'tise'; did you mean 'ties'\?"),
    ("density_above_1", {"parameters": {"density": 1.5}}, r"invalid value 1\.5 for 'parameters\.density': .*less than or equal to 1"),
    ("density_negative", {"parameters": {"density": -0.1}}, r"'parameters\.density': .*greater than or equal to 0"),
    ("parameter_key", {"parameters": {"densty": 0.5}}, r"unknown key 'parameters\.densty'; did you mean 'parameters\.density'\?"),
    ("override_weights_count", {"overrides": [{"pattern": "x", "weights": [1.0]}]},
     r"overrides\.0\.weights has 1 entries; give one per model \(2\)"),
    ("model_key", {"models": [{"pth": "a"}]}, r"unknown key 'models\.0\.pth'; did you mean 'models\.0\.path'\?"),
    ("weight_type", {"models": [{"path": "a", "weight": "heavy"}]}, r"invalid value 'heavy' for 'models\.0\.weight'"),
    ("no_models", {"models": []}, r"invalid value \[\] for 'models'"),
    ("shard_size", {"output": {"path": "o", "max_shard_size": "2 bananas"}}, r"output\.max_shard_size: size '2 bananas'"),
]


@pytest.mark.parametrize("case, change, message", MERGE_CONFIGS, ids=[c[0] for c in MERGE_CONFIGS])
def test_bad_merge_config(case, change, message):
    from deltatune.merging.config import MergeConfig
    from deltatune.training.recipe import validated

    with pytest.raises(ValueError, match=message) as info:
        validated(MergeConfig, {**MERGE, **change})
    assert "\n" not in str(info.value)


PRUNE_CONFIGS = [
    ("sparsity_above_1", {"method": "magnitude", "sparsity": 1.5}, r"invalid value 1\.5 for 'steps\.0\.sparsity': .*less than 1"),
    ("sparsity_zero", {"method": "magnitude", "sparsity": 0}, r"invalid value 0 for 'steps\.0\.sparsity'"),
    ("unknown_method", {"method": "magnitde"}, r"unknown method 'steps\.0\.method=magnitde'; did you mean 'magnitude'\?"),
    ("unknown_key", {"method": "magnitude", "sparsty": 0.5}, r"unknown key 'steps\.0\.sparsty'; did you mean 'steps\.0\.sparsity'\?"),
    ("n_above_m", {"method": "magnitude", "n_m": [5, 4]}, r"n_m=\(5, 4\) is not an N:M pattern: use whole numbers 0 < N < M"),
    ("n_zero", {"method": "magnitude", "n_m": [0, 4]}, r"n_m=\(0, 4\) is not an N:M pattern"),
    ("n_m_with_layer_scope", {"method": "magnitude", "n_m": [2, 4], "scope": "layer"},
     r"n_m=\[2, 4\] keeps N weights in groups of each row; use scope row, not layer"),
    ("scope", {"method": "magnitude", "scope": "rows"}, r"invalid value 'rows' for 'steps\.0\.scope'"),
    ("lowrank_rank_and_energy", {"method": "lowrank", "rank": 2, "energy": 0.5}, r"exactly one of rank or energy"),
    ("lowrank_rank_0", {"method": "lowrank", "rank": 0}, r"invalid value 0 for 'steps\.0\.rank'"),
    ("needs_calibration", {"method": "wanda"}, r"step 0 \(wanda\) needs calibration data: set calibration\.dataset"),
]


@pytest.mark.parametrize("case, step, message", PRUNE_CONFIGS, ids=[c[0] for c in PRUNE_CONFIGS])
def test_bad_prune_config(case, step, message):
    from deltatune.compression.config import validate_prune_config

    with pytest.raises(ValueError, match=message) as info:
        validate_prune_config({"steps": [step]})
    assert "\n" not in str(info.value)


def test_n_m_whose_m_does_not_divide_a_layer_names_it(make_synthetic):
    from deltatune.compression.pruning import prune

    with pytest.raises(ValueError, match=r"2:3 sparsity needs in_features divisible by 3, but 'lin' has 8; exclude it"):
        prune(make_synthetic(), "magnitude", 0.5, n_m=(2, 3), targets=["lin"])


def test_merge_adapters_takes_weights_as_any_sequence_of_numbers(saved, tmp_path):
    import numpy as np

    from deltatune.merging import merge_adapters

    a = merge_adapters([saved[NATIVE]], (1.0,), out=tmp_path / "tuple")
    b = merge_adapters([saved[NATIVE]], np.array([1.0]), out=tmp_path / "numpy")
    assert a.weights == b.weights == (1.0,)
    ta, tb = load_file(str(tmp_path / "tuple" / dio.WEIGHTS_NAME)), load_file(str(tmp_path / "numpy" / dio.WEIGHTS_NAME))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_failed_export_over_a_previous_one_leaves_no_stale_pair(run_adapter, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert export(str(run_adapter), "--out", str(out))[0] == 0

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pio, "save_file", disk_full)
    code, err = export(str(run_adapter), "--out", str(out))
    assert code == 2 and "No space left on device" in err
    # the old weights may stay, but never under a config: the folder reads as incomplete, not as a wrong adapter
    assert sorted(p.name for p in out.iterdir()) == [pio.WEIGHTS_NAME]
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        dt.load_peft(nn.Linear(2, 2), out)


def test_deltatune_prune_with_a_useless_lowrank_rank_exits_2_and_writes_nothing(tiny_llama, tmp_path, capsys):
    import yaml
    from transformers import AutoTokenizer

    from deltatune import assets
    from deltatune.cli.main import main

    tiny_llama.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(assets.smollm2_path()).save_pretrained(tmp_path / "model")
    cfg = tmp_path / "prune.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "model"), "task": "causal_lm"},
                                   "steps": [{"method": "lowrank", "rank": 10000}],
                                   "calibration": {"seq_len": 64},  # the tiny model's positions
                                   "output": {"path": str(tmp_path / "out")}}))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["prune", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune prune: error: lowrank: rank 10000 factorises none of the 14 target layers")
    assert "largest useful rank is 21" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_minus_inf_logits_of_a_top_k_vblora_are_values_not_damage(tmp_path):
    """VB-LoRA's top-k PEFT form marks unchosen bank vectors with -inf logits (as PEFT does): such an adapter
    loads, saves natively and loads again, while NaN and +inf stay refused (see CORRUPT)."""
    from helpers import TwoLinears

    dm = dt.inject(TwoLinears(), dt.make_config("vblora", r=2, num_vectors=10, vector_length=2, topk=2,
                                                save_only_topk_weights=True, targets=["a", "b"]))
    perturb(dm)
    dm.export_peft(tmp_path / "peft")
    imported = dt.load_peft(TwoLinears(), tmp_path / "peft")
    assert imported.model.a.deltas["default"].vblora_logits_A.isneginf().any()
    imported.save(tmp_path / "native")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(dt.load(TwoLinears(), tmp_path / "native")(x), imported(x))


def test_deltatune_compress_with_a_useless_lowrank_rank_exits_2_and_writes_nothing(tiny_llama, tmp_path, capsys):
    from transformers import AutoTokenizer

    from deltatune import assets
    from deltatune.cli.main import main

    tiny_llama.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(assets.smollm2_path()).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "model"), "--lowrank-rank", "10000", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lowrank: rank 10000 factorises none of the" in err and "largest useful rank is 21" in err
    assert not (tmp_path / "out").exists()
