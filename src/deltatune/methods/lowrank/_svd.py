"""SVD-of-W0 machinery shared by SORSA, LoRA-XS, EDoRA (and anything else that starts from W0's top-r triplets)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ...engine.layer import DeltaLayer
from ...engine.registry import DeltaConfig


class SVDConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="number of principal singular triplets of W0 used")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    svd_niter: int | None = Field(None, ge=1, description="None: exact SVD; K: randomized SVD with K power iterations")


@torch.no_grad()
def top_svd(layer: DeltaLayer, r: int, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r (d_out, r), S_r (r,), Vh_r (r, d_in)) of the frozen W0, computed in float32."""
    W = layer.matrix().detach().float()  # (d_out, d_in); conv kernels flattened
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return U, S, V.t()
