"""LoRETTA: LoRA factors and bottleneck-adapter projections stored as tensor trains.

*LoRETTA: Low-Rank Economic Tensor-Train Adaptation for Ultra-Low-Parameter Fine-Tuning of LLMs*
(Yang et al., arXiv:2402.11417). A TT matrix M (p x q) is a reshape of a tensor with modes n_1..n_K,
Π n_k = p·q, stored as cores C_k (t_{k-1} x n_k x t_k), t_0 = t_K = 1, t_k = tensor_rank:
    M = reshape(C_1 ×¹ C_2 ×¹ … ×¹ C_K, (p, q)),   P(M) = Σ_k t_{k-1} n_k t_k.

loretta_rep: y = W0 x + (alpha/r) · B A x, with A^T (d_in x r) and B^T (r x d_out) each a TT matrix.
loretta_adp: a serial bottleneck adapter f(h) = h + s · up(act(down(h))) whose down (d x m) and up
(m x d) projections are TT matrices with biases; placed after the layer (h = its output, d = d_out) or
before it (h = its input, d = d_in, then W0 f(x)). It changes activations: not mergeable.

Checked against yifanycc/loretta (loretta/loretta/tuners/loretta_rep.py, loretta_adp.py,
tensor_layers/layers.py, low_rank_tensors.py, utils/tensor_util.py):
- _rep is NOT a TT of ΔW itself (the catalogue's "Π n_k = d_out·d_in"): `Linear` builds lora_A (d_in -> r) and
  lora_B (r -> d_out) as `TensorizedLinear_module`s, i.e. TT tensors over a shape with Π n_k = d_in·r
  (and r·d_out), contracted and reshaped to (in, out) and applied as x @ M; scaling lora_alpha / r.
  This matches the paper's count for RoBERTa-base (~1K vs LoRA's 12K per 768x768 layer, r=8, rank 5).
- _adp (`Linear` in loretta_adp.py): 'output_adapter' h + s·up(act(down(h))) after the layer (BERT/RoBERTa
  'dense', OPT fc2, LLaMA down_proj) or 'mh_adapter' W(x + s·up(act(down(x)))) before it (OPT fc1, LLaMA
  gate/up_proj); TT projections carry biases (uniform ±1/sqrt(out)); scaling 1.0; README: bottleneck 64, relu.
- ranks: tensor_rank 5 (config default and README) for every inner TT rank; reshape modes come from a
  hand-written table (e.g. 768·8 -> [8, 8, 12, 8]); here modes are factorised automatically: the prime
  factors of each matrix side packed greedily into modes <= max_mode (default 16), p's modes then q's.
- init: every core N(0, 1)/sqrt(t_k) · (1/(p+q))^(1/(2K)) (build_factors_Gaussian, target_sdv); the
  zero-init lines of LoRA are commented out, so the official ΔW (and adapter) is NOT zero at step 0.
  Departure, by default: init="zero" zeroes B's last core (the up projection's last core and bias for _adp)
  so the model starts exactly at the base; init="gaussian" is the official init.
Forward never forms ΔW: the TT matrices are contracted to A, B (r x d sized) and applied to x as in LoRA.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import CONV, EMBEDDING
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank.lora import adapter_dtype

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}


def tt_modes(n: int, max_mode: int) -> list[int]:
    """n's prime factors, largest first, packed greedily into modes <= max_mode (a larger prime is its own mode)."""
    primes, p, m = [], 2, n
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    primes += [m] if m > 1 else []
    modes: list[int] = []
    for q in sorted(primes, reverse=True):
        i = next((i for i, v in enumerate(modes) if v * q <= max_mode), None)
        if i is None:
            modes.append(q)
        else:
            modes[i] *= q
    return modes or [1]


class TTMatrix(nn.Module):
    """A (p x q) matrix stored as tensor-train cores over modes(p) + modes(q)."""

    def __init__(self, p: int, q: int, rank: int, max_mode: int, init: str, zero_last: bool, **kw):
        super().__init__()
        self.shape = (p, q)
        self.modes = tt_modes(p, max_mode) + tt_modes(q, max_mode)
        ranks = [1] + [rank] * (len(self.modes) - 1) + [1]
        self.cores = nn.ParameterList(  # core k: (t_{k-1}, n_k, t_k)
            [nn.Parameter(torch.zeros(ranks[k], n, ranks[k + 1], **kw)) for k, n in enumerate(self.modes)])
        if init:
            std = (1.0 / (p + q)) ** (0.5 / len(self.modes))  # official target_sdv ** (1/order)
            with torch.no_grad():
                for C in self.cores:
                    C.normal_(0.0, std / math.sqrt(C.shape[-1]))
                if zero_last:
                    self.cores[-1].zero_()

    def full(self) -> Tensor:
        T = self.cores[0]
        for C in self.cores[1:]:
            T = torch.tensordot(T, C, dims=([-1], [0]))  # (1, n_1, ..., n_k, t_k)
        return T.reshape(self.shape)  # (p, q)


class LoRETTARepConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="LoRA rank (bottleneck) between the two TT matrices")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r")
    tensor_rank: int = Field(5, ge=1, description="inner TT rank of every core")
    max_mode: int = Field(16, ge=2, description="largest reshape mode when factorising matrix sides")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    init: Literal["zero", "gaussian"] = Field("zero", description="'zero': B's last core 0 (ΔW = 0); "
                                              "'gaussian': the official all-Gaussian cores")


_TT_FORMULA = "sum_k t_(k-1)*n_k*t_k over the TT cores (t_0 = t_K = 1, t_k = tensor_rank)"


@register("loretta_rep", config=LoRETTARepConfig, family="structured",
          formula=f"{_TT_FORMULA} of A^T (prod n_k = d_in*r) and B^T (prod n_k = r*d_out)",
          paper="arXiv:2402.11417", summary="LoRETTA_rep: LoRA whose A and B are tensor trains")
class LoRETTARep(Delta):
    def __init__(self, config: LoRETTARepConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        d_out, d_in = layer.matrix().shape
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        tt = (config.tensor_rank, config.max_mode, initialize and config.init)
        self.loretta_A = TTMatrix(d_in, config.r, *tt, zero_last=False, **kw)  # A^T: (d_in, r), as official
        self.loretta_B = TTMatrix(config.r, d_out, *tt, zero_last=config.init == "zero", **kw)  # B^T: (r, d_out)
        self.scale = config.alpha / config.r

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.scale * self.loretta_B.full().t() @ self.loretta_A.full().t()  # (d_out, d_in)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        h = layer.apply_matrix(x, self.loretta_A.full().t())  # (…, r)
        return layer.mix(h, self.loretta_B.full().t()) * self.scale  # (…, d_out)


class LoRETTAAdpConfig(DeltaConfig):
    bottleneck: int = Field(64, ge=1, description="adapter bottleneck size m (README: 64)")
    tensor_rank: int = Field(5, ge=1, description="inner TT rank of every core")
    max_mode: int = Field(16, ge=2, description="largest reshape mode when factorising matrix sides")
    non_linearity: Literal["relu", "tanh", "gelu", "silu"] = Field("relu", description="activation in the bottleneck")
    scaling: float = Field(1.0, gt=0, description="s multiplying the adapter's output")
    placement: Literal["output", "input"] = Field(
        "output", description="'output': h + f(h) on the layer's output; 'input': W0 (x + f(x)) + b")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    init: Literal["zero", "gaussian"] = Field("zero", description="'zero': up's last core and bias 0 (identity "
                                              "adapter); 'gaussian': official Gaussian cores, uniform biases")


@register("loretta_adp", config=LoRETTAAdpConfig, family="structured",
          formula=f"{_TT_FORMULA} of down (prod n_k = d*m) and up (prod n_k = m*d), + m + d biases; "
                  "d = d_out (placement 'output') or d_in ('input')",
          paper="arXiv:2402.11417", summary="LoRETTA_adp: serial bottleneck adapter with tensor-train projections")
class LoRETTAAdp(Delta):
    mergeable = False

    def __init__(self, config: LoRETTAAdpConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        if config.placement == "input" and layer.kind is EMBEDDING:
            raise ValueError("loretta_adp placement='input' needs float inputs; an nn.Embedding takes ids: "
                             "use placement='output'")
        d_out, d_in = layer.matrix().shape
        if layer.kind is CONV:
            d_in = layer.base_layer.in_channels  # the adapter acts on channels, not on the flattened in·k
        d = d_out if config.placement == "output" else d_in
        m, kw = config.bottleneck, {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        tt = (config.tensor_rank, config.max_mode, initialize and config.init)
        self.loretta_down = TTMatrix(d, m, *tt, zero_last=False, **kw)  # (d, m), applied as h @ M
        self.loretta_up = TTMatrix(m, d, *tt, zero_last=config.init == "zero", **kw)  # (m, d)
        self.loretta_down_bias = nn.Parameter(torch.zeros(m, **kw))
        self.loretta_up_bias = nn.Parameter(torch.zeros(d, **kw))
        if initialize and config.init == "gaussian":
            with torch.no_grad():  # official TensorizedLinear_module bias init
                self.loretta_down_bias.uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m))
                self.loretta_up_bias.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
        self.act = ACTIVATIONS[config.non_linearity]

    @property
    def additive(self) -> bool:  # after the layer it transforms the whole output, so it cannot be stacked
        return self.config.placement == "input"

    @property
    def serial(self) -> bool:  # 'output': h + f(h), a function of the layer's output
        return self.config.placement == "output"

    def adapter(self, layer: DeltaLayer, h: Tensor) -> Tensor:
        """s · up(act(down(h))) on h's channels, (…, d); h already dropped out and in the adapter's dtype."""
        z = layer.mix(h, self.loretta_down.full().t())
        z = self.act(z + layer.per_channel(self.loretta_down_bias, z))  # (…, m)
        z = layer.mix(z, self.loretta_up.full().t())
        return self.config.scaling * (z + layer.per_channel(self.loretta_up_bias, z))

    def change(self, layer: DeltaLayer, h: Tensor) -> Tensor:
        if self.serial:
            return self.adapter(layer, h)
        # W0 (x + f(x)) + b = out + W0 f(x): the layer's own op on f(x), without its bias
        return layer.apply_matrix(self.adapter(layer, h).to(layer.weight.dtype), layer.matrix())
