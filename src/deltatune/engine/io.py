"""Save and load adapters: safetensors + deltatune_config.json, written atomically, checked on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from .atomic import atomic_path, atomic_write_text
from .kinds import weight_of
from .registry import make_config
from .targeting import named_layers, require_layers

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

CONFIG_NAME = "deltatune_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "deltatune.adapter/1"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter(path: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, tensors) of a saved adapter, with a clear error for every way it can be broken."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        hint = " (it holds a PEFT adapter: use load_peft / --format peft)" if (path / "adapter_config.json").is_file() \
            else ""
        raise FileNotFoundError(f"no deltatune adapter at '{path}': {CONFIG_NAME} is missing{hint}")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{cfg_file}' is not a {FORMAT} adapter config (format={meta.get('format')!r})")
    if not weights.is_file():
        raise FileNotFoundError(f"adapter weights '{weights}' are missing; save the adapter again")
    if sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"corrupt adapter weights '{weights}': checksum differs from the one saved; save it again")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt safetensors file '{weights}': {err}") from None
    return meta, tensors


def check_base(dm: DeltaModel, meta: dict[str, Any], path: Any) -> None:
    """The model must have every adapted layer, with the same shapes and (by fingerprint) weights."""
    from .model import fingerprint

    base = meta["base_model"]
    require_layers(dm.model, meta["targets"] + meta["train_modules"], f"adapter '{path}'")
    for p in meta["targets"]:
        merged = getattr(dm.model.get_submodule(p), "merged", ())
        if merged:  # the base weight now holds those adapters, so it cannot be compared with the saved base
            raise ValueError(f"'{p}' has merged adapters {list(merged)}: unmerge() before loading '{path}'")
    layers = dict(named_layers(dm.model))
    for p, saved in base["fingerprints"].items():
        if fingerprint(weight_of(layers[p])) != saved:
            raise ValueError(f"adapter '{path}' was saved for another base model ({base['class']} "
                             f"'{base['name_or_path']}'): layer '{p}' has different weights or shape; load it "
                             "onto the model it was trained on (or pass check_base=False)")


def load_adapter(dm: DeltaModel, path: Any, name: str | None, verify_base: bool = True) -> Adapter:
    meta, tensors = read_adapter(path)
    if verify_base:
        check_base(dm, meta, path)
    name = name or meta["name"]
    config = make_config(meta["method"], **meta["options"], targets=meta["targets"])
    adapter = dm.add_adapter_from_state(name, config, meta["train_modules"] or None, tensors)
    adapter.fingerprints = meta["base_model"]["fingerprints"]
    return adapter
