"""AdapterFusion (Pfeiffer et al., arXiv:2005.00247): attention over several adapters' outputs at each layer.

With u_i = s_i · up_i(...) the change of adapter i (its output before the residual), q the query (the
adapter site's input), and the adapters' own residual h:

    out = h + Σ_i softmax_i(Q q · K u_i / T) · V u_i

The fusion is an adapter of its own (method 'adapter_fusion', added by DeltaModel.add_fusion) that a
Fuse(...) block names; it trains while the fused adapters stay frozen. Checked against adapter-hub/adapters
1.3 (methods/modeling.py BertFusion, configuration/adapter_fusion_config.py): 'dynamic' defaults (query, key,
value, V initialised to I (+1e-6 off the diagonal), the 0.01·‖I − V‖² regulariser), 'static' (no V).
P = 2(d² + d) + d² per layer (dynamic).
"""

from __future__ import annotations

from typing import Any, Literal, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.activation import ActivationDelta, widths
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank.lora import adapter_dtype
from .bottleneck import device_of

REGULARIZATION = 0.01  # AdapterHub's weight on ‖I − V‖²


class AdapterFusionConfig(DeltaConfig):
    kind: Literal["dynamic", "static"] = Field("dynamic", description="'dynamic': with a value matrix V "
                                               "(init I) and its regulariser; 'static': no V")
    query_before_ln: bool = Field(False, description="the query is the site's input before the original norm")
    residual_before: bool = Field(False, description="add the residual to the adapters' outputs before attention")
    temperature: bool = Field(False, description="anneal a softmax temperature from 50 to 1 (by 0.05 per training "
                              "forward; AdapterHub also anneals in eval)")
    value_before_softmax: bool = Field(True, description="V applies to each output before the weighted sum")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention scores")
    hidden_size: int | None = Field(None, ge=1, description="the width of h; None: read from the module")
    site: Union[Literal["auto", "module"], dict[str, Any]] = Field(
        "auto", description="as the fused adapters' site option (it must equal theirs)")
    placement: Literal["serial"] = "serial"


def _bert_init(lin: nn.Linear) -> None:
    lin.weight.normal_(0.0, 0.02)
    if lin.bias is not None:
        lin.bias.zero_()


@register("adapter_fusion", config=AdapterFusionConfig, family="adapters", formula="3 d^2 + 2 d per layer (dynamic)",
          paper="arXiv:2005.00247", summary="AdapterFusion: trained attention over frozen adapters' outputs (Fuse)")
class AdapterFusion(ActivationDelta, Delta):
    def __init__(self, config: AdapterFusionConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        _, d = widths(layer.base_layer, layer.activation_site(config.site), config)
        kw = {"dtype": adapter_dtype(layer), "device": device_of(layer)}
        self.query = nn.Linear(d, d, **kw)
        self.key = nn.Linear(d, d, **kw)
        self.value = nn.Linear(d, d, bias=False, **kw) if config.kind == "dynamic" else None
        self.T = 50.0 if config.temperature else 1.0
        if initialize:
            with torch.no_grad():
                _bert_init(self.query)
                _bert_init(self.key)
                if self.value is not None:
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def change(self, layer: DeltaLayer, h: Tensor) -> Tensor:
        raise ValueError("an adapter_fusion adapter acts only inside a Fuse block: "
                         "set_active(Fuse(<the adapters it fuses>))")

    def fuse(self, query: Tensor, ups: Tensor, residual: Tensor) -> Tensor:
        """query (…, d), ups (…, n, d): the n adapters' changes, residual (…, d) -> the fused hidden state."""
        dtype = self.query.weight.dtype
        query, ups, residual = query.to(dtype), ups.to(dtype), residual.to(dtype)
        if self.config.residual_before:
            ups = ups + residual.unsqueeze(-2)
        q, k = self.query(query), self.key(ups)
        v = self.value(ups) if self.value is not None and self.config.value_before_softmax else ups
        scores = self.dropout((k @ q.unsqueeze(-1)).squeeze(-1))  # (…, n): the engine's dropout, on the scores
        probs = torch.softmax(scores / self.T, dim=-1)
        if self.config.temperature and self.training:
            self.T = max(self.T - 50.0 / 1000.0, 1.0)
        out = (probs.unsqueeze(-2) @ v).squeeze(-2)
        if self.value is not None and not self.config.value_before_softmax:
            out = self.value(out)
        return out if self.config.residual_before else out + residual

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        if self.value is None or not self.value.weight.requires_grad:
            return None
        eye = torch.eye(self.value.weight.shape[0], dtype=self.value.weight.dtype, device=self.value.weight.device)
        return REGULARIZATION * (eye - self.value.weight).pow(2).sum()
