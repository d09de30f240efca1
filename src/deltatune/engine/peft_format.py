"""PEFT's checkpoint format (adapter_config.json + adapter_model.safetensors) for LoRA and DoRA adapters.

Key scheme (peft 0.21): `base_model.model.<path>.lora_A.weight` / `lora_B.weight` (conv: 4-D), embeddings
`lora_embedding_A` / `lora_embedding_B`, DoRA `lora_magnitude_vector` (conv: (1, d_out, 1, 1)), a trained
bias as the full value at `<path>.base_layer.bias`, and `modules_to_save` as the module's own keys.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_text
from .io import model_name
from .kinds import CONV, CONV1D, EMBEDDING
from .registry import make_config
from .targeting import require_layers

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_LORA_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
              "lora_magnitude_vector": "m", "base_layer.bias": "bias"}


def export_peft(dm: DeltaModel, path: Any, name: str) -> Path:
    adapter = dm.adapters[name]
    if adapter.method not in ("lora", "dora"):
        raise ValueError(f"PEFT export covers LoRA and DoRA adapters; '{name}' is {adapter.method}")
    cfg = adapter.config
    tensors: dict[str, torch.Tensor] = {}
    fan_in_fan_out = False
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        delta = layer.deltas[name]
        A, B = delta.factors()  # PiSSA: its rank-2r form, relative to W0
        if layer.kind is EMBEDDING:
            tensors[f"{PREFIX}{p}.lora_embedding_A"], tensors[f"{PREFIX}{p}.lora_embedding_B"] = A, B
        else:
            if layer.kind is CONV:  # A as a conv kernel with r outputs, B as a 1x1 conv
                A = A.reshape(A.shape[0], *layer.weight.shape[1:])
                B = B.reshape(*B.shape, *[1] * (layer.weight.dim() - 2))
            fan_in_fan_out |= layer.kind is CONV1D
            tensors[f"{PREFIX}{p}.lora_A.weight"], tensors[f"{PREFIX}{p}.lora_B.weight"] = A, B
        if adapter.method == "dora":
            m = delta.lora_magnitude
            tensors[f"{PREFIX}{p}.lora_magnitude_vector"] = m.reshape(1, -1, *[1] * (layer.weight.dim() - 2)) \
                if layer.kind is CONV else m
        if delta.lora_bias is not None:
            tensors[f"{PREFIX}{p}.base_layer.bias"] = layer.base_layer.bias + delta.lora_bias
    for p in adapter.train_modules:
        for key, value in dm.model.get_submodule(p).deltas[name].params.items():
            tensors[f"{PREFIX}{p}.{key.replace('__', '.')}"] = value
    r = 2 * cfg.r if cfg.pissa else cfg.r
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": model_name(dm.model),
        "r": r, "lora_alpha": cfg.scaling * (math.sqrt(r) if cfg.rslora else r), "use_rslora": cfg.rslora,
        "use_dora": adapter.method == "dora", "lora_dropout": cfg.dropout, "bias": cfg.bias,
        "target_modules": adapter.paths, "modules_to_save": adapter.train_modules or None,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "inference_mode": True,
    }
    return write_peft(path, tensors, peft_config)


def write_peft(path: Any, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> Path:
    """Write a PEFT adapter folder: weights first, then adapter_config.json (each file atomically)."""
    path = Path(path)
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
    atomic_write_text(path / CONFIG_NAME, json.dumps(peft_config, indent=2) + "\n")
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no PEFT adapter at '{path}': {CONFIG_NAME} is missing")
    pc = json.loads((path / CONFIG_NAME).read_text())
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"PEFT adapter type {pc.get('peft_type')!r} at '{path}' is not supported; "
                         "deltatune imports LORA adapters (with or without DoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise ValueError(f"PEFT adapter at '{path}' uses per-layer {key}, which deltatune cannot import yet")
    if str(pc.get("init_lora_weights", True)).startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise ValueError(f"PEFT adapter at '{path}' was saved with init_lora_weights={pc['init_lora_weights']!r} "
                         "unconverted, so it only fits PEFT's modified base weights; save it from PEFT with "
                         "path_initial_model_for_weight_conversion to get a plain LoRA")
    if pc.get("bias", "none") not in ("none", "lora_only"):
        raise ValueError(f"PEFT adapter at '{path}' trains bias={pc['bias']!r}; deltatune imports 'none' or 'lora_only'")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read '{path / WEIGHTS_NAME}': {err}") from None
    return pc, tensors


def load_peft(dm: DeltaModel, path: Any, name: str) -> Adapter:
    pc, tensors = _read(Path(path))
    per_layer: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    heads: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    head_paths = sorted(pc.get("modules_to_save") or [], key=len, reverse=True)
    for key, value in tensors.items():
        key = key.removeprefix(PREFIX)
        suffix = next((s for s in _LORA_KEYS if key.endswith("." + s)), None)
        if suffix is not None:
            per_layer[key[: -len(suffix) - 1]][_LORA_KEYS[suffix]] = value
            continue
        owner = next((p for p in head_paths if key.startswith(p + ".") or ("." + p + ".") in "." + key), None)
        if owner is None:
            raise ValueError(f"unexpected tensor '{key}' in PEFT adapter '{path}'")
        start = key.index(owner + ".") if not key.startswith(owner + ".") else 0
        heads[key[: start + len(owner)]][key[start + len(owner) + 1:]] = value
    require_layers(dm.model, sorted(per_layer) + sorted(heads), f"PEFT adapter '{path}'")
    method = "dora" if pc.get("use_dora") else "lora"
    config = make_config(method, r=pc["r"], alpha=pc["lora_alpha"], rslora=pc.get("use_rslora", False),
                         dropout=pc.get("lora_dropout", 0.0), bias=pc.get("bias", "none"), targets=sorted(per_layer))
    state = {}
    for p, parts in per_layer.items():
        state[f"{p}.lora_A"] = parts["A"].reshape(config.r, -1)
        state[f"{p}.lora_B"] = parts["B"].reshape(parts["B"].shape[0], config.r)
        if "m" in parts:
            state[f"{p}.lora_magnitude"] = parts["m"].reshape(-1)
        if "bias" in parts:  # PEFT stores the trained bias itself; deltatune its change
            state[f"{p}.lora_bias"] = parts["bias"] - dm.model.get_submodule(p).bias.detach()
    for p, params in heads.items():
        state.update({f"{p}.params.{k.replace('.', '__')}": v for k, v in params.items()})
    return dm.add_adapter_from_state(name, config, sorted(heads) or None, state)
