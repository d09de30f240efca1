"""SHiRA (Bhardwaj et al., 2024): a sparse high-rank adapter, ΔW = M ⊙ V on a linear layer's weight with
k = r(d_in + d_out) entries, LoRA r's count (r does not bound the rank).

`mask_type='random'` is PEFT's mask (peft.tuners.shira.mask_functions.random_mask): the first k of
randperm(d_out·d_in) from a generator seeded with `random_seed` (torch's default seed when None), the same draw on
every layer of one shape, as PEFT does. `'weight_magnitude'` is the paper's SHiRA-WM: the k largest |W0|.
PEFT's file holds the entries as `shira_indices` (2, k) rows/columns in row-major order and the values as
`shira_weight`: the sorted flat indices and values of the selection delta, so the codec is a reshape.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ...engine.layer import DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, register
from ...engine.selection import SelectionConfig, SelectionDelta
from ...engine.targeting import require_layers


class ShiraConfig(SelectionConfig):
    r: int = Field(32, gt=0, description="entries per layer r(d_in + d_out), LoRA r's parameter count")
    mask_type: Literal["random", "weight_magnitude"] = Field(
        "random", description="'random' (PEFT's mask, from random_seed) or 'weight_magnitude' (the largest |W0|)")
    random_seed: int | None = Field(None, description="the random mask's generator seed (None: torch's default "
                                                       "seed, as PEFT); every layer of one shape gets the same mask")

    @model_validator(mode="before")
    @classmethod
    def _weights_only(cls, data: Any) -> Any:
        # SHiRA adapts a linear layer's weight; a module name would take its bias too
        if isinstance(data, dict):
            exclude = data.get("exclude")
            exclude = [] if exclude is None else list(exclude) if isinstance(exclude, (list, tuple, set)) else [exclude]
            data = {**data, "exclude": exclude if "*.bias" in exclude else [*exclude, "*.bias"]}
        return data

    def default_parameter_targets(self) -> Any:
        raise ValueError("shira needs targets: the linear layers to adapt, e.g. targets=['query', 'value']")


def shira_count(d_out: int, d_in: int, r: int) -> int:
    """k = r(d_in + d_out): the entries SHiRA trains in a d_out x d_in weight."""
    return r * (d_in + d_out)


@register("shira", config=ShiraConfig, family="selective", formula="r(d_in + d_out)", paper="2406.13175",
          summary="sparse high-rank adapter: r(d_in + d_out) entries of W, random or largest |W0|")
class Shira(SelectionDelta):
    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        if layer.kind is None or layer.kind.name not in ("linear", "linear_4bit", "linear_int8") or param.dim() != 2:
            raise ValueError(f"shira adapts linear layers' weights; '{layer.path}.{name}' is not one (target "
                             "nn.Linear modules, e.g. targets=['query', 'value'])")
        d_out, d_in = param.shape
        k = shira_count(d_out, d_in, self.config.r)
        if k > d_out * d_in:
            raise ValueError(f"shira r={self.config.r} asks for {k} entries of '{layer.path}' ({d_out}x{d_in} = "
                             f"{d_out * d_in}); use r <= {d_out * d_in // (d_in + d_out)}")
        if self.config.mask_type == "weight_magnitude":
            return torch.topk(param.detach().abs().reshape(-1).float(), k).indices
        gen = torch.Generator()
        if self.config.random_seed is not None:
            gen.manual_seed(self.config.random_seed)
        return torch.randperm(d_out * d_in, generator=gen)[:k]


# --- PEFT's SHIRA files ------------------------------------------------------------------------------
def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, tensors = adapter.config, {}
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        delta = layer.deltas[adapter.name]
        d_in = layer.in_features
        idx = delta.index("weight")
        tensors[f"{p}.shira_indices"] = torch.stack([idx // d_in, idx % d_in]).to(torch.int32)
        tensors[f"{p}.shira_weight"] = delta.value("weight").detach()
    # the indices are in the file, so PEFT loads any mask type (its own draw is skipped in inference mode)
    return {"r": cfg.r, "mask_type": cfg.mask_type, "random_seed": cfg.random_seed, "fan_in_fan_out": False,
            "init_weights": True}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    if pc.get("fan_in_fan_out"):
        raise ValueError(f"PEFT adapter '{path}' has fan_in_fan_out=True (GPT-2 Conv1D layers), which deltatune's "
                         "shira import does not cover")
    per_layer = layer_tensors(tensors, {"shira_weight": "v", "shira_indices": "i"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    state = {}
    for p, parts in per_layer.items():
        d_in = dm.model.get_submodule(p).in_features
        rows, cols = parts["i"].to(torch.long)
        flat = rows * d_in + cols
        order = torch.argsort(flat)  # the selection keeps its entries sorted
        state[f"{p}.index_weight"], state[f"{p}.values.weight"] = flat[order], parts["v"][order]
    mask_type = pc.get("mask_type", "random")
    config = ShiraConfig(r=pc.get("r", 32), mask_type=mask_type if mask_type == "weight_magnitude" else "random",
                         random_seed=pc.get("random_seed"), targets=sorted(per_layer))
    return config, state


register_peft(PeftCodec("SHIRA", ("shira",), _export, _load))
