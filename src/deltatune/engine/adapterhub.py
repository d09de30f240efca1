"""AdapterHub (`adapters` 1.3) adapter folders: import into deltatune, export from it.

Files, as `model.save_adapter(dir, name, use_safetensors=True)` writes them:
- an adapter: adapter_config.json ({"config": a BnConfig dict, "hidden_size", "model_class", "model_name",
  "model_type", "name", "version"}) + adapter.safetensors;
- a fusion (`save_adapter_fusion`): adapter_fusion_config.json ({"adapter_names", "config", "name", ...})
  + model_adapter_fusion.safetensors. Its adapters are imported first; the fusion then joins them.
A prediction head saved beside an adapter (head_config.json) is not imported: a warning says so.

| AdapterHub (BnConfig) | deltatune |
|---|---|
| double_seq_bn (houlsby), seq_bn (pfeiffer) | houlsby, pfeiffer |
| par_bn (scaling 4.0) / scaled_par_bn (scaling "learned") | scaled_parallel_adapter / parallel_adapter, scaling "learned" |
| compacter, compacter++ (phm_layer) | compacter, compacter++ (the shared rule: `__shared__.phm_rule`) |
| original_ln_before/after, residual_before_ln, ln_before, scaling, dropout, non_linearity, reduction_factor | the same options |
| leave_out=[i, ...] | blocks i are not targeted |
| dynamic / static fusion (adapter_fusion_config) | adapter_fusion, kind "dynamic" / "static" |
| ln_after, adapter_residual_before_ln, use_gating, inv_adapter, cross_adapter, stochastic_depth; Compacter's shared_W_phm, factorized_phm_rule, an unshared rule; prefix tuning, LoRA, unions | refused: deltatune has no counterpart |

Tensor names: `bert.encoder.layer.3.output.adapters.<name>.adapter_down.0.weight` (without `bert.` for a
model made by adapters.init(BertModel)) is `encoder.layer.3.output.down.weight` on an AutoModel and
`bert.encoder.layer.3.output.down.weight` on an AutoModelForSequenceClassification; `adapter_up` is `up`,
`scaling` is `scale`, `adapter_norm_before` (aliased as `adapter_down.0`, the Linear then `adapter_down.1`)
is `norm_before`; fusion `...output.adapter_fusion_layer.<a,b>.query.weight` is `...output.query.weight`.
Configs without "version" (adapter-transformers v1/v2) mean tanh GELU by "gelu": renamed as AdapterHub does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path, atomic_write_text
from .io import adapter_folder, model_name, read_json, read_tensors
from .registry import make_config
from .targeting import require_layers

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
FUSION_CONFIG, FUSION_WEIGHTS = "adapter_fusion_config.json", "model_adapter_fusion.safetensors"
FUSION_PICKLE = "pytorch_model_adapter_fusion.bin"
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
VERSION = "adapters.1.3.0"  # the format written; without a "version" AdapterHub would rename gelu to tanh GELU
ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # AdapterHub's, for configs without "version"
RESAVE = ("re-save it with AdapterHub as safetensors: model.load_adapter(dir); "
          "model.save_adapter(dir, name, use_safetensors=True) (save_adapter_fusion for a fusion); or ")

# BnConfig as AdapterHub 1.3 writes it (AdapterConfig.load("seq_bn").to_dict() less the preset's values)
BN_DEFAULTS: dict[str, Any] = {
    "mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}
# BnConfig options deltatune has no counterpart for: the value it can import, and what the option does
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "ln_after": (False, "a trainable LayerNorm on the adapter's output"),
    "adapter_residual_before_ln": (False, "the adapter's residual added before ln_after"),
    "use_gating": (False, "a learned sigmoid gate on the adapter's output"),
    "inv_adapter": (None, "an invertible adapter on the embeddings (MAD-X)"),
    "cross_adapter": (False, "adapters on cross-attention"),
    "stochastic_depth": (0.0, "adapters dropped at random in training"),
}
PHM_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "shared_W_phm": (False, "one W shared by every PHM layer"),
    "factorized_phm_rule": (False, "a rule factorised into left and right parts"),
    "shared_phm_rule": (True, "a rule of its own in every PHM layer (deltatune shares one per adapter)"),
}
PHM_OPTIONS = ("phm_dim", "phm_rank", "factorized_phm_W", "phm_bias", "learn_phm", "phm_c_init", "phm_init_range")
PLACEMENT_OPTIONS = ("original_ln_before", "original_ln_after", "residual_before_ln", "ln_before", "dropout")
EXPORTABLE = ("houlsby", "pfeiffer", "parallel_adapter", "scaled_parallel_adapter", "compacter", "compacter++")
FUSION_OPTIONS = ("query_before_ln", "residual_before", "temperature", "value_before_softmax")
MH, OUT = "attention.output", "output"  # BERT's sublayers: AdapterHub's mh_adapter and output_adapter


# --- paths and tensor names ----------------------------------------------------------------------
def base_prefix(model: nn.Module) -> str:
    """'bert.' when the model holds its base model under base_model_prefix (a *ForSequenceClassification),
    '' when it is the base model itself (an AutoModel)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _model_path(model: nn.Module, ah_path: str) -> str:
    """An AdapterHub module path (with or without its `bert.` prefix) as a path of `model`."""
    prefix = getattr(model, "base_model_prefix", "")
    rel = ah_path.removeprefix(f"{prefix}.") if prefix else ah_path
    return base_prefix(model) + rel


def _adapter_names(ln_before: bool) -> list[tuple[str, str]]:
    """(AdapterHub tensor prefix, deltatune tensor prefix) within one adapter, in the order to match."""
    down = "adapter_down.1." if ln_before else "adapter_down.0."
    names = [(down, "down."), ("adapter_up.", "up."), ("scaling", "scale")]
    return names + ([("adapter_norm_before.", "norm_before."), ("adapter_down.0.", "norm_before.")] if ln_before else [])


def _rename(rest: str, names: list[tuple[str, str]]) -> str | None:
    for ah, dt in names:
        if rest == ah or (ah.endswith(".") and rest.startswith(ah)):
            return dt + rest[len(ah):]
    return None


# --- import --------------------------------------------------------------------------------------
def load_adapterhub(model: nn.Module, path: Any, name: str | None = None) -> DeltaModel:
    """Load an AdapterHub adapter (or fusion) folder onto `model` and return its DeltaModel."""
    from .model import DeltaModel

    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    import_adapterhub(dm, path, name)
    return dm


def import_adapterhub(dm: DeltaModel, path: Any, name: str | None = None) -> Adapter:
    """Add the adapter (or fusion) saved by AdapterHub in folder `path` to `dm`, under `name` (default: its own)."""
    path = Path(path)
    if path.is_dir() and (path / FUSION_CONFIG).is_file():
        return _import_fusion(dm, path, name)
    path = adapter_folder(path, CONFIG, "AdapterHub", WEIGHTS, (PICKLE, FUSION_PICKLE), RESAVE)
    meta = read_json(path / CONFIG)
    if "peft_type" in meta:
        raise ValueError(f"'{path / CONFIG}' is a PEFT adapter config, not AdapterHub's: use dt.load_peft")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("name"), str):
        raise ValueError(f"'{path / CONFIG}' lacks AdapterHub's 'config' and 'name' fields; save the adapter "
                         "from AdapterHub again (model.save_adapter(dir, name, use_safetensors=True))")
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"AdapterHub adapter weights '{path / WEIGHTS}' are missing; "
                                + RESAVE.removesuffix("; or "))
    heads = [f for f in HEAD_FILES if (path / f).is_file()]
    if heads:
        warnings.warn(f"'{path}' also holds an AdapterHub prediction head ({', '.join(heads)}); deltatune imports "
                      "the adapter only: train a head of your own (train_modules=['classifier'])", stacklevel=3)
    ah_name = meta["name"]
    tensors = read_tensors(path / WEIGHTS)
    c = _bn_config(meta, path, dm.model)
    state, paths = _adapter_state(dm.model, tensors, ah_name, c["ln_before"], path)
    require_layers(dm.model, paths, f"AdapterHub adapter '{path}'")
    config = make_config(_method(c), targets=paths, **_options(c, path))
    return _install(dm, name or ah_name, config, state, path / WEIGHTS)


def _bn_config(meta: dict[str, Any], path: Path, model: nn.Module) -> dict[str, Any]:
    """The adapter's BnConfig with AdapterHub's defaults filled in, after refusing what deltatune lacks."""
    raw = meta["config"]
    where = f"AdapterHub adapter '{path}'"
    arch = raw.get("architecture") or "bottleneck"
    if arch != "bottleneck":
        raise ValueError(f"{where} is a {arch!r} adapter; deltatune imports AdapterHub's bottleneck adapters "
                         "(BnConfig: seq_bn, double_seq_bn, par_bn, scaled_par_bn, compacter, compacter++)")
    unknown = sorted(set(raw) - set(BN_DEFAULTS) - {"architecture"})
    if unknown:
        raise ValueError(f"{where} sets {unknown}, which AdapterHub 1.3's BnConfig does not have; save it from "
                         "adapters 1.3 again")
    c = {**BN_DEFAULTS, **raw}
    refused = {**UNSUPPORTED, **(PHM_UNSUPPORTED if c["phm_layer"] else {})}
    for key, (ok, what) in refused.items():
        if c[key] != ok:
            raise ValueError(f"{where} sets {key}={c[key]!r} ({what}), which deltatune does not have; only "
                             f"{key}={ok!r} imports: train it without, or keep using it in AdapterHub")
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if meta.get("hidden_size") is not None and d is not None and meta["hidden_size"] != d:
        raise ValueError(f"{where} was saved for hidden size {meta['hidden_size']}, this model has {d}: load it "
                         f"onto the model it was trained on ({meta.get('model_name')!r})")
    if "version" not in meta and c["non_linearity"] in ACTIVATION_RENAME:  # adapter-transformers v1/v2
        c["non_linearity"] = ACTIVATION_RENAME[c["non_linearity"]]
    rf = c["reduction_factor"]
    if isinstance(rf, dict):
        values = set(rf.values())
        if len(values) != 1:
            raise ValueError(f"{where} has per-layer reduction factors {rf}; deltatune gives every layer of an "
                             "adapter one bottleneck size: save it with one reduction_factor")
        c["reduction_factor"] = values.pop()
    return c


def _method(c: dict[str, Any]) -> str:
    only_output = c["output_adapter"] and not c["mh_adapter"]
    if c["phm_layer"]:
        return "compacter++" if only_output and c["original_ln_before"] else "compacter"
    if c["is_parallel"]:
        return "scaled_parallel_adapter" if c["scaling"] == 4.0 else "parallel_adapter"
    return "pfeiffer" if only_output and c["original_ln_before"] else "houlsby"


def _options(c: dict[str, Any], path: Path) -> dict[str, Any]:
    """deltatune options for a BnConfig (every one set, so the method's own defaults play no part)."""
    from transformers.activations import get_activation

    try:
        get_activation(c["non_linearity"].lower())
    except KeyError:
        raise ValueError(f"AdapterHub adapter '{path}' uses non_linearity={c['non_linearity']!r}, which "
                         "transformers' get_activation (what both libraries use) does not know") from None
    options = {k: c[k] for k in PLACEMENT_OPTIONS}
    options.update(placement="parallel" if c["is_parallel"] else "serial", non_linearity=c["non_linearity"],
                   scaling=c["scaling"], reduction_factor=c["reduction_factor"])
    if c["phm_layer"]:  # AdapterHub draws glorot-normal whatever hypercomplex_nonlinearity says (spec §4)
        options.update({k: c[k] for k in PHM_OPTIONS}, init="adapterhub", hypercomplex_nonlinearity="glorot-normal")
    else:
        options["init"] = c["init_weights"] if c["init_weights"] in ("bert", "mam_adapter", "houlsby") else "bert"
    return options


def _adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], ah_name: str, ln_before: bool, path: Path
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """deltatune's state (for add_adapter_from_state) and the layer paths, from AdapterHub's tensor names."""
    from .model import SHARED

    names, state, paths = _adapter_names(ln_before), {}, {}
    marker, shared = f".adapters.{ah_name}.", f"shared_parameters.{ah_name}."
    for key, value in tensors.items():
        if key.startswith(shared) or f".{shared}" in key:
            state[f"{SHARED}.{key.split(shared, 1)[1]}"] = value
            continue
        module, _, rest = key.partition(marker)
        dt = _rename(rest, names) if rest else None
        if dt is None:
            raise ValueError(f"unexpected tensor '{key}' in AdapterHub adapter '{path}' (not a weight of "
                             f"bottleneck adapter '{ah_name}' that deltatune holds); save the adapter again")
        layer = paths.setdefault(module, _model_path(model, module))
        if f"{layer}.{dt}" in state and not torch.equal(state[f"{layer}.{dt}"], value):
            raise ValueError(f"'{key}' in '{path}' differs from its alias: the file is damaged; save it again")
        state[f"{layer}.{dt}"] = value
    return state, sorted(set(paths.values()))


def _install(dm: DeltaModel, name: str, config: Any, state: dict[str, torch.Tensor], file: Path) -> Adapter:
    from .model import StateMismatch

    try:
        return dm.add_adapter_from_state(name, config, None, state)
    except StateMismatch as err:
        raise ValueError(f"'{file}' does not fit this model: {err}; load it onto the model it was trained on, or "
                         "save it from AdapterHub again") from None


def _import_fusion(dm: DeltaModel, path: Path, name: str | None) -> Adapter:
    from .model import StateMismatch

    path = adapter_folder(path, FUSION_CONFIG, "AdapterHub fusion", FUSION_WEIGHTS, (FUSION_PICKLE,), RESAVE)
    meta = read_json(path / FUSION_CONFIG)
    children, cfg = meta.get("adapter_names"), meta.get("config")
    if not isinstance(children, list) or not isinstance(cfg, dict):
        raise ValueError(f"'{path / FUSION_CONFIG}' lacks AdapterHub's 'adapter_names' and 'config'; save the "
                         "fusion from AdapterHub again (model.save_adapter_fusion(dir, Fuse(...), use_safetensors=True))")
    missing = [n for n in children if n not in dm.adapters]
    if missing:
        raise ValueError(f"AdapterHub fusion '{path}' fuses {children}, and {missing} are not loaded: import their "
                         "adapter folders first (dt.load_adapterhub(model, <folder>) for each)")
    if not (cfg.get("query", True) and cfg.get("key", True)):
        raise ValueError(f"AdapterHub fusion '{path}' has no query or key projection (query={cfg.get('query')}, "
                         f"key={cfg.get('key')}); deltatune's fusion always has both")
    ah_name = meta.get("name") or ",".join(children)
    kind = "dynamic" if cfg.get("value", True) else "static"
    if bool(cfg.get("regularization", kind == "dynamic")) != (kind == "dynamic"):
        warnings.warn(f"AdapterHub fusion '{path}' sets regularization={cfg.get('regularization')} with value="
                      f"{cfg.get('value')}; deltatune regularises exactly the dynamic fusions (training only)",
                      stacklevel=3)
    dropout = cfg.get("dropout_prob")
    if dropout is None:  # AdapterHub's default: the model's attention dropout
        dropout = float(getattr(getattr(dm.model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
    fusion = make_config("adapter_fusion", kind=kind, dropout=dropout,
                         **{k: bool(cfg.get(k, False if k != "value_before_softmax" else True)) for k in FUSION_OPTIONS})
    tensors = read_tensors(path / FUSION_WEIGHTS)
    marker, state = f".adapter_fusion_layer.{ah_name}.", {}
    for key, value in tensors.items():
        module, _, rest = key.partition(marker)
        if not rest:
            raise ValueError(f"unexpected tensor '{key}' in AdapterHub fusion '{path}' (not of fusion '{ah_name}'); "
                             "save the fusion again")
        state[f"{_model_path(dm.model, module)}.{rest}"] = value
    fusion_name = name or ah_name
    adapter = dm.add_fusion(*children, name=fusion_name, config=fusion)
    try:
        dm.load_adapter_state_dict(state, fusion_name)
    except StateMismatch as err:
        dm.delete_adapter(fusion_name)
        raise ValueError(f"'{path / FUSION_WEIGHTS}' does not fit the fusion of {children} here: {err}; save it "
                         "from AdapterHub again") from None
    return adapter


# --- export --------------------------------------------------------------------------------------
def export_adapterhub(dm: DeltaModel, path: Any, name: str) -> Path:
    """Write adapter `name` (a bottleneck adapter, Compacter, or an AdapterFusion) as AdapterHub's folder."""
    adapter = dm.adapters[name]
    if adapter.method == "adapter_fusion":
        return _export_fusion(dm, Path(path), adapter)
    if adapter.method not in EXPORTABLE:
        raise ValueError(f"adapter '{name}' is {adapter.method}; AdapterHub export covers {', '.join(EXPORTABLE)} "
                         "and adapter_fusion. Save it with DeltaModel.save instead")
    c, model = adapter.config, dm.model
    if adapter.train_modules:
        raise ValueError(f"adapter '{name}' trains {adapter.train_modules} in full, which an AdapterHub adapter "
                         "folder cannot hold; save it with DeltaModel.save")
    blocks = _placement(dm, adapter)
    d = model.get_submodule(adapter.paths[0]).base_layer.LayerNorm.normalized_shape[-1]
    m = c.bottleneck_size(d)
    rf = c.reduction_factor if c.bottleneck is None else d / m
    if int(d // rf) != m:
        raise ValueError(f"adapter '{name}' has bottleneck {m}, which no AdapterHub reduction_factor gives for "
                         f"hidden size {d}: use a bottleneck dividing {d}")
    if getattr(c, "skip_layers", None):
        warnings.warn(f"AdapterHub keeps AdapterDrop outside the adapter config: activate '{name}' there with "
                      f"set_active_adapters('{name}', skip_layers={c.skip_layers})", stacklevel=3)
    phm = adapter.method.startswith("compacter")
    covered = next(iter(blocks.values()))
    n_layers = getattr(model.config, "num_hidden_layers", max(covered) + 1)
    bn = {**BN_DEFAULTS, **{k: getattr(c, k) for k in PLACEMENT_OPTIONS},
          "mh_adapter": MH in blocks, "output_adapter": OUT in blocks, "reduction_factor": rf,
          "non_linearity": c.non_linearity, "is_parallel": c.placement == "parallel", "scaling": c.scaling,
          "phm_layer": phm, "leave_out": sorted(set(range(n_layers)) - set(covered)),
          "init_weights": "bert" if phm else c.init}  # AdapterHub's other inits crash on PHM layers (spec §3)
    if phm:
        bn.update({k: getattr(c, k) for k in PHM_OPTIONS})
    prefix = getattr(model, "base_model_prefix", "")
    own = base_prefix(model)
    tensors = {}
    names = [(dt, ah) for ah, dt in _adapter_names(c.ln_before)]
    for p in adapter.paths:
        ah_path = f"{prefix}.{p.removeprefix(own)}" if prefix else p
        for key, value in model.get_submodule(p).deltas[name].state_dict().items():
            for dt, ah in names:  # every AdapterHub name of the tensor (the aliased LayerNorm has two)
                if key == dt or (dt.endswith(".") and key.startswith(dt)):
                    tensors[f"{ah_path}.adapters.{name}.{ah}{key[len(dt):]}"] = value
    if name in dm.shared:
        shared_prefix = f"{prefix}.shared_parameters" if prefix else "shared_parameters"
        tensors.update({f"{shared_prefix}.{name}.{k}": v for k, v in dm.shared[name].state_dict().items()})
    meta = {"config": bn, "hidden_size": d, "model_class": _model_class(model), "model_name": model_name(model),
            "model_type": getattr(model.config, "model_type", None), "name": name, "version": VERSION}
    return _write(Path(path), CONFIG, WEIGHTS, meta, tensors)


def _placement(dm: DeltaModel, adapter: Adapter) -> dict[str, list[int]]:
    """{sublayer ('attention.output' / 'output'): its blocks}, refusing what AdapterHub cannot place."""
    own = base_prefix(dm.model)
    blocks: dict[str, list[int]] = {}
    for p in adapter.paths:
        parts = p.removeprefix(own).split(".")
        loc = ".".join(parts[3:])
        if parts[:2] != ["encoder", "layer"] or not parts[2].isdigit() or loc not in (MH, OUT) \
                or adapter.config.site != "auto" or adapter.config.hidden_size is not None:
            raise ValueError(f"adapter '{adapter.name}' sits at '{p}'; AdapterHub places bottleneck adapters only at "
                             "BERT-style encoder.layer.<i>.attention.output / .output sublayers (site 'auto')")
        blocks.setdefault(loc, []).append(int(parts[2]))
    if len({tuple(sorted(b)) for b in blocks.values()}) > 1:
        raise ValueError(f"adapter '{adapter.name}' covers different blocks after attention and after the FFN "
                         f"({blocks}); AdapterHub's leave_out drops whole blocks: target the same blocks in both")
    return blocks


def _model_class(model: nn.Module) -> str:
    base = getattr(model, base_prefix(model).rstrip("."), model) if base_prefix(model) else model
    return type(base).__name__.replace("Model", "AdapterModel")  # BertModel -> BertAdapterModel


def _export_fusion(dm: DeltaModel, path: Path, adapter: Adapter) -> Path:
    from .model import _fusions

    c, model = adapter.config, dm.model
    blocks = [f for f in (_fusions(dm.setup) if dm.setup is not None else []) if f.name == adapter.name]
    children = blocks[0].names() if blocks else adapter.name.split(",")
    if not all(n in dm.adapters for n in children):
        raise ValueError(f"fusion '{adapter.name}' is neither named after the adapters it fuses ('a,b') nor in the "
                         "active setup, so its AdapterHub config cannot list them: set_active(Fuse(..., name=...)) "
                         "first")
    dynamic = c.kind == "dynamic"
    cfg = {"key": True, "query": True, "value": dynamic, "regularization": dynamic, "value_initialized": dynamic,
           "dropout_prob": c.dropout, **{k: getattr(c, k) for k in FUSION_OPTIONS}}
    prefix = getattr(model, "base_model_prefix", "")
    own = base_prefix(model)
    tensors = {}
    for p in adapter.paths:
        ah_path = f"{prefix}.{p.removeprefix(own)}" if prefix else p
        for key, value in model.get_submodule(p).deltas[adapter.name].state_dict().items():
            tensors[f"{ah_path}.adapter_fusion_layer.{adapter.name}.{key}"] = value
    d = getattr(model.config, "hidden_size", None)
    meta = {"adapter_names": children, "config": cfg, "hidden_size": d, "model_class": _model_class(model),
            "model_name": model_name(model), "model_type": getattr(model.config, "model_type", None),
            "name": adapter.name, "version": VERSION}
    return _write(path, FUSION_CONFIG, FUSION_WEIGHTS, meta, tensors)


def _write(path: Path, config_name: str, weights_name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
           ) -> Path:
    """Weights first, config last (each atomic), never an old config beside new weights."""
    (path / config_name).unlink(missing_ok=True)
    with atomic_path(path / weights_name) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    atomic_write_text(path / config_name, json.dumps(meta, indent=2) + "\n")
    return path
