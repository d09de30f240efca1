"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., arXiv:2402.09353), Eq. (5):

    W' = m · V / ||V||,   V = W0 + s · B A,

with ||·|| the L2 norm of each output channel (a row of the d_out x d_in matrix; PEFT's and NVlabs'
orientation) and m (d_out) starting at ||W0||, so W' = W0 at step 0. As in the paper (Sec. 4.3) the
norm is a constant in backward. It is computed from W0, A and B without forming V:
    ||V_i||^2 = ||W0_i||^2 + 2s <B_i, (W0 A^T)_i> + s^2 <B_i, (B A A^T)_i>.
On a stock linear layer (without dropout in training) the forward is g · (W0 x + b + s B A x) + (1 - g) b
with g = m / ||V||: the engine's fused low-rank linear, then one multiply-add, so DoRA costs one
elementwise pass more than LoRA. On a bf16/fp16 base it is z + (g - 1)(z - b), z = W0 x + b + s B A x:
g near 1 would round to 1 in bf16 (whose step above 1 is 2^-7), g - 1 keeps its digits.
On nn.Embedding (as PEFT) the matrix is the (dim x vocab) map from one-hot ids, so m and the norm have one entry
per embedding dimension. Grouped convolutions are refused (see __init__).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...engine.fused import LowRank, lowrank_linear
from ...engine.kinds import LINEAR
from ...engine.layer import DeltaLayer
from ...engine.registry import register
from .lora import LoRA, LoRAConfig


class DoRAConfig(LoRAConfig):
    pass


@register("dora", config=DoRAConfig, family="low-rank", formula="r(d_in + d_out) + d_out",
          paper="arXiv:2402.09353", summary="DoRA: magnitude m times the direction of W0 + (alpha/r) B A")
class DoRA(LoRA):
    additive = False
    def __init__(self, config: DoRAConfig, layer: DeltaLayer, initialize: bool = True):
        if getattr(layer.base_layer, "groups", 1) != 1:
            # ||W0 + ΔW|| would mix the grouped W0 with a dense ΔW; PEFT 0.21 takes the norm of a reshaped B A
            # instead, which is not the adapted weight's, so no exact match with PEFT exists
            raise ValueError(f"DoRA cannot adapt a grouped convolution (groups={layer.base_layer.groups}): PEFT's "
                             "norm there is not the adapted weight's; use LoRA on it or exclude it")
        super().__init__(config, layer, initialize)
        # At init ΔW = 0 (B = 0, or PiSSA's B A - B0 A0 = 0), so the effective weight is W0.
        norm = torch.linalg.vector_norm(layer.matrix().detach().to(self.lora_A.dtype), dim=1)
        self.lora_magnitude = nn.Parameter(norm if initialize else torch.zeros_like(norm))
        self._stock_linear = layer.kind is LINEAR and layer.stock

    def _fused(self) -> bool:
        return self._stock_linear and not (self.training and self.config.dropout > 0)

    @property
    def uses_base_output(self) -> bool:  # the fused form computes the base output itself
        return not self._fused()

    @torch.no_grad()
    def weight_norm(self, layer: DeltaLayer) -> Tensor:
        """Row norms of V = W + s B A, (d_out,), never forming V."""
        (A, B), s = self.factors(), self.scale
        W = layer.matrix().to(A.dtype)
        sq = (torch.linalg.vector_norm(W, dim=1).square()
              + 2 * s * (B * (W @ A.t())).sum(1)
              + s * s * ((B @ (A @ A.t())) * B).sum(1))
        return sq.clamp_min(0).sqrt()

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor | None) -> Tensor:
        g = self.lora_magnitude / self.weight_norm(layer)  # m / ||V||, (d_out,)
        term = LowRank(*self.factors(), self.scale)
        if self._fused() and term.fuses_with(x):
            bias = layer.base_layer.bias
            z = lowrank_linear(x, layer.weight, bias, [term])  # W0 x + b + s B A x
            if z.dtype == g.dtype:
                y = z * g if bias is None else torch.addcmul(bias * (1 - g), z, g)
            else:  # a bf16/fp16 base: g near 1 would round to 1 there (bf16 steps by 2^-7), g - 1 does not
                y = torch.addcmul(z, z if bias is None else z - bias, (g - 1).to(z.dtype))
            return y if self.lora_bias is None else y + self.lora_bias.to(y.dtype)
        if out is None:
            out = layer.base_layer(x)
        g = layer.per_channel(g, out)
        dx = self.dropped(x)
        if (self.training and not isinstance(self.dropout, nn.Identity)) or not layer.stock:
            # The base term must see the same dropped input as the low-rank term (as PEFT does); a custom
            # forward's output need not be W0 x + b, so its linear part is computed.
            base = layer.apply_matrix(dx, layer.matrix().to(dx.dtype))
        else:
            bias = getattr(layer.base_layer, "bias", None)
            base = out if bias is None else out - layer.per_channel(bias, out)  # W0 x, reused
        y = (g - 1) * base + g * self.lora_out(layer, dx)
        if self.lora_bias is not None:
            y = y + layer.per_channel(self.lora_bias, y)
        return out + y.to(out.dtype)

    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> Tensor:
        norm = self.weight_norm(layer)
        V = layer.matrix() + self.delta_weight(layer).to(layer.weight.dtype)
        layer.weight.copy_(layer.kind.to_weight((self.lora_magnitude / norm)[:, None] * V, layer.weight))
        if self.lora_bias is not None:
            layer.base_layer.bias += self.lora_bias
        return norm

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, norm: Tensor) -> None:
        W = (norm / self.lora_magnitude)[:, None] * layer.matrix() - self.delta_weight(layer)
        layer.weight.copy_(layer.kind.to_weight(W.to(layer.weight.dtype), layer.weight))
        if self.lora_bias is not None:
            layer.base_layer.bias -= self.lora_bias
