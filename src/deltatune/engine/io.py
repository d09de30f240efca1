"""Save and load adapters: safetensors + deltatune_config.json, written atomically, checked on load.

Integrity: the config stores the SHA-256 of the weights file (`weights_sha256`) and of its own other
fields (`config_sha256`, canonical JSON), so a damaged or hand-edited file (alpha changed, a tensor
replaced) fails to load unless the caller accepts it knowingly with `check_integrity=False`. Configs
saved before `config_sha256` existed load with the weights checked only. On every load, whatever
the integrity setting, tensors must hold no NaN or +inf and be of the kind the adapter holds (see engine.model).
Pickles (`.bin`, `.pt`) are never read: unpickling can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from .atomic import atomic_path, atomic_write_text
from .kinds import weight_of
from .registry import DeltaConfig, closest, make_config
from .targeting import named_layers, require_layers

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

CONFIG_NAME = "deltatune_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "deltatune.adapter/1"
# the config's fields and their JSON types; deltatune_version and config_sha256 may be absent (older saves)
FIELDS = {"format": str, "deltatune_version": str, "name": str, "method": str, "options": dict, "targets": list,
          "train_modules": list, "base_model": dict, "weights_sha256": str, "config_sha256": str}
OPTIONAL = ("deltatune_version", "config_sha256")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INTEGRITY_OFF = "pass check_integrity=False to load it as it is"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of the config's fields except its own checksum, as canonical JSON (sorted keys, no spaces)."""
    fields = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_name(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_adapter(dm: DeltaModel, path: Any, name: str) -> Path:
    """Save adapter `name` of `dm` with the base model's identity (see write_adapter)."""
    adapter = dm.adapters[name]
    state = {k: v.detach().contiguous().cpu() for k, v in dm.adapter_state_dict(name).items()}
    meta = {
        "name": name,
        "method": adapter.method,
        "options": adapter.config.model_dump(mode="json", exclude={"targets", "exclude"}),
        "targets": adapter.paths,
        "train_modules": adapter.train_modules,
        "base_model": {"class": type(dm.model).__name__, "name_or_path": model_name(dm.model),
                       "fingerprints": adapter.fingerprints},
    }
    return write_adapter(path, state, meta)


def write_adapter(path: Any, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write an adapter folder from its tensors and config fields (name, method, options, targets,
    train_modules, base_model). Weights first, config last: the config (with the weights' checksum)
    marks a complete save."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "method": meta["method"]})
    meta = {"format": FORMAT, "deltatune_version": __version__, **meta, "weights_sha256": sha256(weights)}
    meta["config_sha256"] = config_sha256(meta)
    atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return path


def adapter_folder(path: Any, config_name: str, kind: str, weights_name: str, pickle_names: tuple[str, ...] = (),
                   resave: str = "") -> Path:
    """`path` as an existing adapter folder holding `config_name`, or a one-line error saying what is there
    (`pickle_names`, `resave`: see refuse_pickles)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {kind} adapter at '{path}': it does not exist; check the path")
    if not path.is_dir():
        raise NotADirectoryError(f"'{path}' is a file, not an adapter folder; pass the folder holding {config_name}")
    refuse_pickles(path, config_name, weights_name, pickle_names, resave)
    if not (path / config_name).is_file():
        others = {CONFIG_NAME: "a deltatune adapter: use deltatune.load / --format deltatune",
                  "adapter_config.json": "a PEFT adapter: use load_peft / --format peft"}
        hint = next((f" (it holds {what})" for name, what in others.items() if (path / name).is_file()), None)
        if hint is None:
            files = sorted(p.name for p in path.iterdir())
            hint = f" (it holds {', '.join(files[:5])}{', ...' if len(files) > 5 else ''})" if files else \
                " (the folder is empty)"
        raise FileNotFoundError(f"no {kind} adapter at '{path}': {config_name} is missing{hint}")
    return path


def refuse_pickles(path: Path, config_name: str, weights_name: str, pickle_names: tuple[str, ...] = (),
                   resave: str = "") -> None:
    """Refuse an adapter whose weights exist only as a pickle: deltatune never unpickles (it can run code).
    A pickle counts as the adapter's when the config is there, it bears the weights' name (adapter_model.bin)
    or it is one of `pickle_names` (a format's own pickle, e.g. AdapterHub's pytorch_adapter.bin); `resave`
    is the format's own way to write safetensors, said before the generic one."""
    if (path / weights_name).is_file():
        return
    stem = Path(weights_name).stem
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                     and ((path / config_name).is_file() or p.stem == stem or p.name in pickle_names))
    if pickles:
        file = pickles[0]
        raise ValueError(f"'{file}' is a pickle, which deltatune never loads (unpickling can run code); "
                         f"{resave}if you trust it, re-save it as safetensors: python -c \"import torch; "
                         "from safetensors.torch import save_file; save_file(torch.load("
                         f"'{file}', weights_only=True), '{path / weights_name}')\"")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, or a one-line error naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{file}' is not valid JSON ({err}): it is damaged or was mis-edited; fix it or "
                         "save the adapter again") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{file}' holds a JSON {type(data).__name__}, not an adapter config object; "
                         "save the adapter again")
    return data


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each checked finite; errors name the file and the tensor."""
    if not file.is_file():
        raise FileNotFoundError(f"adapter weights '{file}' are missing; save the adapter again")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt safetensors file '{file}' ({err}): it is truncated or damaged; "
                         "save the adapter again") from None
    for key, t in tensors.items():
        # -inf is a value, not damage: VB-LoRA's top-k logits (as PEFT stores them) mark unchosen vectors with it
        if t.is_floating_point() and (bad := int((t.isnan() | t.isposinf()).sum())):
            raise ValueError(f"tensor '{key}' in '{file}' holds {bad} NaN/inf values of {t.numel()}: the run "
                             "diverged or the file is damaged; use an earlier checkpoint or retrain (lower lr)")
    return tensors


def check_meta(meta: dict[str, Any], cfg_file: Path, check_integrity: bool = True) -> None:
    """Known fields of the right types, and (with check_integrity) the config's own checksum."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{cfg_file}' is not a {FORMAT} adapter config (format={meta.get('format')!r})")
    for key in meta:
        if key not in FIELDS:
            close = closest(key, FIELDS)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ValueError(f"unknown key '{key}' in '{cfg_file}'{hint}; remove or rename it, or save the adapter "
                             "again")
    for key, kind in FIELDS.items():
        if key not in meta and key not in OPTIONAL:
            raise ValueError(f"'{cfg_file}' lacks the key '{key}'; save the adapter again")
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"'{key}' in '{cfg_file}' must be a JSON {kind.__name__}, got {meta[key]!r:.60}; "
                             "save the adapter again")
    if not isinstance(meta["base_model"].get("fingerprints"), dict):
        raise ValueError(f"'base_model' in '{cfg_file}' lacks its 'fingerprints' mapping; save the adapter again")
    if check_integrity and "config_sha256" in meta and config_sha256(meta) != meta["config_sha256"]:
        raise ValueError(f"'{cfg_file}' was changed after saving (its checksum differs): the adapter may no "
                         f"longer match its weights; save it again, or {INTEGRITY_OFF}")


def adapter_config(meta: dict[str, Any], where: Any) -> DeltaConfig:
    """The method config a saved adapter names, with a one-line error for bad options."""
    try:
        return make_config(meta["method"], **meta["options"], targets=meta["targets"])
    except ValidationError as err:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") + (f" ({'.'.join(map(str, e['loc']))})"
                         if e["loc"] else "") for e in err.errors())
        raise ValueError(f"invalid options of the {meta['method']} adapter '{where}': {msgs}") from None


def read_adapter(path: Any, check_integrity: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, tensors) of a saved adapter, with a clear error for every way it can be broken."""
    path = adapter_folder(path, CONFIG_NAME, "deltatune", WEIGHTS_NAME)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    meta = read_json(cfg_file)
    check_meta(meta, cfg_file, check_integrity)
    if not weights.is_file():
        raise FileNotFoundError(f"adapter weights '{weights}' are missing; save the adapter again")
    if check_integrity and sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"corrupt adapter weights '{weights}': checksum differs from the one saved (truncated, "
                         f"damaged or replaced); save it again, or {INTEGRITY_OFF}")
    return meta, read_tensors(weights)


def check_base(dm: DeltaModel, meta: dict[str, Any], path: Any) -> None:
    """The model must have every adapted layer, with the same shapes and (by fingerprint) weights."""
    require_layers(dm.model, meta["targets"] + meta["train_modules"], f"adapter '{path}'")
    for p in meta["targets"]:
        merged = getattr(dm.model.get_submodule(p), "merged", ())
        if merged:  # the base weight now holds those adapters, so it cannot be compared with the saved base
            raise ValueError(f"'{p}' has merged adapters {list(merged)}: unmerge() before loading '{path}'")
    layers = dict(named_layers(dm.model))
    for p in meta["base_model"]["fingerprints"]:
        check_fingerprint(meta, p, weight_of(layers[p]), path)


def check_fingerprint(meta: dict[str, Any], layer_path: str, weight: torch.Tensor, path: Any) -> None:
    """The base weight of `layer_path` must be the one the adapter was saved with (by its fingerprint)."""
    from .model import fingerprint

    base = meta["base_model"]
    saved = base["fingerprints"].get(layer_path)
    if saved is not None and fingerprint(weight) != saved:
        raise ValueError(f"adapter '{path}' was saved for another base model ({base.get('class')} "
                         f"'{base.get('name_or_path')}'): layer '{layer_path}' has different weights or shape; load "
                         "it onto the model it was trained on (or pass check_base=False, e.g. for the float model a "
                         "quantized base was made from, or the reverse: their weights differ by the rounding)")


def load_adapter(dm: DeltaModel, path: Any, name: str | None, verify_base: bool = True,
                 check_integrity: bool = True) -> Adapter:
    from .model import StateMismatch

    meta, tensors = read_adapter(path, check_integrity)
    if verify_base:
        check_base(dm, meta, path)
    name = name or meta["name"]
    config = adapter_config(meta, path)
    try:
        adapter = dm.add_adapter_from_state(name, config, meta["train_modules"] or None, tensors)
    except StateMismatch as err:
        raise ValueError(f"'{Path(path) / WEIGHTS_NAME}' does not match its {CONFIG_NAME}: {err}; save the "
                         "adapter again") from None
    adapter.fingerprints = meta["base_model"]["fingerprints"]
    return adapter


SETUP_NAME = "deltatune_setup.json"
SETUP_FORMAT = "deltatune.setup/1"


def save_adapter_set(dm: DeltaModel, path: Any) -> Path:
    """Every adapter of `dm` in its own subfolder, then the active setup (composition block) beside them.
    Each adapter is written atomically; the setup file, written last, marks a complete set."""
    path = Path(path)
    for name in dm.adapters:
        save_adapter(dm, path / name, name)
    setup = dm.setup.to_dict() if dm.setup is not None else list(dm.active)
    meta = {"format": SETUP_FORMAT, "adapters": list(dm.adapters), "active": setup}
    atomic_write_text(path / SETUP_NAME, json.dumps(meta, indent=2) + "\n")
    return path


def load_adapter_set(dm: DeltaModel, path: Any, verify_base: bool = True, check_integrity: bool = True) -> None:
    """Load a folder written by save_adapter_set: every adapter (in the order saved), then its setup."""
    path = Path(path)
    cfg = path / SETUP_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"no adapter set at '{path}': {SETUP_NAME} is missing (a single adapter loads with "
                                "deltatune.load)")
    meta = read_json(cfg)
    if meta.get("format") != SETUP_FORMAT or not isinstance(meta.get("adapters"), list):
        raise ValueError(f"'{cfg}' is not a {SETUP_FORMAT} file; save the adapter set again")
    for name in meta["adapters"]:
        load_adapter(dm, path / name, name, verify_base, check_integrity)
    dm.set_active(meta["active"])
