"""LLaMA-Adapter: adaption prompts with zero-initialised gating on the top attention layers.

LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention (Zhang et al.,
arXiv:2303.16199), Sec. 3.1-3.2. Each of the top L layers holds a learnable prompt P (l x d); its keys and
values come from the layer's own projections, K_p = k_proj(P), V_p = v_proj(P) (no rotary embedding), the
layer's queries Q = RoPE(q_proj(h)) attend to them in a softmax of their own, and a gate g, zero at init,
scales the result before the output projection:
    out = attention(h) + o_proj(g · softmax(Q K_pᵀ / sqrt(d_head)) V_p)      P: (l, d), g: (1,)
As PEFT `adaption_prompt` (peft 0.21, tuners/adaption_prompt/layer.py): one scalar gate per layer applied to
the softmax (no tanh), P drawn from N(0, 1), GQA keys/values repeated to every query head, the softmax in
float32. The prompt's keys and values never enter the KV cache: they are recomputed from P at every call.

Not mergeable (it adds an attention branch, not a weight). In a mixed-adapter batch each adapter's change is
computed on the whole call (the attention's rotary tables, mask and cache cover every row) and only its rows
are kept; the prompt's keys/values then go through the base projections, as those rows see them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import Delta, DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ..lowrank.lora import adapter_dtype

ATTENTION = "self_attn"  # the decoder layer's attention module in llama/mistral/qwen2 (PEFT's target_modules)


def top_layers(n_layers: int | None) -> Any:
    """A target predicate: the attention modules of the top `n_layers` decoder layers (all when None)."""

    def chosen(path: str, module: nn.Module) -> bool:
        if not (path == ATTENTION or path.endswith("." + ATTENTION)) or not hasattr(module, "layer_idx"):
            return False
        total = module.config.num_hidden_layers
        if n_layers is not None and n_layers > total:
            raise ValueError(f"adapter_layers={n_layers} but the model has {total} layers; set adapter_layers "
                             f"<= {total}")
        return n_layers is None or module.layer_idx >= total - n_layers

    return chosen


class AdaptionPromptConfig(DeltaConfig):
    adapter_len: int = Field(10, ge=1, description="l: prompt tokens per adapted layer")
    adapter_layers: int | None = Field(
        None, ge=1, description="L: adapt the attention of the top L decoder layers when targets is None "
        "(None: every layer); explicit targets choose the attention modules themselves")

    # HF model types whose decoder layers hold a llama-style attention (q/k/v/o_proj, rotary position_embeddings)
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")

    @property
    def default_targets(self) -> dict[str, list[Any]]:
        return {t: [top_layers(self.adapter_layers)] for t in self.model_types}


def rotary(q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """q (B, H, T, d_head) rotated by the layer's rotary tables cos/sin (B or 1, T, d_head), as llama does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q1, q2 = q.chunk(2, dim=-1)
    return q * cos + torch.cat((-q2, q1), dim=-1) * sin


@register("adaption_prompt", config=AdaptionPromptConfig, family="prompt", formula="l·d + 1 per adapted layer",
          paper="arXiv:2303.16199", summary="LLaMA-Adapter: gated adaption prompts attended on the top layers")
class AdaptionPrompt(Delta):
    mergeable = False  # an attention branch, not a weight
    any_module = True  # targets are attention modules, not weight layers
    needs_inputs = True  # the queries need the call's rotary tables (position_embeddings)
    whole_batch = True  # mixed batches: computed on the whole call, its rows kept (engine/layer.py)

    def __init__(self, config: AdaptionPromptConfig, layer: DeltaLayer, initialize: bool = True, shared: Any = None):
        super().__init__(config, layer)
        attn = layer.base_layer
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config") if not hasattr(attn, n)]
        if missing:
            raise ValueError(f"adaption_prompt adapts llama-style attention modules (q/k/v/o_proj, head_dim); "
                             f"'{layer.path}' ({type(attn).__name__}) lacks {missing}: target the model's self_attn")
        d = attn.config.hidden_size
        kw = {"dtype": adapter_dtype(layer), "device": attn.q_proj.weight.device}
        # PEFT (after the official repo's nn.Embedding) draws the prompt from N(0, 1); the gate starts at 0
        self.adaption_prompt = nn.Parameter(torch.randn(config.adapter_len, d, **kw) if initialize
                                            else torch.empty(config.adapter_len, d, **kw))
        self.adaption_gate = nn.Parameter(torch.zeros(1, **kw))

    def forward(self, layer: DeltaLayer, x: Tensor, out: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("position_embeddings") is None:
            raise ValueError(f"adaption_prompt on '{layer.path}' needs the attention call's position_embeddings "
                             "(cos, sin), which transformers' llama/mistral/qwen2 decoder layers pass; composition "
                             "blocks and activation adapters on the same module do not: activate it alone or in a "
                             "plain list of adapters")
        h, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        y = h + self.change_from(layer, x, kwargs["position_embeddings"]).to(h.dtype)
        return y if rest is None else (y, *rest)

    def change_from(self, layer: DeltaLayer, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """o_proj(g · softmax(Q K_pᵀ / sqrt(d_head)) V_p) for hidden states x (B, T, d)."""
        attn, mixed = layer.base_layer, layer.route is not None
        B, T, _ = x.shape
        d_head, n_heads = attn.head_dim, attn.config.num_attention_heads
        P = self.adaption_prompt.to(attn.q_proj.weight.dtype)
        # in a mixed batch the prompt (no batch rows of its own) goes through the base projections
        k_proj, v_proj = (_base(attn.k_proj), _base(attn.v_proj)) if mixed else (attn.k_proj, attn.v_proj)
        K, V = (proj(P).view(len(P), -1, d_head).transpose(0, 1) for proj in (k_proj, v_proj))  # (H_kv, l, d_head)
        K, V = (t.repeat_interleave(n_heads // t.shape[0], dim=0) for t in (K, V))  # GQA: (H, l, d_head)
        cos, sin = position_embeddings
        Q = rotary(attn.q_proj(x).view(B, T, n_heads, d_head).transpose(1, 2), cos, sin)  # (B, H, T, d_head)
        scores = F.softmax(Q @ K.transpose(-1, -2).to(Q.dtype) / math.sqrt(d_head), dim=-1, dtype=torch.float32)
        A = (self.adaption_gate.to(Q.dtype) * scores.to(Q.dtype)) @ V.to(Q.dtype)  # (B, H, T, d_head)
        return attn.o_proj(A.transpose(1, 2).reshape(B, T, n_heads * d_head))


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, DeltaLayer) else module


# --- PEFT format: '<path>.adaption_prompt' (1, l, d) and '<path>.adaption_gate' (1,) per adapted attention; PEFT
# names the attention by its leaf (target_modules='self_attn') and adapts the last adapter_layers of them ----------
_KEYS = {"adaption_prompt": "P", "adaption_gate": "g"}
PEFT_MODEL_TYPES = ("llama", "mistral")  # peft 0.21's TRANSFORMERS_MODEL_CONFIG (besides gpt2's other attention)


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    model_type = getattr(getattr(dm.model, "config", None), "model_type", None)
    if model_type not in PEFT_MODEL_TYPES:
        raise ValueError(f"PEFT's adaption_prompt supports model types {PEFT_MODEL_TYPES}, not {model_type!r}; "
                         "save the adapter with DeltaModel.save instead")
    leaf = adapter.paths[0].rsplit(".", 1)[-1]
    same_leaf = [p for p, _ in dm.model.named_modules() if p.endswith("." + leaf)]
    if sorted(adapter.paths) != sorted(same_leaf[len(same_leaf) - len(adapter.paths):]):
        raise ValueError(f"PEFT's adaption_prompt adapts the last adapter_layers modules named '{leaf}', but adapter "
                         f"'{adapter.name}' holds {adapter.paths}; save it with DeltaModel.save, or adapt the top "
                         "layers (targets=None, adapter_layers=L)")
    tensors = {}
    for p in adapter.paths:
        delta = dm.model.get_submodule(p).deltas[adapter.name]
        tensors[f"{p}.adaption_prompt"] = delta.adaption_prompt[None]
        tensors[f"{p}.adaption_gate"] = delta.adaption_gate
    fields = {"target_modules": leaf, "adapter_len": adapter.config.adapter_len,
              "adapter_layers": len(adapter.paths), "task_type": "CAUSAL_LM" if type(dm.model).__name__.endswith("ForCausalLM") else None}
    return fields, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    per_layer = layer_tensors(tensors, _KEYS, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    if len(per_layer) != pc["adapter_layers"]:
        raise ValueError(f"PEFT adapter '{path}' says adapter_layers={pc['adapter_layers']} but holds prompts for "
                         f"{len(per_layer)} layers; save it from PEFT again")
    config = make_config("adaption_prompt", adapter_len=pc["adapter_len"], adapter_layers=pc["adapter_layers"],
                         targets=sorted(per_layer))
    state = {}
    for p, parts in per_layer.items():
        state[f"{p}.adaption_prompt"] = parts["P"].reshape(-1, parts["P"].shape[-1])
        state[f"{p}.adaption_gate"] = parts["g"].reshape(1)
    return config, state


register_peft(PeftCodec("ADAPTION_PROMPT", ("adaption_prompt",), _export, _load))
