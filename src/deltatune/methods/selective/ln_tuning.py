"""LayerNorm tuning (Zhao et al., 2023; PEFT's LN_TUNING): train only the norm layers' weights and biases.

A selection delta on every own parameter of each norm module: nn.LayerNorm / RMSNorm / GroupNorm and the
models' own classes by name (LlamaRMSNorm, T5LayerNorm, Qwen2RMSNorm...), as PEFT's per-model defaults list
them (for Llama: input_layernorm, post_attention_layernorm, norm). Targets may also name modules
('LayerNorm', 'input_layernorm'): all their own parameters.

PEFT keeps a whole trained copy of each norm (`<path>.ln_tuning_layers.<param>`); deltatune keeps the change.
The codec converts: export writes base + Δ, import takes file - base.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.selection import SelectionConfig, SelectionDelta
from ...engine.targeting import require_layers

_NORM_NAME = re.compile(r".*(LayerNorm|RMSNorm|GroupNorm)(\d+d)?$")  # not BatchNorm: running statistics


class _NormKind(type):
    def __instancecheck__(cls, module: Any) -> bool:
        return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or (
            isinstance(module, nn.Module) and _NORM_NAME.fullmatch(type(module).__name__) is not None)


class NormModule(metaclass=_NormKind):
    """A target type standing for every norm layer (isinstance(m, NormModule) is the test)."""


class LNTuningConfig(SelectionConfig):
    def default_parameter_targets(self) -> Any:
        return [NormModule]

    def no_match_hint(self) -> str:
        return ("LN tuning trains norm layers (LayerNorm, RMSNorm, GroupNorm or classes named so) and found none "
                "with parameters: name the model's norm modules in targets")


@register("ln_tuning", config=LNTuningConfig, family="selective", formula="d (RMSNorm) or 2 d (LayerNorm)",
          paper="2312.11420", summary="train only the norm layers' weights and biases")
class LNTuning(SelectionDelta):
    pass


# --- PEFT format: '<path>.ln_tuning_layers.<name>', the trained norm's whole state ------------------------------
_COPY = "ln_tuning_layers"


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors = {}
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        delta = layer.deltas[adapter.name]
        for n, t in layer.base_layer.state_dict().items():  # PEFT's copy holds every tensor of the norm
            trained = t + delta.dense(layer, n).to(t.dtype) if n in delta.names else t
            tensors[f"{p}.{_COPY}.{n}"] = trained.detach().clone()
    return {"exclude_modules": None}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    names = sorted({k.split(f".{_COPY}.")[-1] for k in tensors if f".{_COPY}." in k})
    per_layer = layer_tensors(tensors, {f"{_COPY}.{n}": n for n in names}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    state = {}
    for p, parts in per_layer.items():
        module = dm.model.get_submodule(p)
        module = getattr(module, "base_layer", module)
        params, base = dict(module.named_parameters(recurse=False)), module.state_dict()
        for n, t in parts.items():
            if n not in base:
                raise ValueError(f"PEFT adapter '{path}' holds '{p}.{_COPY}.{n}', which '{p}' "
                                 f"({type(module).__name__}) lacks; load it onto the model it was trained on")
            if n in params:  # deltatune keeps the change
                state[f"{p}.values.{n.replace('.', '__')}"] = t.to(params[n].dtype) - params[n].detach()
            elif not torch.equal(t.to(base[n]), base[n]):
                raise ValueError(f"PEFT adapter '{path}' changes the buffer '{p}.{n}', which LN tuning here keeps "
                                 "as the base's; only the norm's parameters are trained")
    return make_config("ln_tuning", targets=sorted(per_layer)), state


register_peft(PeftCodec("LN_TUNING", ("ln_tuning",), _export, _load))
