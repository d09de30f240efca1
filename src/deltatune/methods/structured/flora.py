"""FLoRA: a Tucker-decomposed weight delta that keeps the parameter tensor's N-D topology.

*FLoRA: Low-Rank Core Space for N-dimension* (Si et al., arXiv:2405.14739):

    ΔW = s · G ×_1 U_1 ×_2 U_2 … ×_N U_N,

with one factor matrix U_k (n_k x r_k) per mode of the weight tensor and a small core G (r_1 x … x r_N).
Linear (and Embedding / GPT-2 Conv1D, as a d_out x d_in matrix): ΔW = s · U_out G U_in^T,
P = r_out r_in + r_out d_out + r_in d_in. Conv (out, in, k_1, ...): a (2 + #kernel dims)-D core and a
factor per mode, P = Π r_k + Σ r_k n_k.

Checked against SJTU-DeepVisionLab/FLoRA flora/layers.py (FLoRALayer, Linear, Conv2D, Conv3D):
- kernel modes ARE factored: Conv2D uses N=4 with dims [in, out, kh, kw] and one factor per mode (the
  example uses r=[16, 16, 2, 2]); Conv3D N=5. Mode order here is (out, in, kernel...), the weight's layout.
- init: G = 0 (so ΔW = 0 at step 0) and every U_k kaiming_normal_(a=sqrt(3)) on its (n_k, r_k) matrix,
  i.e. N(0, 1/(2 r_k)).
- scaling: a plain constant `scale` multiplying ΔW (FLoRALayer default 1.0; the example uses 4.0), no /r.
- dropout on the adapter's input (drop_rate); the official forward forms ΔW and runs one F.linear/F.conv.
Defaults here: r = 8 for the channel modes (FLoRALayer's default [8, 8]), r_kernel = 2 (the example).
Departures: a mode's rank is capped at the mode's size (a larger Tucker rank adds parameters, never
expressiveness), so 1x1 kernels get rank 1; when the capped adapter still holds as many parameters as the
layer (r=10000, say) a warning names the largest r below that. The official Embedding variant (one vector
added to every token) is not reproduced, an Embedding is adapted as its dim x num matrix like a linear layer.

Forward, never forming the d_out x d_in delta: without kernel modes x -> U_in^T -> G -> U_out (three
thin products); for a conv, the core is lifted to the input side, K = G ×_in U_in ×_k U_k (r_out x in x k…),
run through the layer's own conv (stride, padding, dilation kept), then U_out as a 1x1 mix. Grouped
convs (ΔW is out x in/groups x k…) form the small kernel delta and run one conv.
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import CONV
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank.lora import adapter_dtype

logger = logging.getLogger(__name__)


class FLoRAConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="Tucker rank of the output- and input-channel modes")
    r_kernel: int = Field(2, ge=1, description="Tucker rank of each conv kernel mode (capped at the kernel size)")
    scale: float = Field(1.0, gt=0, description="constant s multiplying ΔW")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")


def mode_ranks(modes: tuple[int, ...], r: int, r_kernel: int) -> list[int]:
    """Each mode's Tucker rank: r for the channel modes, r_kernel for kernel modes, capped at the mode's size."""
    return [min(r, n) for n in modes[:2]] + [min(r_kernel, n) for n in modes[2:]]


def parameter_count(modes: tuple[int, ...], r: int, r_kernel: int) -> int:
    """P = prod(r_k) + sum(r_k n_k): the core and one factor per mode."""
    ranks = mode_ranks(modes, r, r_kernel)
    return math.prod(ranks) + sum(k * n for k, n in zip(ranks, modes))


def check_rank(modes: tuple[int, ...], r: int, r_kernel: int, layer: DeltaLayer) -> None:
    """Warn, as PEFT does for LoRA ranks above the smaller side, when the (capped) adapter holds at least as
    many parameters as the layer: a rank such as r=10000 would otherwise be capped silently to a full Tucker."""
    size, count = math.prod(modes), parameter_count(modes, r, r_kernel)
    if count < size:
        return
    fits = [k for k in range(1, max(modes[:2]) + 1) if parameter_count(modes, k, r_kernel) < size]
    advice = f"use r <= {fits[-1]} to stay below it" if fits else "FLoRA cannot be smaller than this layer"
    capped = f" (capped at the mode sizes {mode_ranks(modes, r, r_kernel)})" if r > min(modes[:2]) else ""
    logger.warning("flora r=%d%s on %s with modes %s holds %s parameters, as many as the layer's %s or more; %s",
                   r, capped, type(layer.base_layer).__name__, modes, f"{count:,}", f"{size:,}", advice)


def tucker_full(G: Tensor, factors: list[Tensor]) -> Tensor:
    """G ×_1 U_1 … ×_N U_N: each tensordot contracts mode 0 and appends the new one, so order is kept."""
    T = G
    for U in factors:  # U: (n_k, r_k)
        T = torch.tensordot(T, U, dims=([0], [1]))
    return T  # (n_1, ..., n_N)


@register("flora", config=FLoRAConfig, family="structured",
          formula="r_out*r_in + r_out*d_out + r_in*d_in (conv: prod(r_k) + sum(r_k*n_k) over out, in, kernel modes)",
          paper="arXiv:2405.14739", summary="FLoRA: Tucker ΔW = s·G ×_k U_k keeping the weight's N-D shape")
class FLoRA(Delta):
    def __init__(self, config: FLoRAConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        d_out, d_in = layer.matrix().shape
        # modes (out, in, k_1, ...): the conv weight's own shape (in = in_channels / groups), else the matrix
        self.modes = tuple(layer.weight.shape) if layer.kind is CONV else (d_out, d_in)
        check_rank(self.modes, config.r, config.r_kernel, layer)
        ranks = mode_ranks(self.modes, config.r, config.r_kernel)
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.flora_G = nn.Parameter(torch.zeros(*ranks, **kw))  # (r_out, r_in, r_k...)
        self.flora_U_out = nn.Parameter(torch.zeros(self.modes[0], ranks[0], **kw))  # (d_out, r_out)
        self.flora_U_in = nn.Parameter(torch.zeros(self.modes[1], ranks[1], **kw))  # (in, r_in)
        self.flora_U_kernel = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, rk, **kw)) for n, rk in zip(self.modes[2:], ranks[2:])])  # (k_j, r_kj)
        self.grouped = getattr(layer.base_layer, "groups", 1) != 1
        if initialize:
            for U in self.factors():  # G stays 0, so ΔW = 0 at step 0
                nn.init.kaiming_normal_(U, a=math.sqrt(3))

    def factors(self) -> list[Tensor]:
        return [self.flora_U_out, self.flora_U_in, *self.flora_U_kernel]

    def delta_tensor(self) -> Tensor:
        """ΔW in the weight's N-D layout, (out, in, k...) or (d_out, d_in)."""
        return self.config.scale * tucker_full(self.flora_G, self.factors())

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.delta_tensor().flatten(1)  # (d_out, d_in)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        if self.grouped:  # the core cannot be lifted through a grouped conv: one conv with the small kernel
            return super().change(layer, x)
        if len(self.modes) == 2:
            h = layer.apply_matrix(x, self.flora_U_in.t())  # (…, r_in)
            h = layer.mix(h, self.flora_G)  # (…, r_out)
        else:
            # r_out moved last is left uncontracted and comes back first: K is (r_out, in, k...)
            K = tucker_full(self.flora_G.movedim(0, -1), self.factors()[1:])
            h = layer.apply_matrix(x, K.flatten(1))  # (B, r_out, spatial...)
        return layer.mix(h, self.flora_U_out) * self.config.scale
