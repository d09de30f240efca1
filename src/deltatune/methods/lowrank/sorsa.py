"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large Language Models
(Cao, arXiv:2409.00055).

    W0 = U S V^T,  W_p = U_p diag(S_p) V_p^T (top r, trainable),  W_r = W0 - s W_p0 (frozen),
    y = W_r x + s U_p diag(S_p) V_p^T x,
    L_reg = gamma/lr · mean over the adapter's 2L factors of  ||U_p^T U_p - I||_F  and  ||V_p^T V_p - I||_F.

Checked against Gunale0926/SORSA (sorsalib/src/sorsa/layer.py, trainer.py, run.py, scripts/train_sorsa.sh):
- init: torch.linalg.svd of W0, U_p, S_p, V_p^T = top-r triplets (exact SVD; `svd_niter` adds a fast variant);
  scale s = alpha/r, or 1 when alpha is None (the official default); W_r = W0 - s U_p S_p V_p^T.
- regulariser (calc_ortho): the plain Frobenius norm (NOT squared) of U^T U - I and V^T V - I (V^T as the
  r x d_in factor: V^T V = I_r), summed over all SORSA factors and divided by their count (2 per layer).
  Being unsquared, its gradient has unit size however close U, V are to orthonormal (0 exactly at it).
- it is not a separate optimizer step: the trainer backpropagates (gamma / lr) · L_reg into the same
  gradients after the task gradient was clipped, then takes one optimizer step.
- defaults: gamma 4e-4 (run.py; the trainer argument defaults to 0), lr 3e-5 (train_sorsa.sh, Llama 2 7B, r=128).
Here `regularizer` returns (gamma/lr) · (||.||_F + ||.||_F) / (2L), so DeltaModel.regularization_loss()
equals the official term; set `lr` to the optimizer's learning rate. Deviation: the deltatune trainer adds it
to the loss before gradient clipping, so it is clipped together with the task gradient.
As for PiSSA in lora.py, W0 is never modified: the initial factors stay frozen buffers and the delta is
s(U diag(S) V^T - U0 diag(S0) V0^T), so the output at init equals the base and merge is additive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import register
from ._sharing import LayerShared
from ._svd import SVDConfig, top_svd
from .lora import adapter_dtype, check_rank


class SORSAConfig(SVDConfig):
    alpha: float | None = Field(None, gt=0, description="scale s = alpha/r; None: s = 1 (official default)")
    gamma: float = Field(4e-4, ge=0, description="orthonormal regulariser weight (official run.py default)")
    lr: float = Field(3e-5, gt=0, description="the optimizer's learning rate: the official trainer weights "
                                              "the regulariser by gamma/lr")


@register("sorsa", config=SORSAConfig, family="low-rank", formula="r(d_in + d_out + 1)",
          paper="arXiv:2409.00055",
          summary="SORSA: trainable top-r SVD triplets of W0 with an orthonormality regulariser on U, V")
class SORSA(Delta):
    def __init__(self, config: SORSAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, shared=shared)
        d_out, d_in = check_rank(config.r, layer, self.method)
        r, kw = config.r, {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = 1.0 if config.alpha is None else config.alpha / r
        self.sorsa_U = nn.Parameter(torch.zeros(d_out, r, **kw))  # (d_out, r)
        self.sorsa_S = nn.Parameter(torch.zeros(r, **kw))  # (r,)
        self.sorsa_Vh = nn.Parameter(torch.zeros(r, d_in, **kw))  # (r, d_in)
        for name, p in (("U", self.sorsa_U), ("S", self.sorsa_S), ("Vh", self.sorsa_Vh)):
            self.register_buffer(f"sorsa_{name}0", torch.zeros_like(p))  # frozen initial factors
        if initialize:
            with torch.no_grad():
                for t, v in zip(("U", "S", "Vh"), top_svd(layer, r, config.svd_niter)):
                    getattr(self, f"sorsa_{t}").copy_(v)
                    getattr(self, f"sorsa_{t}0").copy_(v)

    @classmethod
    def build_shared(cls, config: SORSAConfig, layers: Sequence[DeltaLayer]) -> nn.Module:
        return LayerShared(layers)  # no tensors: the layer count, for the official mean

    def _product(self, suffix: str) -> tuple[Tensor, Tensor]:
        """(diag(S) V^T (r, d_in), U (d_out, r)) of the trainable ('') or initial ('0') triplets."""
        U, S, Vh = (getattr(self, f"sorsa_{t}{suffix}") for t in ("U", "S", "Vh"))
        return S[:, None] * Vh, U

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        (A, B), (A0, B0) = self._product(""), self._product("0")
        return self.scale * (B @ A - B0 @ A0)  # (d_out, d_in); the same op twice, so exactly 0 at init

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        y = [layer.mix(layer.apply_matrix(x, A), B) for A, B in (self._product(""), self._product("0"))]
        return self.scale * (y[0] - y[1])

    def orthonormality(self) -> Tensor:
        """||U^T U - I||_F + ||V^T V - I||_F (V^T is the r x d_in factor), unweighted."""
        eye = torch.eye(self.config.r, device=self.sorsa_U.device, dtype=self.sorsa_U.dtype)
        U, Vh = self.sorsa_U, self.sorsa_Vh
        return torch.linalg.matrix_norm(U.t() @ U - eye) + torch.linalg.matrix_norm(Vh @ Vh.t() - eye)

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        if self.config.gamma == 0:
            return None
        n = self.shared.layer_count if self.shared is not None else 1
        return self.config.gamma / self.config.lr * self.orthonormality() / (2 * n)
