"""LoHa: FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning (Hyeon-Woo et al.,
arXiv:2108.06098), as PEFT `loha` (peft 0.21 tuners/loha/layer.py, checked):

    dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r,   w1_a, w2_a: (d_out, r),  w1_b, w2_b: (r, d_in),

a Hadamard product of two rank-r matrices (rank up to r^2) with P = 2r(d_in + d_out). Conv kernels use the
flattened (c_out, c_in/groups * k) matrix. With `effective_conv=True` a conv with a kernel > 1 uses FedPara's
Proposition 3 (Tucker) form, each factor rebuilt as
    W_i[p, q, kh, kw] = sum_{a,b} t_i[a, b, kh, kw] w_i_a[a, p] w_i_b[b, q],  t_i: (r, r, kh, kw),
    w_i_a: (r, c_out), w_i_b: (r, c_in)   (a 1-D kernel k is stored as (k, 1), PEFT's layout).
Init (PEFT reset_adapter_parameters): Kaiming-uniform (a=sqrt(5)) on every factor except hada_w2_b = 0, so
dW = 0 at step 0. Defaults r=8, alpha=8 (PEFT's).

The Hadamard product has no activation-space shortcut, so dW is formed in forward; it runs under activation
checkpointing, so backward recomputes the two rank-r products instead of keeping them (the memory saving of
PEFT's HadaWeight autograd). Training-time dropouts as PEFT's: rank_dropout zeroes each output row of dW with
probability p (one mask per forward) and rescales the kept rows by 1/mean(mask) (PEFT's LoHa always does);
module_dropout skips the whole delta for a forward with probability p. Eval forward and merge have neither.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...engine.kinds import CONV, EMBEDDING, kaiming_uniform_
from ...engine.layer import Delta, DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ..lowrank.lora import adapter_dtype
from ._lycoris import drop_ranks, factor_matrix, module_dropped


class LoHaConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="rank of each of the two factors (r1 = r2 = r)")
    alpha: float = Field(8.0, gt=0, description="scale numerator: s = alpha / r")
    effective_conv: bool = Field(False, description="Tucker (FedPara Prop. 3) factors for convs with kernel > 1 "
                                 "(PEFT use_effective_conv2d)")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: drop output rows of ΔW, the kept ones "
                                "rescaled by 1/mean(mask) (PEFT's LoHa always rescales)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: skip the whole delta for a forward")


def _hadamard(scale: float, t1: Tensor | None, w1a: Tensor, w1b: Tensor, t2: Tensor | None, w2a: Tensor,
              w2b: Tensor) -> Tensor:
    return factor_matrix(t1, w1a, w1b) * factor_matrix(t2, w2a, w2b) * scale


@register("loha", config=LoHaConfig, family="structured", formula="2r(d_in + d_out)", paper="arXiv:2108.06098",
          summary="LoHa: Hadamard product of two rank-r products, (alpha/r)(B1 A1)*(B2 A2)")
class LoHa(Delta):
    def __init__(self, config: LoHaConfig, layer: DeltaLayer, initialize: bool = True, shared: Any = None):
        super().__init__(config, layer)
        if layer.kind is EMBEDDING:
            raise ValueError("LoHa does not adapt nn.Embedding layers (nor does PEFT's loha); exclude them")
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        r, (d_out, d_in) = config.r, layer.matrix().shape
        self.scale = config.alpha / r
        kernel = tuple(layer.weight.shape[2:]) if layer.kind is CONV else ()
        if config.effective_conv and len(kernel) > 2:
            raise ValueError(f"LoHa effective_conv supports 1-D and 2-D convolutions, not a {len(kernel)}-D kernel")
        self.tucker = config.effective_conv and math.prod(kernel) > 1  # a 1x1 kernel is a plain matrix (as PEFT)
        if self.tucker:
            c_in = layer.weight.shape[1]
            k = (kernel + (1,))[:2]  # (kh, kw); a 1-D kernel as (k, 1)
            self.hada_t1 = nn.Parameter(torch.zeros(r, r, *k, **kw))
            self.hada_t2 = nn.Parameter(torch.zeros(r, r, *k, **kw))
            shapes = ((r, d_out), (r, c_in))
        else:
            self.hada_t1 = self.hada_t2 = None
            shapes = ((d_out, r), (r, d_in))
        self.hada_w1_a = nn.Parameter(torch.zeros(*shapes[0], **kw))
        self.hada_w1_b = nn.Parameter(torch.zeros(*shapes[1], **kw))
        self.hada_w2_a = nn.Parameter(torch.zeros(*shapes[0], **kw))
        self.hada_w2_b = nn.Parameter(torch.zeros(*shapes[1], **kw))  # stays 0: dW = 0 at init
        if initialize:
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_t1, self.hada_t2):
                if p is not None:
                    kaiming_uniform_(p.data)

    def factors(self) -> tuple[Tensor | None, ...]:
        return self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        params = self.factors()
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return checkpoint(_hadamard, self.scale, *params, use_reentrant=False)  # (d_out, d_in)
        return _hadamard(self.scale, *params)

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor) -> Tensor:
        return out if module_dropped(self, self.config.module_dropout) else super().forward(layer, x, out)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        y = layer.apply_matrix(x, self.delta_weight(layer))
        return drop_ranks(self, layer, y, self.config.rank_dropout, scale=True)


# --- PEFT format: '<path>.hada_w1_a' ... same names and shapes as deltatune's parameters ------------------

_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, tensors = adapter.config, {}
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        if not isinstance(layer.base_layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"PEFT's loha cannot hold '{p}' ({type(layer.base_layer).__name__}); it adapts Linear, "
                             "Conv1d and Conv2d. Save with DeltaModel.save instead")
        tensors.update({f"{p}.{k}": v for k, v in layer.deltas[adapter.name].state_dict().items()})
    return {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
            "use_effective_conv2d": cfg.effective_conv, "init_weights": True}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise ValueError(f"PEFT adapter at '{path}' uses per-layer {key}, which deltatune cannot import yet")
    per_layer = layer_tensors(tensors, {k: k for k in _KEYS}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    config = make_config("loha", r=pc["r"], alpha=pc["alpha"], effective_conv=pc.get("use_effective_conv2d", False),
                         rank_dropout=pc.get("rank_dropout", 0.0), module_dropout=pc.get("module_dropout", 0.0),
                         targets=sorted(per_layer))
    return config, {f"{p}.{k}": v for p, parts in per_layer.items() for k, v in parts.items()}


register_peft(PeftCodec("LOHA", ("loha",), _export, _load))
