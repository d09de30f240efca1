"""Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190)
and P-tuning v2 (Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks", arXiv:2110.07602): every attention layer i attends to l trained keys and values first,

    head = softmax(q [P_k^i ; K]^T / sqrt(d_h)) [P_v^i ; V],

with P = [P_k^1, P_v^1, ..., P_k^L, P_v^L] (l x 2·L·kv_dim, kv_dim = kv_heads·head_dim: GQA models attend to
kv_heads heads) trained directly (P-tuning v2) or, for prefix tuning, through the paper's reparameterisation
P = MLP(E), E (l x kv_dim), MLP = Linear(kv_dim, h) -> tanh -> Linear(h, 2·L·kv_dim), used for training only:
`fold()` replaces it by its output. The layout of P is HF peft 0.21's PrefixEncoder (`prefix_projection` True
/ False), so its `prompt_embeddings` file is P itself. P = 2·L·l·kv_dim (prefix tuning trains
l·kv_dim + kv_dim·h + h + h·2·L·kv_dim + 2·L·kv_dim until folded).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.peft_format import PeftCodec, check_prompt_fields, prompt_fields, register_peft
from ...engine.prompt import PROMPT, PromptConfig, PromptDelta, PromptSite
from ...engine.registry import register


class PTuningV2Config(PromptConfig):
    init: Literal["random", "zero"] = Field("random", description="P's start: N(0, 1) (PEFT's default) or zero")


class PrefixTuningConfig(PTuningV2Config):
    prefix_projection: bool = Field(True, description="train P through the MLP reparameterisation (fold() drops it)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="h, the MLP's width; None = kv_dim (as PEFT)")


def kv_dim(site: PromptSite) -> int:
    return site.num_kv_heads * site.head_dim


@register("p_tuning_v2", config=PTuningV2Config, family="prompt", formula="2·L·l·kv_dim (model-level)",
          paper="https://arxiv.org/abs/2110.07602", summary="l trained keys and values in every attention layer")
class PTuningV2(PromptDelta):
    def __init__(self, config: PTuningV2Config, site: PromptSite, initialize: bool = True):
        super().__init__(config, site, initialize)
        n, width = config.num_virtual_tokens, 2 * site.num_layers * kv_dim(site)
        device = site.embedding.weight.device
        if getattr(config, "prefix_projection", False):
            h = config.encoder_hidden_size or kv_dim(site)
            self.prefix_embedding = nn.Parameter(torch.zeros(n, kv_dim(site), device=device))  # E (l, kv_dim)
            self.prefix_mlp = nn.Sequential(nn.Linear(kv_dim(site), h), nn.Tanh(), nn.Linear(h, width)).to(device)
        else:
            self.prefix_embedding = nn.Parameter(torch.zeros(n, width, device=device))  # P (l, 2·L·kv_dim)
            self.prefix_mlp = None
        if initialize:
            self.reset(config)

    @torch.no_grad()
    def reset(self, config: PTuningV2Config) -> None:
        """PEFT's init: the embedding N(0, 1), the MLP torch's default; 'zero' zeros the last map (or P)."""
        self.prefix_embedding.normal_()
        if self.prefix_mlp is not None:
            for m in self.prefix_mlp:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        if config.init == "zero":
            last = self.prefix_mlp[-1] if self.prefix_mlp is not None else None
            for t in (last.weight, last.bias) if last is not None else (self.prefix_embedding,):
                t.zero_()

    def prefix(self) -> Tensor:
        """P (l, 2·L·kv_dim): the MLP's output, or the trained table itself."""
        E = self.prefix_embedding
        return self.prefix_mlp(E) if self.prefix_mlp is not None else E

    def kv_prefix(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        site, n = self.site, self.num_virtual_tokens
        dtype = site.embedding.weight.dtype
        P = self.prefix().to(dtype).view(n, 2 * site.num_layers, site.num_kv_heads, site.head_dim)
        P = P.permute(1, 2, 0, 3)[:, None].expand(-1, batch, -1, -1, -1)  # (2L, batch, kv_heads, l, head_dim)
        return [(P[2 * i], P[2 * i + 1]) for i in range(site.num_layers)]

    @torch.no_grad()
    def fold(self) -> None:
        if self.prefix_mlp is None:
            return
        P = self.prefix().detach().clone()
        del self.prefix_mlp
        self.prefix_mlp = None
        self.prefix_embedding = nn.Parameter(P, requires_grad=self.prefix_embedding.requires_grad)
        self.config = self.config.model_copy(update={"prefix_projection": False})


@register("prefix_tuning", config=PrefixTuningConfig, family="prompt", formula="2·L·l·kv_dim, + the MLP until folded",
          paper="https://arxiv.org/abs/2101.00190", summary="per-layer keys/values from an MLP (folded after training)")
class PrefixTuning(PTuningV2):
    """P-tuning v2's per-layer prefix, trained through the reparameterisation MLP (prefix_projection)."""


def _peft_export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    site, cfg = dm.prompt_site, adapter.config
    projection = getattr(cfg, "prefix_projection", False)
    fields = {**prompt_fields(dm, adapter, kv_dim(site), site.num_kv_heads), "prefix_projection": projection,
              "encoder_hidden_size": getattr(cfg, "encoder_hidden_size", None) or kv_dim(site),
              "init_weights": "zero" if cfg.init == "zero" else None}
    # PEFT stores P itself, the MLP's output (get_prompt_embedding_to_save), whether or not it projects
    return fields, {"prompt_embeddings": dm.prompts[adapter.name].prefix().detach()}


def _peft_load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any
               ) -> tuple[PTuningV2Config, dict[str, Tensor]]:
    site = dm.prompt_site
    check_prompt_fields(dm, pc, path, kv_dim(site), site.num_kv_heads)
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"PEFT prefix-tuning adapter at '{path}' holds {sorted(tensors)[:4]}, not one "
                         "'prompt_embeddings' tensor; save the adapter from PEFT again")
    common = {"num_virtual_tokens": pc["num_virtual_tokens"], "init": "zero" if pc.get("init_weights") else "random"}
    # the file holds P, so a projecting adapter arrives folded: prefix_tuning without its MLP
    config = PrefixTuningConfig(**common, prefix_projection=False, encoder_hidden_size=pc.get("encoder_hidden_size")) \
        if pc.get("prefix_projection") else PTuningV2Config(**common)
    return config, {f"{PROMPT}.prefix_embedding": tensors["prompt_embeddings"]}


register_peft(PeftCodec("PREFIX_TUNING", ("prefix_tuning", "p_tuning_v2"), _peft_export, _peft_load,
                        model_prefix="base_model."))
