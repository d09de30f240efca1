"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., arXiv:2405.17604).

    y = W0 x + s · B R A x,   W0 ≈ U_r S_r V_r^T,   B = U_r (frozen),  A = S_r V_r^T (frozen),  R (r x r) trained,
    s = alpha / r.

Checked against MohammadrezaBanaei/LoRA-XS (utils/initialization_utils.py, svd_utils.py, latent_utils.py,
main_glue.py): sklearn TruncatedSVD is fitted on W0^T; its transform (U S of W0^T) becomes lora_A, its
components_ (V^T of W0^T) lora_B. In W0's own orientation that is B = U_r (orthonormal columns, no S) and
A = S_r V_r^T: the singular values sit on the input side, not B = U_r S_r as METHODS.md guessed.
R is an nn.Linear(r, r) initialised N(0, sigma=1e-5) (init_module_weights), so ΔW is tiny but not zero at
step 0; `init_std=0` starts at exactly zero. The scale is PEFT's lora_alpha / r (main_glue default alpha=16).
The official SVD is randomized (n_iter=10); here exact by default, `svd_niter` for the fast variant.
B and A are persistent buffers: they are saved, so a loaded adapter does not depend on recomputing the SVD.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import register
from ._svd import SVDConfig, top_svd
from .lora import adapter_dtype, check_rank


class LoRAXSConfig(SVDConfig):
    alpha: float = Field(16.0, gt=0, description="scale s = alpha/r (official main_glue default 16)")
    init_std: float = Field(1e-5, ge=0, description="std of R's Gaussian init (official 1e-5); 0: R = 0")


@register("lora_xs", config=LoRAXSConfig, family="low-rank", formula="r^2",
          paper="arXiv:2405.17604",
          summary="LoRA-XS: trainable r x r R between frozen SVD factors of W0, (alpha/r) U_r R S_r V_r^T")
class LoRAXS(Delta):
    def __init__(self, config: LoRAXSConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        d_out, d_in = check_rank(config.r, layer, self.method)
        r, kw = config.r, {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = config.alpha / r
        self.register_buffer("lora_A", torch.zeros(r, d_in, **kw))  # (r, d_in) = S_r V_r^T
        self.register_buffer("lora_B", torch.zeros(d_out, r, **kw))  # (d_out, r) = U_r
        self.lora_R = nn.Parameter(torch.zeros(r, r, **kw))
        self.lora_bias = None  # DoRA's forward (borrowed by EDoRA) looks for it
        if initialize:
            with torch.no_grad():
                U, S, Vh = top_svd(layer, r, config.svd_niter)
                self.lora_B.copy_(U)
                self.lora_A.copy_(S[:, None] * Vh)
                if config.init_std > 0:
                    nn.init.normal_(self.lora_R, std=config.init_std)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A', B) with ΔW = s · B A', A' = R A (r, d_in)."""
        return self.lora_R @ self.lora_A, self.lora_B

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_R @ self.lora_A)  # (d_out, d_in)

    def lora_out(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        """s · B R A x in activation space: A x (r channels), then R, then B."""
        return layer.mix(layer.mix(layer.apply_matrix(x, self.lora_A), self.lora_R), self.lora_B) * self.scale

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        return self.lora_out(layer, x)
