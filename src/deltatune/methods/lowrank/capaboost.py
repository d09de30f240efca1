"""CapaBoost on LoRA: d parallel masked copies of one shared LoRA pair.

*Increasing Model Capacity for Free: A Simple Strategy for Parameter Efficient Fine-tuning*
(Song, Zhao, Majumder, Lin; ICLR 2024, arXiv:2407.01320). For a PEFT weight W_s and fixed random binary
masks M_i, ΔW = Σ_{i≤d} M_i ⊙ W_s; for LoRA the masks apply to both factors:

    ΔW = s · Σ_{i≤d} (M_i^B ⊙ B)(M_i^A ⊙ A),   s = alpha / r,

so P = r(d_in + d_out), LoRA's, while rank(ΔW) can reach min(d·r, d_in, d_out).

[verify] items, checked in LINs-lab/CapaBoost src/transformers/adapters/lora.py and configuration.py:
- masks on both factors: yes, `lora_A_masks[i]`, `lora_B_masks[i]` per copy i, forward
  Σ_i x (M_i^A⊙A)(M_i^B⊙B) times alpha/r; all copies are tied to one dense A and one dense B (gradients
  of the copies are masked and summed, which is what autograd gives here);
- defaults (LoRA config): d = num_layer = 2, density = 0.5; scripts use r=8, alpha=16;
- masks: "equal_per_layer", exactly int(n·density) kept entries per factor and copy, drawn without
  replacement from one np.random.RandomState(0) in layer order.
Here each layer draws its masks from its own generator seeded by (seed, layer position), so the masks are
non-persistent buffers regenerated at load (nothing extra stored, as the paper claims) and fixed for
training. Departure: the official code leaves copies i ≥ 1 of B at nn.Linear's random init until the first
step's tie; here all copies share B = 0, so the output at init equals the base.
Forward: the d copies are stacked into one rank-d·r pair, one matmul for A and one for B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ._sharing import LayerShared, generator
from .lora import LoRA, LoRAConfig


class CapaBoostConfig(LoRAConfig):
    d: int = Field(2, ge=1, description="number of parallel masked copies of the shared LoRA pair")
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of entries each mask keeps")
    seed: int = Field(0, ge=0, description="seed of the fixed random masks (regenerated at load)")

    @field_validator("init")
    @classmethod
    def _no_pissa(cls, v: str) -> str:
        if v not in ("kaiming", "gaussian"):
            raise ValueError(f"CapaBoost init must be 'kaiming' or 'gaussian', not '{v}' (PiSSA is not masked)")
        return v


def random_masks(d: int, shape: tuple[int, int], density: float, gen: torch.Generator) -> Tensor:
    """(d, *shape) bool masks, each keeping exactly int(n·density) (at least one) random entries."""
    n = shape[0] * shape[1]
    keep = max(1, int(n * density))
    masks = torch.zeros(d, n, dtype=torch.bool)
    for i in range(d):
        masks[i, torch.randperm(n, generator=gen)[:keep]] = True
    return masks.view(d, *shape)


@register("capaboost", config=CapaBoostConfig, family="low-rank", formula="r(d_in + d_out)",
          paper="arXiv:2407.01320",
          summary="CapaBoost-LoRA: sum of d fixed random masks of one shared B, A pair; rank up to d·r at LoRA's P")
class CapaBoost(LoRA):
    def __init__(self, config: CapaBoostConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: LayerShared | None = None):
        super().__init__(config, layer, initialize)
        self.__dict__["shared"] = shared
        gen = generator(config.seed, shared.position(layer))
        dev = layer.weight.device
        r, d_out, d_in = config.r, self.lora_B.shape[0], self.lora_A.shape[1]
        self.register_buffer("capa_mask_A", random_masks(config.d, (r, d_in), config.density, gen).to(dev),
                             persistent=False)  # (d, r, d_in)
        self.register_buffer("capa_mask_B", random_masks(config.d, (d_out, r), config.density, gen).to(dev),
                             persistent=False)  # (d, d_out, r)

    @classmethod
    def build_shared(cls, config: CapaBoostConfig, layers: Sequence[DeltaLayer]) -> LayerShared:
        return LayerShared(layers)  # no tensors: only each layer's position, the key of its masks

    def factors(self) -> tuple[Tensor, Tensor]:
        """The d masked copies stacked as one pair: A (d·r, d_in), B (d_out, d·r), ΔW = s · B A."""
        d, r = self.config.d, self.config.r
        A = (self.capa_mask_A * self.lora_A).reshape(d * r, -1)  # (d, r, d_in) -> (d·r, d_in)
        B = (self.capa_mask_B * self.lora_B).permute(1, 0, 2).reshape(self.lora_B.shape[0], d * r)  # (d_out, d·r)
        return A, B
