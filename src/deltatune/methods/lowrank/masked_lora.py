"""Mask-consistent LoRA for retraining a pruned model: PERP's MaskLoRA.

*PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs* (Zimmer et al., arXiv:2312.15230):

    W' = W0 + (s · B A) ⊙ M,   M = (W0 != 0),   s = alpha / r

so the update never touches a pruned weight: merging leaves every zero of W0 at exactly zero. Checked
against ZIB-IOL/PERP customLayers.py (MaskLoRALayer): the same masked product, LoRA's init (B = 0), and a
forward that forms the masked ΔW (the Hadamard product has no low-rank shortcut). PERP recomputes
M = (W != 0) from the frozen weight at each call; here M is captured once at injection as a bool buffer,
saved with the adapter, so a loaded adapter keeps the mask it was trained with.

Speed: the masked ΔW has to be formed, so when nothing else needs the base output (no dropout, first or only
delta on the layer) the layer runs once with W0 + ΔW instead of twice (W0 x plus ΔW x): one matmul forward
and one input-gradient matmul backward instead of two each.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import register
from .lora import LoRA, LoRAConfig


class MaskedLoRAConfig(LoRAConfig):
    pass


@register("masked_lora", config=MaskedLoRAConfig, family="low-rank", formula="r(d_in + d_out)",
          paper="arXiv:2312.15230",
          summary="PERP's MaskLoRA: (alpha/r) B A times W0's non-zero mask, so merging keeps pruned weights at 0")
class MaskedLoRA(LoRA):
    def __init__(self, config: MaskedLoRAConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer, initialize)
        self.register_buffer("lora_mask", layer.matrix().detach() != 0)  # (d_out, d_in); a loaded state overwrites it
        self._substitutes = layer.takes_substitute_weight  # else the layer's own output plus the masked ΔW x

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return super().delta_weight(layer) * self.lora_mask  # (d_out, d_in), zero wherever W0 is

    @property
    def uses_base_output(self) -> bool:  # the engine skips the base forward when False
        return not self._substitutes or (self.training and not isinstance(self.dropout, nn.Identity))

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor | None) -> Tensor:
        if out is None:  # fused: one pass of the layer's own forward with W0 + ΔW (and b + Δb)
            w = layer.weight
            params = {"weight": w + layer.kind.to_weight(self.delta_weight(layer).to(w.dtype), w)}
            if self.lora_bias is not None:
                params["bias"] = layer.base_layer.bias + self.lora_bias.to(w.dtype)
            return functional_call(layer.base_layer, params, (x,))
        return super().forward(layer, x, out)

    change = Delta.change  # the masked ΔW (and Δb) through the layer's own op
