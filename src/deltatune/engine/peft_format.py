"""PEFT's checkpoint format (adapter_config.json + adapter_model.safetensors), for every method PEFT also has.

The engine writes and reads the files, the `base_model.model.` prefix, target_modules and `modules_to_save`
(a `full` train module's own keys); a method plugs in a `PeftCodec` (its peft_type, its config fields and
its per-layer tensor names) with `register_peft`, next to its math. LoRA/DoRA/MonteCLoRA's codec is below.

LoRA key scheme (peft 0.21): `<path>.lora_A.weight` / `lora_B.weight` (conv: 4-D; a grouped conv's A covers
every input channel, its B is (d_out, r / groups, 1, 1)), embeddings `lora_embedding_A` / `lora_embedding_B`,
DoRA `lora_magnitude_vector` (conv: (1, d_out, 1, 1)), a trained bias as the full value at
`<path>.base_layer.bias`, MonteCLoRA `lora_monteclora_sampler.*` with `monteclora_config` in the config.
PEFT's `lora_bias=True` (a trained bias b on lora_B, adding s·b) imports as `bias='lora_only'` with the bias
delta s·b: the same function (outputs, merge), written back in PEFT's `bias='lora_only'` form; further
training steps s·b, not b (Adam moves it by the rate, so the bias learns 1/s times as fast as in PEFT).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from .atomic import atomic_path, atomic_write_text
from .io import adapter_folder, model_name, read_json, read_tensors
from .kinds import CONV, CONV1D, EMBEDDING, LINEAR_KINDS
from .layer import Parts
from .registry import DeltaConfig, closest, make_config
from .targeting import require_layers

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PeftCodec:
    """How one PEFT tuner type maps to deltatune methods.

    export(dm, adapter) -> (config fields, tensors): the tuner's adapter_config.json fields (beyond
        peft_type, base_model_name_or_path, target_modules, modules_to_save, inference_mode, task_type)
        and its tensors keyed by model path without the 'base_model.model.' prefix (e.g.
        'encoder.layer.0.attention.self.query.hada_w1_a'); keys PEFT stores outside the model
        ('base_model.vera_A') are given whole, starting with 'base_model.'.
    load(dm, peft_config, tensors, path) -> (config, state): the deltatune config (with targets) and the
        state for DeltaModel.add_adapter_from_state, from the tuner's tensors (train-module tensors removed,
        prefix stripped as above); `path` (the adapter folder) is for error messages.
    """

    peft_type: str
    methods: tuple[str, ...]
    export: Callable[[DeltaModel, Adapter], tuple[dict[str, Any], Tensors]]
    load: Callable[[DeltaModel, dict[str, Any], Tensors, Any], tuple[DeltaConfig, Tensors]]


_CODECS: dict[str, PeftCodec] = {}


def register_peft(codec: PeftCodec) -> PeftCodec:
    if codec.peft_type in _CODECS:
        raise ValueError(f"PEFT type {codec.peft_type} has a codec already")
    _CODECS[codec.peft_type] = codec
    return codec


def codec_for_method(method: str) -> PeftCodec | None:
    return next((c for c in _CODECS.values() if method in c.methods), None)


def peft_methods() -> list[str]:
    """The deltatune methods that export to and import from PEFT's format."""
    return sorted(m for c in _CODECS.values() for m in c.methods)

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_SAMPLER = "lora_monteclora_sampler."  # MonteCLoRA (peft >= 0.18: LoraConfig.monteclora_config, Linear layers)
_LORA_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
              "lora_magnitude_vector": "m", "base_layer.bias": "bias", "lora_B.bias": "lora_B_bias",
              **{_SAMPLER + k: k for k in ("std_prior", "expert_weights_prior", "expert_weights",
                                           "gaussian_var_prior")}}
# MontecloraConfig fields deltatune holds; its buffer_size (draws pre-sampled into a buffer) has no counterpart
_MONTECLORA = ("num_samples", "sample_scaler", "kl_loss_weight", "dirichlet_prior", "use_entropy")


def peft_pattern(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """The value PEFT's rank_pattern / alpha_pattern give module `key`: the first pattern in order that
    matches a dotted suffix of it (peft.utils.other.get_pattern_key), else `default`."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", key)), default)


def layer_patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """Per-layer values (rank_pattern / alpha_pattern) keyed by exact paths, for PEFT and deltatune alike: the
    layers whose value differs from `default`, plus any layer a key would also match as a dotted suffix
    ('a.b' matches 'x.a.b'), longest paths first, so that every layer's own key is the first that matches."""
    pattern = {p for p, v in values.items() if v != default}
    claimed = {p for p in values if p not in pattern and any(p.endswith("." + q) for q in pattern)}
    return {p: values[p] for p in sorted(pattern | claimed, key=lambda p: (-len(p), p))}


def export_peft(dm: DeltaModel, path: Any, name: str) -> Path:
    adapter = dm.adapters[name]
    codec = codec_for_method(adapter.method)
    if codec is None:
        raise ValueError(f"adapter '{name}' is {adapter.method}, which PEFT does not have; PEFT export covers "
                         f"{', '.join(peft_methods())}. Save it with DeltaModel.save instead")
    if any(isinstance(dm.model.get_submodule(p).deltas[name], Parts) for p in adapter.paths):
        raise ValueError(f"adapter '{name}' adapts nn.MultiheadAttention layers, which PEFT export does not cover; "
                         "save it with DeltaModel.save instead")
    fields, layer_tensors = codec.export(dm, adapter)
    tensors = {k if k.startswith("base_model.") else PREFIX + k: v for k, v in layer_tensors.items()}
    for p in adapter.train_modules:
        for key, value in dm.model.get_submodule(p).deltas[name].params.items():
            tensors[f"{PREFIX}{p}.{key.replace('__', '.')}"] = value
    peft_config = {
        "peft_type": codec.peft_type, "task_type": None, "base_model_name_or_path": model_name(dm.model),
        "target_modules": adapter.paths, "modules_to_save": adapter.train_modules or None,
        "inference_mode": True, **fields,
    }
    return write_peft(path, tensors, peft_config)


def _lora_export(dm: DeltaModel, adapter: Adapter) -> tuple[dict[str, Any], Tensors]:
    name, cfg = adapter.name, adapter.config
    tensors: Tensors = {}
    fan_in_fan_out = False
    alphas: dict[str, tuple[int, float]] = {}  # per layer: (rank, alpha) as PEFT counts them
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        delta = layer.deltas[name]
        A, B = delta.factors()  # PiSSA: its rank-2r form, relative to W0
        alphas[p] = A.shape[0], float(delta.scale) * (math.sqrt(A.shape[0]) if cfg.rslora else A.shape[0])
        if layer.kind is EMBEDDING:
            tensors[f"{PREFIX}{p}.lora_embedding_A"], tensors[f"{PREFIX}{p}.lora_embedding_B"] = A, B
        else:
            if layer.kind is CONV:  # A as a conv kernel with r outputs (over all input channels), B as a 1x1 conv
                A = A.reshape(A.shape[0], -1, *layer.weight.shape[2:])
                B = B.reshape(*B.shape, *[1] * (layer.weight.dim() - 2))
            fan_in_fan_out |= layer.kind is CONV1D
            tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"] = A, B
        if adapter.method == "dora":
            m = delta.lora_magnitude
            tensors[f"{p}.lora_magnitude_vector"] = m.reshape(1, -1, *[1] * (layer.weight.dim() - 2)) \
                if layer.kind is CONV else m
        if delta.lora_bias is not None:
            tensors[f"{p}.base_layer.bias"] = layer.base_layer.bias + delta.lora_bias
        if adapter.method == "monteclora":
            tensors.update(_monteclora_tensors(p, layer, delta))
    r = 2 * cfg.r if cfg.pissa else cfg.r
    fields = {"r": r, "lora_alpha": cfg.scaling * (math.sqrt(r) if cfg.rslora else r), "use_rslora": cfg.rslora,
              "use_dora": adapter.method == "dora", "lora_dropout": cfg.dropout, "bias": cfg.bias,
              "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True}
    if getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None):  # per-layer ranks (merges)
        fields["rank_pattern"] = layer_patterns({p: k for p, (k, _) in alphas.items()}, r)
        fields["alpha_pattern"] = layer_patterns({p: a for p, (_, a) in alphas.items()}, fields["lora_alpha"])
    if adapter.method == "monteclora":
        fields["monteclora_config"] = {**{k: getattr(cfg, k) for k in _MONTECLORA}, "buffer_size": 150}
    return fields, tensors


def _monteclora_tensors(p: str, layer: Any, delta: Any) -> Tensors:
    cfg = delta.config
    if layer.kind not in LINEAR_KINDS or cfg.pissa:
        what = "PiSSA init" if cfg.pissa else f"a {type(layer.base_layer).__name__} ('{p}')"
        raise ValueError(f"PEFT's MonteCLoRA adapts linear layers with a plain rank-r A, so {what} cannot be "
                         "exported to it; save the adapter with DeltaModel.save instead")
    kw = {"dtype": delta.std_prior.dtype}
    n = cfg.num_samples
    # PEFT also saves its last draw (v as a matrix, w); ours is not state, so write PEFT's before-any-draw values,
    # which is where a loaded adapter starts in both
    values = {"std_prior": delta.std_prior, "expert_weights_prior": delta.expert_weights_prior,
              "gaussian_var_prior": torch.eye(cfg.r, **kw), "expert_weights": torch.full((n,), 1 / n, **kw)}
    return {f"{p}.{_SAMPLER}{k}": v for k, v in values.items()}


def write_peft(path: Any, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> Path:
    """Write a PEFT adapter folder: weights first, then adapter_config.json (each file atomically)."""
    path = Path(path)
    (path / CONFIG_NAME).unlink(missing_ok=True)  # over an older save: never its config beside the new weights
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
    atomic_write_text(path / CONFIG_NAME, json.dumps(peft_config, indent=2) + "\n")
    return path


class PeftConfig(dict):
    """adapter_config.json's fields; a key the codec needs but the file lacks is a one-line error naming the file.

    PEFT configs carry many version-dependent fields and PEFT itself ignores unknown ones, so deltatune
    reads the fields it needs and ignores the rest; a misspelt needed key fails here with the close key."""

    def __init__(self, data: dict[str, Any], file: Path):
        super().__init__(data)
        self.file = file

    def __missing__(self, key: str) -> Any:
        close = closest(key, self)
        hint = f" (it has '{close}': misspelt?)" if close else ""
        raise ValueError(f"'{self.file}' lacks the key '{key}'{hint}; add it or save the adapter from PEFT again")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT adapter folder. PEFT files have no checksum, so a hand-edited config
    cannot be detected; the tensors are still checked finite (and, on load, of the adapter's dtypes)."""
    path = adapter_folder(path, CONFIG_NAME, "PEFT", WEIGHTS_NAME)
    pc = PeftConfig(read_json(path / CONFIG_NAME), path / CONFIG_NAME)
    if "peft_type" not in pc:
        if isinstance(pc.get("config"), dict) and "model_class" in pc:  # AdapterHub's file of the same name
            raise ValueError(f"'{pc.file}' is an AdapterHub adapter config, not PEFT's: use dt.load_adapterhub")
        raise ValueError(f"'{pc.file}' has no 'peft_type', so it is no PEFT adapter config; save the adapter "
                         "from PEFT again")
    if pc["peft_type"] not in _CODECS:
        raise ValueError(f"PEFT adapter type {pc.get('peft_type')!r} at '{path}' is not supported; "
                         f"deltatune imports {', '.join(sorted(_CODECS))}")
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"PEFT adapter weights '{path / WEIGHTS_NAME}' are missing; save the adapter "
                                "from PEFT again (safe_serialization=True)")
    return pc, read_tensors(path / WEIGHTS_NAME)


def _check_lora_config(pc: dict[str, Any], path: Any) -> None:
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key) and pc.get("use_dora"):
            raise ValueError(f"PEFT DoRA adapter at '{path}' uses per-layer {key}, which deltatune imports for "
                             "LoRA only")
    if str(pc.get("init_lora_weights", True)).startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise ValueError(f"PEFT adapter at '{path}' was saved with init_lora_weights={pc['init_lora_weights']!r} "
                         "unconverted, so it only fits PEFT's modified base weights; save it from PEFT with "
                         "path_initial_model_for_weight_conversion to get a plain LoRA")
    if pc.get("bias", "none") not in ("none", "lora_only"):
        raise ValueError(f"PEFT adapter at '{path}' trains bias={pc['bias']!r}; deltatune imports 'none' or 'lora_only'")
    if pc.get("lora_bias") and pc.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapter at '{path}' trains both lora_bias and bias={pc['bias']!r}; deltatune holds one "
                         "bias delta per layer: save it with one of the two")


def load_peft(dm: DeltaModel, path: Any, name: str) -> Adapter:
    from .model import StateMismatch

    config, train_modules, state = read_peft(dm, path)
    try:
        return dm.add_adapter_from_state(name, config, train_modules, state)
    except StateMismatch as err:
        raise ValueError(f"'{Path(path) / WEIGHTS_NAME}' does not fit its {CONFIG_NAME} on this model: {err}; "
                         "load it onto the model it was trained on, or save it from PEFT again") from None


def read_peft(dm: DeltaModel, path: Any) -> tuple[DeltaConfig, list[str] | None, Tensors]:
    """(config, train modules, deltatune state) of a PEFT adapter folder, checked against `dm`'s layers."""
    pc, tensors = _read(Path(path))
    codec = _CODECS[pc["peft_type"]]
    heads: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    head_paths = sorted(pc.get("modules_to_save") or [], key=len, reverse=True)
    own: Tensors = {}
    for key, value in tensors.items():
        key = key.removeprefix(PREFIX)
        owner = next((p for p in head_paths if key.startswith(p + ".") or ("." + p + ".") in "." + key), None)
        if owner is None:
            own[key] = value
            continue
        start = key.index(owner + ".") if not key.startswith(owner + ".") else 0
        heads[key[: start + len(owner)]][key[start + len(owner) + 1:]] = value
    require_layers(dm.model, sorted(heads), f"PEFT adapter '{path}'")
    try:
        config, state = codec.load(dm, pc, own, path)
    except KeyError as err:
        missing = err.args[0] if err.args else err  # layer_tensors names the tensor key(s) a layer lacks
        raise ValueError(f"PEFT {pc['peft_type']} adapter '{path}' lacks tensor {missing}; its {WEIGHTS_NAME} is "
                         "incomplete: save the adapter again") from None
    for p, params in heads.items():
        state.update({f"{p}.params.{k.replace('.', '__')}": v for k, v in params.items()})
    return config, sorted(heads) or None, state


def layer_tensors(tensors: Tensors, suffixes: dict[str, str], path: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Group a tuner's tensors by layer path: {path: {role: tensor}} for keys '<path>.<suffix>'."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"unexpected tensor '{key}' in PEFT adapter '{path}' (an option deltatune does not "
                             "import, or a damaged file); save the adapter again without it")
        layer = key[: -len(suffix) - 1]
        per_layer.setdefault(layer, _LayerParts(layer, suffixes))[suffixes[suffix]] = value
    return per_layer


class _LayerParts(dict):
    """{role: tensor} of one layer; a role the file lacks is a KeyError naming the tensor's key(s)."""

    def __init__(self, layer: str, suffixes: dict[str, str]):
        super().__init__()
        self.layer, self.suffixes = layer, suffixes

    def __missing__(self, role: str) -> Any:
        keys = " or ".join(f"'{self.layer}.{s}'" for s, r in self.suffixes.items() if r == role)
        raise KeyError(keys or role)


def _lora_load(dm: DeltaModel, pc: dict[str, Any], tensors: Tensors, path: Any) -> tuple[DeltaConfig, Tensors]:
    _check_lora_config(pc, path)
    per_layer = layer_tensors(tensors, _LORA_KEYS, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    mc = pc.get("monteclora_config")
    method = "monteclora" if mc else "dora" if pc.get("use_dora") else "lora"
    extra = {k: mc[k] for k in _MONTECLORA if k in mc} if mc else {}
    bias = "lora_only" if pc.get("lora_bias") else pc.get("bias", "none")
    # per-layer ranks and alphas (PEFT's rank_pattern / alpha_pattern) become exact paths in deltatune's
    ranks = {p: int(peft_pattern(pc.get("rank_pattern") or {}, p, pc["r"])) for p in per_layer}
    alphas = {p: float(peft_pattern(pc.get("alpha_pattern") or {}, p, pc["lora_alpha"])) for p in per_layer}
    patterns = {"rank_pattern": layer_patterns(ranks, pc["r"]), "alpha_pattern": layer_patterns(alphas, pc["lora_alpha"])}
    config = make_config(method, r=pc["r"], alpha=pc["lora_alpha"], rslora=pc.get("use_rslora", False),
                         dropout=pc.get("lora_dropout", 0.0), bias=bias, targets=sorted(per_layer), **extra,
                         **{k: v for k, v in patterns.items() if v})
    state = {}
    for p, parts in per_layer.items():
        state[f"{p}.lora_A"] = parts["A"].reshape(ranks[p], -1)
        state[f"{p}.lora_B"] = parts["B"].reshape(parts["B"].shape[0], -1)  # grouped convs: (d_out, r / groups)
        if "m" in parts:
            state[f"{p}.lora_magnitude"] = parts["m"].reshape(-1)
        if mc:  # PEFT's last-draw buffers (expert_weights, gaussian_var_prior) are not state here: the next draw
            for k in ("std_prior", "expert_weights_prior"):
                state[f"{p}.{k}"] = parts[k]
        if "bias" in parts:  # PEFT stores the trained bias itself; deltatune its change
            state[f"{p}.lora_bias"] = parts["bias"] - dm.model.get_submodule(p).bias.detach()
        if "lora_B_bias" in parts:  # lora_bias=True: the layer adds s·b
            if getattr(dm.model.get_submodule(p), "bias", None) is None:
                raise ValueError(f"PEFT adapter at '{path}' has lora_bias on '{p}', which has no bias of its own; "
                                 "deltatune's bias deltas live on layers with a bias (PEFT cannot merge it either)")
            state[f"{p}.lora_bias"] = config.scaling * parts["lora_B_bias"].reshape(-1)
    return config, state


register_peft(PeftCodec("LORA", ("lora", "dora", "monteclora"), _lora_export, _lora_load))
