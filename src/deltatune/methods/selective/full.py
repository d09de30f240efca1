"""Full fine-tuning of selected modules: a trainable copy replaces the module (PEFT's `modules_to_save`).

Used for new task heads, whose weights are freshly initialised and must be saved whole. Merging copies
the trained values into the module and keeps the originals to restore them on unmerge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register


class FullConfig(DeltaConfig):
    pass


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


@register("full", config=FullConfig, family="selective", formula="all parameters of the module",
          paper="full fine-tuning (PEFT modules_to_save)", summary="a trainable copy of a whole module")
class Full(Delta):
    uses_base_output = False
    additive = False
    any_module = True  # norms, GRUs, attention: any module with parameters
    needs_inputs = True  # it reruns the module, with all the arguments of the call

    def __init__(self, config: FullConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        # a copy of a half-precision module trains in float32 (its updates would round away), computing in
        # the module's dtype: the cast in forward passes float32 gradients back
        self.params = nn.ParameterDict({
            _key(n): nn.Parameter(p.detach().to(_master_dtype(p.dtype)).clone())
            for n, p in layer.base_layer.named_parameters()})

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor | None, *args: Any, **kwargs: Any) -> Any:
        values = {n: self.params[_key(n)].to(p.dtype) for n, p in layer.base_layer.named_parameters()}
        return functional_call(layer.base_layer, values, (x, *args), kwargs)

    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> dict[str, Tensor]:
        undo = {}
        for n, p in layer.base_layer.named_parameters():
            undo[n] = p.detach().clone()
            p.copy_(self.params[_key(n)])
        return undo

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, undo: dict[str, Tensor]) -> None:
        for n, p in layer.base_layer.named_parameters():
            p.copy_(undo[n])
