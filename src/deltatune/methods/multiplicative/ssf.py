"""SSF: Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning (Lian et al.,
arXiv:2210.08823):

    y = gamma * out + beta,   gamma, beta: (d_out,) per output channel,

applied to the output of a linear, conv or normalisation layer; P = 2 d_out.

Checked in the official code (dongzelian/SSF, models/vision_transformer.py):
- init_ssf_scale_shift: scale ~ N(1, 0.02), shift ~ N(0, 0.02) (`init="paper"` here).
- placement: after the qkv and proj linears, after fc1 and fc2, after norm1/norm2/the final norm and after the
  patch-embedding conv (ssf_ada scales the last dim, or dim 1 of a 4-D conv map).
Default `init="identity"` (gamma=1, beta=0): the adapted model equals the base at step 0, as every other
deltatune method; unlike LoRA's zero factor there is no symmetry to break (d y/d gamma = out, d y/d beta = 1
are non-zero at 1/0), so the paper's noise only perturbs the pretrained function.

Merge into the wrapped layer: W' = diag(gamma) W, b' = gamma * b + beta. A layer without a bias (an
Embedding, bias=False, RMSNorm) cannot hold beta: merge raises. Unmerge restores b exactly (kept) and
divides W by gamma (float tolerance; a zero gamma keeps a copy of W instead).
Norm layers (LayerNorm/RMSNorm-like, per-channel weight over the last dim, kind None) are supported by the
delta; merge into them is allowed for nn.LayerNorm only, whose forward is known to be norm(x) * w + b.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank.lora import adapter_dtype
from .ia3 import merge_rows, unmerge_rows

PAPER_STD = 0.02  # dongzelian/SSF init_ssf_scale_shift


class SSFConfig(DeltaConfig):
    init: Literal["identity", "paper"] = Field(
        "identity", description="'identity': gamma=1, beta=0 (exact base at step 0); "
        "'paper': gamma ~ N(1, 0.02), beta ~ N(0, 0.02) as the official code")


def channels(layer: DeltaLayer) -> int:
    if layer.kind is not None:
        return layer.matrix().shape[0]
    w = getattr(layer.base_layer, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 1:
        raise ValueError(f"SSF needs a weight layer or a per-channel (1-D weight) module such as LayerNorm; "
                         f"'{type(layer.base_layer).__name__}' has neither")
    return w.numel()


@register("ssf", config=SSFConfig, family="multiplicative", formula="2 d_out", paper="arXiv:2210.08823",
          summary="SSF: per-channel scale and shift of a layer's output, gamma * out + beta")
class SSF(Delta):
    additive = False  # gamma rescales the whole output
    any_module = True  # also norms (LayerNorm, RMSNorm): any module with a per-channel weight

    def __init__(self, config: SSFConfig, layer: DeltaLayer, initialize: bool = True, shared: Any = None):
        super().__init__(config, layer)
        d_out = channels(layer)  # checks the layer first
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.ssf_scale = nn.Parameter(torch.ones(d_out, **kw))  # gamma
        self.ssf_shift = nn.Parameter(torch.zeros(d_out, **kw))  # beta
        if initialize and config.init == "paper":
            with torch.no_grad():
                nn.init.normal_(self.ssf_scale, mean=1.0, std=PAPER_STD)
                nn.init.normal_(self.ssf_shift, std=PAPER_STD)

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor) -> Tensor:
        if layer.kind is None:  # norms: channels are the last dim
            return (out * self.ssf_scale + self.ssf_shift).to(out.dtype)
        g, b = layer.per_channel(self.ssf_scale, out), layer.per_channel(self.ssf_shift, out)
        return (out * g + b).to(out.dtype)

    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> Any:
        base = layer.base_layer
        if getattr(base, "bias", None) is None:
            raise ValueError(f"cannot merge SSF into '{type(base).__name__}': it has no bias to hold the shift beta; "
                             "keep the adapter unmerged (or build the layer with a bias)")
        if layer.kind is None and not isinstance(base, nn.LayerNorm):
            raise ValueError(f"cannot merge SSF into '{type(base).__name__}': only nn.LayerNorm among norm "
                             "modules has a known weight/bias forward; keep the adapter unmerged")
        return merge_rows(layer, self.ssf_scale, self.ssf_shift)

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, undo: Any) -> None:
        unmerge_rows(layer, self.ssf_scale, undo)
