"""Bottleneck adapters: f(h) = s · up(act(down(h))), placed by the engine (engine/activation.py).

- Houlsby et al., arXiv:1902.00751: two serial adapters per block, after attention and after the FFN,
  before the residual and LayerNorm (AdapterHub `double_seq_bn`).
- Pfeiffer et al., arXiv:2005.00247 (AdapterFusion): one serial adapter after the FFN that reads N(h + r)
  and is normalised again after (AdapterHub `seq_bn`).
- He et al., arXiv:2110.04366: the parallel adapter h + s · f(r) from the FFN block's input r, s = 1, and the
  scaled parallel adapter, s = 4 (AdapterHub `par_bn`).

P = 2·d·m + d + m per adapter (down d -> m and up m -> d with biases), m = d // reduction_factor.
Checked against adapter-hub/adapters 1.3 (methods/modeling.py Adapter/ParallelAdapter, configuration/
adapter_config.py): the placement options, `scaling` ('learned': one scalar, 'channel': one per
channel) and the inits. Departure: deltatune's default init is 'mam_adapter' (down kaiming-uniform, up and
both biases zero), so every adapter starts as the identity; AdapterHub's default 'bert' (normal std 0.02
everywhere, zero biases) starts near it. Dropout acts on s · up(...) as in AdapterHub.

Low-bit adapters (Jie et al., ICCV 2023, arXiv:2307.16867; `bits`): down and up are used through the official
quantiser (_quantize.py: per tensor, q_b((W - mean) / std) · std + mean, straight-through) and have no biases
(the official QLinear has none), so P = 2·d·m. Their init is the official 'binary' (up ~ truncated N(0, 1e-3)
in ±2e-3): a constant up has std 0, so it is not the identity at init. Saves keep the full-precision
weights (training resumes exactly); lowbit.export_packed stores b/8 bytes per weight (+ 8 per tensor).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Union

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.activations import get_activation

from ...engine.activation import ActivationConfig, ActivationDelta, widths
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import register
from ..lowrank.lora import adapter_dtype
from ._quantize import BITS, fake_quantise

BERT_BLOCK_OUTPUTS = r"re:(.*\.)?layer\.\d+\.(attention\.output|output)"  # BertSelfOutput and BertOutput
BERT_FFN_OUTPUT = r"re:(.*\.)?layer\.\d+\.output"


class BottleneckConfig(ActivationConfig):
    reduction_factor: float = Field(16, gt=0, description="m = hidden size // reduction_factor")
    bottleneck: int | None = Field(None, ge=1, description="m itself (overrides reduction_factor)")
    non_linearity: str = Field("swish", description="activation between down and up (transformers' names: relu, "
                               "swish, gelu, tanh...)")
    scaling: Union[float, Literal["learned", "channel"]] = Field(
        1.0, description="s: a number, 'learned' (one trainable scalar, init 1) or 'channel' (one per channel)")
    ln_before: bool = Field(False, description="a trainable LayerNorm on the adapter's input")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on s · up(act(down(h)))")
    init: Literal["mam_adapter", "bert", "houlsby", "binary"] = Field(
        "mam_adapter", description="'mam_adapter': down kaiming-uniform, up and biases 0 (identity at step 0); "
        "'bert': weights N(0, 0.02), biases 0; 'houlsby': weights truncated N(0, 0.01) in ±0.02, biases 0; "
        "'binary' (the default with bits): down kaiming-uniform, up truncated N(0, 1e-3) in ±2e-3")
    bits: Literal[BITS] | None = Field(  # type: ignore[valid-type]
        None, description="train down and up quantised to 1, 2, 4 or 8 bits per weight (Jie et al. 2023; "
        "no biases); None: full precision")

    # where each architecture's blocks put this adapter when targets=None (HF config.model_type)
    default_targets: ClassVar[dict[str, list[str]]] = {"bert": [BERT_BLOCK_OUTPUTS], "roberta": [BERT_BLOCK_OUTPUTS],
                       "llama": ["self_attn", "mlp"], "qwen2": ["self_attn", "mlp"], "mistral": ["self_attn", "mlp"]}

    @model_validator(mode="before")
    @classmethod
    def _binary_init_with_bits(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("bits") is None:
            return data
        if data.get("init") == "mam_adapter":
            raise ValueError("init='mam_adapter' starts up at 0, which the low-bit quantiser cannot normalise "
                             "(std 0); with bits use init='binary' (the official one), 'bert' or 'houlsby'")
        return {**data, "init": data.get("init", "binary")}

    def bottleneck_size(self, d: int) -> int:
        return self.bottleneck or max(1, int(d // self.reduction_factor))


class Bottleneck(ActivationDelta, Delta):
    """down (d_in -> m), act, up (m -> d), scale; the engine places it and adds its residual."""

    def __init__(self, config: BottleneckConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, shared=shared)
        site = layer.activation_site(config.site)
        d_in, d = widths(layer.base_layer, site, config)
        m = config.bottleneck_size(d)
        kw = {"dtype": adapter_dtype(layer), "device": device_of(layer)}
        self.norm_before = nn.LayerNorm(d_in, **kw) if config.ln_before else None
        self.bits = config.bits
        self.down = self.projection(d_in, m, **kw)
        self.up = self.projection(m, d, **kw)
        if self.bits is not None:  # False once lowbit.load_packed has put the stored (dequantised) weights in
            self.register_buffer("fake_quant", torch.ones((), dtype=torch.bool, device=kw["device"]))
        self.act = get_activation(config.non_linearity.lower())
        if config.scaling == "learned":
            self.scale = nn.Parameter(torch.ones(1, **kw))
        elif config.scaling == "channel":
            self.scale = nn.Parameter(torch.ones(d, **kw))
        else:
            self.scale = float(config.scaling)
        if initialize:
            self.reset(config.init)

    def projection(self, d_in: int, d_out: int, **kw) -> nn.Module:
        """The down and up maps (x -> x W + b; low-bit ones have no bias); Compacter's are PHM layers."""
        return nn.Linear(d_in, d_out, bias=self.bits is None, **kw)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        for lin in (self.down, self.up):
            if init == "bert":
                lin.weight.normal_(0.0, 0.02)
            elif init == "houlsby":
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            elif lin is self.down:
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            elif init == "binary":  # binary_adapter/adaptformer.py l.24
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-3, a=-2e-3, b=2e-3)
            else:
                lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()

    def change(self, layer: DeltaLayer, h: Tensor) -> Tensor:
        z = h.to(next(self.down.parameters()).dtype)
        if self.norm_before is not None:
            z = self.norm_before(z)
        return self.linear(self.up, self.act(self.linear(self.down, z))) * self.scale

    def forward_weight(self, lin: nn.Linear) -> Tensor:
        """down's or up's weight as the forward uses it: quantised when bits is set (until load_packed)."""
        return fake_quantise(lin.weight, self.bits) if self.bits is not None and self.fake_quant else lin.weight

    def linear(self, proj: nn.Module, x: Tensor) -> Tensor:
        return proj(x) if self.bits is None else F.linear(x, self.forward_weight(proj), proj.bias)


def device_of(layer: DeltaLayer) -> torch.device:
    p = next(layer.base_layer.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


FORMULA = "2 d m + d + m (2 d m with bits: no biases), m = d // reduction_factor (d: the hidden size)"


class HoulsbyConfig(BottleneckConfig):
    pass


class PfeifferConfig(BottleneckConfig):
    non_linearity: str = "relu"
    original_ln_before: bool = True
    default_targets: ClassVar[dict[str, list[str]]] = {"bert": [BERT_FFN_OUTPUT], "roberta": [BERT_FFN_OUTPUT],
                       "llama": ["mlp"], "qwen2": ["mlp"], "mistral": ["mlp"]}


class ParallelAdapterConfig(BottleneckConfig):
    placement: Literal["serial", "parallel"] = "parallel"
    non_linearity: str = "relu"
    reduction_factor: float = 2
    default_targets: ClassVar[dict[str, list[str]]] = PfeifferConfig.default_targets


class ScaledParallelAdapterConfig(ParallelAdapterConfig):
    scaling: Union[float, Literal["learned", "channel"]] = 4.0


@register("houlsby", config=HoulsbyConfig, family="adapters", formula=FORMULA, paper="arXiv:1902.00751",
          summary="Houlsby adapter: serial bottlenecks after attention and after the FFN, before residual + norm")
class Houlsby(Bottleneck):
    pass


@register("pfeiffer", config=PfeifferConfig, family="adapters", formula=FORMULA, paper="arXiv:2005.00247",
          summary="Pfeiffer adapter: one serial bottleneck after the FFN, reading N(h + r)")
class Pfeiffer(Bottleneck):
    pass


@register("parallel_adapter", config=ParallelAdapterConfig, family="adapters", formula=FORMULA,
          paper="arXiv:2110.04366", summary="parallel adapter: h + f(r) beside the FFN, from its input")
class ParallelAdapter(Bottleneck):
    pass


@register("scaled_parallel_adapter", config=ScaledParallelAdapterConfig, family="adapters", formula=FORMULA,
          paper="arXiv:2110.04366", summary="scaled parallel adapter: h + 4 f(r) beside the FFN")
class ScaledParallelAdapter(Bottleneck):
    pass
