"""ShareLoRA: Parameter Efficient and Robust Large Language Model Fine-tuning via Shared Low-Rank
Adaptation (Song et al., arXiv:2406.10785; the brief's 2406.12354 is not this paper's id):

    y = W0 x + s · B_t A_t x   for every layer of projection type t (all `query` layers, all `value`s...),

LoRA (s = alpha / r) whose A, B or both are ONE tensor per projection type, shared across the layers.
Checked against the official code (Rain9876/ShareLoRA, GLUE/run_glue_share.py and
sharelora/lora_llama3_share.py): layers are grouped by projection name ("query"/"value", "q_proj"/...),
the first layer's LoRA factor replaces the others'; `shareA = True, shareB = False` is the default,
and the factors keep LoRA's init (A Kaiming-uniform, B zero), so ΔW = 0 at init.
Here a group is the leaf name of the layer's path; its shared factors live in the adapter's shared
module (saved as '__shared__.lora_A.<group>'). P with share="A" for L layers of one type: r d_in + L r d_out
("B": L r d_in + r d_out; "AB": r (d_in + d_out)).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ...engine.kinds import kaiming_uniform_
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import register
from .lora import LoRA, LoRAConfig, adapter_dtype, check_rank


class ShareLoRAConfig(LoRAConfig):
    share: Literal["A", "B", "AB"] = Field("A", description="factor(s) shared by all layers of one projection type")

    @field_validator("init")
    @classmethod
    def _no_pissa(cls, v: str) -> str:
        if v not in ("kaiming", "gaussian"):
            raise ValueError(f"ShareLoRA init must be 'kaiming' or 'gaussian', not '{v}': PiSSA factors are per layer")
        return v


class SharedFactors(nn.Module):
    """One A (r, d_in) and/or B (d_out, r) per group of layers of the same projection type."""

    def __init__(self, config: ShareLoRAConfig, layers: Sequence[DeltaLayer]):
        super().__init__()
        paths = {id(layer): layer.path for layer in layers}  # set by the engine before build_shared
        self.__dict__["group_of"] = {i: p.rsplit(".", 1)[-1] for i, p in paths.items()}  # not state
        groups: dict[str, list[DeltaLayer]] = defaultdict(list)
        for layer in layers:
            groups[self.group_of[id(layer)]].append(layer)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for group, members in groups.items():
            shapes = {paths[id(m)]: tuple(m.matrix().shape) for m in members}
            d_out, d_in = check_rank(config.r, members[0], "sharelora", warn_for=config)
            kw = {"dtype": adapter_dtype(members[0]), "device": members[0].weight.device}
            for factor, dim in (("A", 1), ("B", 0)):
                if factor in config.share and len({s[dim] for s in shapes.values()}) > 1:
                    raise ValueError(f"ShareLoRA shares {factor} across the '{group}' layers, but their "
                                     f"{'d_in' if dim else 'd_out'} differ: {shapes}; target layers of one shape "
                                     f"per name, or share='{'B' if factor == 'A' else 'A'}'")
            if "A" in config.share:
                self.lora_A[group] = nn.Parameter(torch.zeros(config.r, d_in, **kw))
            if "B" in config.share:
                self.lora_B[group] = nn.Parameter(torch.zeros(d_out, config.r, **kw))


@register("sharelora", config=ShareLoRAConfig, family="low-rank",
          formula="r(d_in + d_out) for one layer; share='A' over L layers of one type: r d_in + L r d_out",
          paper="arXiv:2406.10785", summary="ShareLoRA: LoRA with A (or B, or both) shared by all layers of a type")
class ShareLoRA(LoRA):
    def __init__(self, config: ShareLoRAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: SharedFactors | None = None):
        Delta.__init__(self, config, layer, shared=shared)
        d_out, d_in = check_rank(config.r, layer, self.method, warn_for=config)
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = config.scaling
        self.group = shared.group_of[id(layer)]
        # own factors only where not shared (the shared ones are initialised once, in build_shared)
        self.lora_A = None if "A" in config.share else nn.Parameter(torch.zeros(config.r, d_in, **kw))
        self.lora_B = None if "B" in config.share else nn.Parameter(torch.zeros(d_out, config.r, **kw))
        has_bias = config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None
        self.lora_bias = nn.Parameter(torch.zeros(d_out, **kw)) if has_bias else None
        if initialize and self.lora_A is not None:
            init_A(self.lora_A, config)

    @classmethod
    def build_shared(cls, config: ShareLoRAConfig, layers: Sequence[DeltaLayer]) -> SharedFactors:
        shared = SharedFactors(config, layers)
        for A in shared.lora_A.values():  # an init when loading too: cheap, and overwritten by the state
            init_A(A, config)
        return shared

    def factors(self) -> tuple[Tensor, Tensor]:
        A = self.shared.lora_A[self.group] if self.lora_A is None else self.lora_A
        B = self.shared.lora_B[self.group] if self.lora_B is None else self.lora_B
        return A, B


@torch.no_grad()
def init_A(A: Tensor, config: ShareLoRAConfig) -> None:
    if config.init == "gaussian":
        nn.init.normal_(A, std=1 / config.r)
    else:
        kaiming_uniform_(A)
