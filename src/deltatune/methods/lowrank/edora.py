"""EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value Decomposition
(Nasiri & Garraghan, arXiv:2501.12067).

    W' = m · V / ||V||,   V = W0 + s · B R A,

DoRA's magnitude/direction split (dora.py) over LoRA-XS's update (lora_xs.py): B = U_r, A = S_r V_r^T frozen
from W0's truncated SVD, R (r x r) and m (d_out) trained; ||·|| the per-output-row L2 norm, a constant in
backward (DoRA Sec. 4.3).
Checked against Hamid-Nasiri/EDoRA (utils/initialization_utils.py, latent_utils.py forward_edora): the same
SVD factors and R ~ N(0, 1e-5) as LoRA-XS, PEFT's DoRA magnitude (created before the SVD factors replace
A, B, so m = ||W0|| per row), the norm detached, and the forward (m/||V|| - 1) W0 x + (m/||V||) s B R A x.
Since B R A = B (R A), DoRA's row norm without forming V applies with A' = R A; its forward, merge and
unmerge are reused as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ...engine.kinds import EMBEDDING, LINEAR
from ...engine.layer import DeltaLayer
from ...engine.registry import register
from .dora import DoRA
from .lora_xs import LoRAXS, LoRAXSConfig


class EDoRAConfig(LoRAXSConfig):
    pass


@register("edora", config=EDoRAConfig, family="low-rank", formula="r^2 + d_out",
          paper="arXiv:2501.12067",
          summary="EDoRA: DoRA's magnitude times the direction of W0 + (alpha/r) U_r R S_r V_r^T, R and m trained")
class EDoRA(LoRAXS):
    additive = False
    # DoRA's methods only use factors(), lora_out(), scale, lora_magnitude and lora_bias
    weight_norm = DoRA.weight_norm
    _fused = DoRA._fused
    uses_base_output = DoRA.uses_base_output
    forward = DoRA.forward
    merge = DoRA.merge
    unmerge = DoRA.unmerge

    def __init__(self, config: EDoRAConfig, layer: DeltaLayer, initialize: bool = True):
        if layer.kind is EMBEDDING:
            raise ValueError("EDoRA does not adapt nn.Embedding layers; exclude them or use LoRA-XS there")
        super().__init__(config, layer, initialize)
        norm = torch.linalg.vector_norm(layer.matrix().detach().to(self.lora_R.dtype), dim=1)  # (d_out,)
        self.lora_magnitude = nn.Parameter(norm if initialize else torch.zeros_like(norm))
        self._stock_linear = layer.kind is LINEAR and layer.stock
