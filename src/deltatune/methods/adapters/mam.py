"""The MAM adapter (He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning",
arXiv:2110.04366, Section 4.5): prefix tuning at attention plus a scaled parallel adapter at the FFN,

    attention: l = 30 trained keys and values per layer (prefix tuning, reparameterised by an MLP of width 800)
    FFN:       h <- h + s · up(relu(down(r))),  s = 4, from the FFN block's input r

one adapter made of two deltas (engine UnionConfig): one name, one save, one set_active. The defaults are
AdapterHub's MAMConfig (ConfigUnion(PrefixTuningConfig(bottleneck_size=800), ParBnConfig())): l = 30, the
parallel adapter's reduction factor 2 (the paper's m = 512 on its d = 1024 models). P = the prefix's
(2·L·l·kv_dim once folded) + per FFN 2·d·m + d + m.
"""

from __future__ import annotations

from pydantic import Field

from ...engine.registry import DeltaConfig, UnionConfig, UnionParts, make_config, register
from .bottleneck import ScaledParallelAdapterConfig


class MAMConfig(UnionConfig):
    prefix_length: int = Field(30, gt=0, description="l: trained keys/values per attention layer")
    prefix_hidden: int = Field(800, gt=0, description="width of the prefix's reparameterisation MLP")
    prefix_projection: bool = Field(True, description="train the prefix through its MLP (False once folded)")
    reduction_factor: float = Field(2, gt=0, description="the FFN adapter's m = hidden size // reduction_factor")
    bottleneck: int | None = Field(None, ge=1, description="the FFN adapter's m itself (overrides reduction_factor)")
    scaling: float = Field(4.0, description="s, the FFN adapter's output scale")

    def parts(self) -> list[DeltaConfig]:
        prefix = make_config("prefix_tuning", num_virtual_tokens=self.prefix_length,
                             prefix_projection=self.prefix_projection, encoder_hidden_size=self.prefix_hidden)
        ffn = ScaledParallelAdapterConfig(targets=self.targets, exclude=self.exclude,
                                          reduction_factor=self.reduction_factor, bottleneck=self.bottleneck,
                                          scaling=self.scaling)
        return [prefix, ffn]

    def with_prompt(self, prompt: DeltaConfig) -> MAMConfig:
        return self.model_copy(update={"prefix_projection": prompt.prefix_projection})


@register("mam_adapter", config=MAMConfig, family="adapters", formula="prefix (2·L·l·kv_dim) + 2 d m + d + m per FFN",
          paper="arXiv:2110.04366", summary="MAM adapter: prefix tuning at attention + scaled parallel adapter at the FFN")
class MAMAdapter(UnionParts):
    pass
