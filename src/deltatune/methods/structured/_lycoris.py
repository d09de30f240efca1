"""Pieces LoHa and LoKr share (PEFT's LyCORIS family): the training-time dropouts and the Tucker factor.

The dropouts act in training only, so eval forwards and merges are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...engine.layer import Delta, DeltaLayer


def module_dropped(delta: Delta, p: float) -> bool:
    """module_dropout: in training, skip the whole delta for this forward with probability p."""
    return delta.training and p > 0 and bool(torch.rand(()) < p)


def drop_ranks(delta: Delta, layer: DeltaLayer, y: Tensor, p: float, scale: bool) -> Tensor:
    """rank_dropout on y = ΔW x: in training, zero each output channel (a row of ΔW) with probability p, one mask
    per forward; `scale` divides the kept ones by the kept fraction (PEFT: drop / drop.mean())."""
    if not (delta.training and p > 0):
        return y
    keep = (torch.rand(y.shape[layer.kind.channel_dim], device=y.device) > p).to(y.dtype)  # (d_out,)
    if scale:
        keep = keep / keep.mean().clamp_min(1 / keep.numel())  # all dropped: stays 0 (PEFT would give NaN)
    return y * layer.per_channel(keep, y)


def factor_matrix(t: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """One rank-r factor as a (d_out, d_in) matrix: a @ b, or the Tucker form with core t (also LoKr's)."""
    if t is None:
        return a @ b
    return torch.einsum("ijkl,jq,ip->pqkl", t, b, a).flatten(1)  # (c_out, c_in, kh, kw) -> (c_out, c_in*kh*kw)
