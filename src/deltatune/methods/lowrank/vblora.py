"""VB-LoRA: LoRA factors mixed from one global vector bank.

*VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks* (Li, Han, Ji; arXiv:2405.15179).
A (r x d_in) and B (d_out x r) of every layer are cut into length-b sub-vectors; each is a top-k
softmax mixture of rows of the bank V (h x b) shared by all layers and adapters' layers:

    v = Σ_{i ∈ topk(z)} softmax(z_topk)_i · V_i,   z ∈ R^h the sub-vector's logits,   y = W0 x + B A x

(no alpha/r scale). Trainable: V (global, h·b) + logits r·(d_in + d_out)/b · h per layer. With
`save_only_topk_weights` only the k indices and k−1 weights per sub-vector are stored (PEFT export).

[verify] items, checked in peft/tuners/vblora (config.py, layer.py, model.py) and leo-yangli/VB-LoRA
NLU/vblora/vblora.py: defaults r=4, num_vectors h=256, vector_length b=256, topk k=2; V ~ U(−0.02, 0.02),
logits ~ N(0, 0.1²), so ΔW is small but not zero at init (both sources); A's logits (r, d_in/b, h) give
A row by row, B's logits (d_out/b, r, h) give B's column blocks (PEFT layout; the official code's
(d_in/b, r, h) layout is the same function); d_in and d_out must be multiples of b. PEFT keys:
`<path>.vblora_logits_A`, `<path>.vblora_logits_B`, `base_model.vblora_vector_bank` (top-k mode:
`..._topk_indices` (uint8/int16/int32) and `..._topk_weights` (first k−1 softmax weights)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.kinds import CONV1D, LINEAR_KINDS
from ...engine.layer import DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ._factored import Factored
from .lora import adapter_dtype

if TYPE_CHECKING:
    from ...engine.model import Adapter, DeltaModel


class VBLoRAConfig(DeltaConfig):
    r: int = Field(4, ge=1, description="rank of the assembled A and B")
    num_vectors: int = Field(256, ge=1, description="h: vectors in the shared bank")
    vector_length: int = Field(256, ge=1, description="b: length of a bank vector; must divide d_in and d_out")
    topk: int = Field(2, ge=1, description="k: bank vectors mixed per sub-vector")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    init_vector_bank_bound: float = Field(0.02, gt=0, description="bank init U(-bound, bound)")
    init_logits_std: float = Field(0.1, gt=0, description="logits init N(0, std^2)")
    save_only_topk_weights: bool = Field(False, description="PEFT export: store top-k indices and weights only")

    @model_validator(mode="after")
    def _topk(self) -> VBLoRAConfig:
        if self.topk > self.num_vectors:
            raise ValueError(f"topk={self.topk} exceeds num_vectors={self.num_vectors}")
        return self


class VectorBank(nn.Module):
    def __init__(self, config: VBLoRAConfig, like: DeltaLayer):
        super().__init__()
        bank = torch.empty(config.num_vectors, config.vector_length, dtype=adapter_dtype(like), device=like.weight.device)
        b = config.init_vector_bank_bound
        self.vblora_vector_bank = nn.Parameter(bank.uniform_(-b, b))  # (h, b)


@register("vblora", config=VBLoRAConfig, family="low-rank", formula="r(d_in + d_out)/b*h + h*b (h*b: the bank, global)",
          paper="arXiv:2405.15179", summary="VB-LoRA: A, B sub-vectors as top-k mixtures of one global vector bank")
class VBLoRA(Factored):
    def __init__(self, config: VBLoRAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: VectorBank | None = None):
        super().__init__(config, layer, shared=shared)
        d_out, d_in = layer.matrix().shape
        b, h, r = config.vector_length, config.num_vectors, config.r
        if d_in % b or d_out % b:
            raise ValueError(f"VB-LoRA vector_length={b} must divide both sides of the {d_out} x {d_in} "
                             f"'{type(layer.base_layer).__name__}'; pick a common divisor")
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.vblora_logits_A = nn.Parameter(torch.zeros(r, d_in // b, h, **kw))  # (r, d_in/b, h)
        self.vblora_logits_B = nn.Parameter(torch.zeros(d_out // b, r, h, **kw))  # (d_out/b, r, h)
        if initialize:
            nn.init.normal_(self.vblora_logits_A, std=config.init_logits_std)
            nn.init.normal_(self.vblora_logits_B, std=config.init_logits_std)

    @classmethod
    def build_shared(cls, config: VBLoRAConfig, layers: Sequence[DeltaLayer]) -> VectorBank:
        return VectorBank(config, layers[0])

    def mixture(self, logits: Tensor) -> Tensor:
        """(..., h) logits -> (..., b) sub-vectors: softmax over the top-k logits times their bank rows."""
        z, idx = logits.topk(self.config.topk, dim=-1)
        return (F.softmax(z, dim=-1).unsqueeze(-1) * self.shared.vblora_vector_bank[idx]).sum(-2)

    def factors(self) -> tuple[Tensor, Tensor]:
        r = self.config.r
        A = self.mixture(self.vblora_logits_A).reshape(r, -1)  # (r, d_in/b, b) -> (r, d_in)
        B = self.mixture(self.vblora_logits_B).transpose(1, 2).reshape(-1, r)  # (d_out/b, b, r) -> (d_out, r)
        return A, B


def stored_parameters(dm: DeltaModel, name: str | None = None) -> int:
    """Float32-equivalent numbers a save holds: bank + logits, or with save_only_topk_weights bank +
    per sub-vector k−1 weights and k indices (counted at their integer width), as PEFT counts them."""
    name = name or dm._only()
    cfg = dm.adapters[name].config
    bank = dm.shared[name].vblora_vector_bank.numel()
    logits = sum(dm.model.get_submodule(p).deltas[name].vblora_logits_A.numel()
                 + dm.model.get_submodule(p).deltas[name].vblora_logits_B.numel() for p in dm.adapters[name].paths)
    if not cfg.save_only_topk_weights:
        return bank + logits
    n_sub, width = logits // cfg.num_vectors, _index_dtype(cfg.num_vectors).itemsize / 4
    return int(bank + n_sub * (cfg.topk - 1) + n_sub * cfg.topk * width)


def _index_dtype(h: int) -> torch.dtype:
    return torch.uint8 if h < 2**8 else torch.int16 if h < 2**15 else torch.int32 if h < 2**31 else torch.int64


# --- PEFT format ("VBLORA") --------------------------------------------------------------------------
_BANK = "base_model.vblora_vector_bank"
_KEYS = {f"vblora_logits_{f}{s}": f"{f}{s}" for f in "AB" for s in ("", "_topk_indices", "_topk_weights")}


def _export(dm: DeltaModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, tensors, conv1d = adapter.config, {}, False
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        if layer.kind not in LINEAR_KINDS:
            raise ValueError(f"PEFT's VB-LoRA adapts nn.Linear and Conv1D only; '{p}' is {layer.kind.name}")
        conv1d |= layer.kind is CONV1D
        delta = layer.deltas[adapter.name]
        for f in "AB":
            logits = getattr(delta, f"vblora_logits_{f}")
            if cfg.save_only_topk_weights:
                z, idx = logits.topk(cfg.topk, dim=-1)
                tensors[f"{p}.vblora_logits_{f}_topk_indices"] = idx.to(_index_dtype(cfg.num_vectors))
                tensors[f"{p}.vblora_logits_{f}_topk_weights"] = F.softmax(z, dim=-1)[..., :-1].contiguous()
            else:
                tensors[f"{p}.vblora_logits_{f}"] = logits
    tensors[_BANK] = dm.shared[adapter.name].vblora_vector_bank
    fields = {"r": cfg.r, "num_vectors": cfg.num_vectors, "vector_length": cfg.vector_length, "topk": cfg.topk,
              "vblora_dropout": cfg.dropout, "init_vector_bank_bound": cfg.init_vector_bank_bound,
              "init_logits_std": cfg.init_logits_std, "save_only_topk_weights": cfg.save_only_topk_weights,
              "fan_in_fan_out": conv1d, "bias": "none"}
    return fields, tensors


def _logits(parts: dict[str, Tensor], f: str, h: int) -> Tensor:
    """Full logits from PEFT's top-k form: log of the k weights at their indices, −inf elsewhere (as PEFT)."""
    if f in parts:
        return parts[f]
    w = parts[f + "_topk_weights"].float()
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    idx = parts[f + "_topk_indices"].long()
    return torch.full((*idx.shape[:-1], h), float("-inf")).scatter(-1, idx, w.log())


def _load(dm: DeltaModel, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    if pc.get("bias", "none") != "none":
        raise ValueError(f"PEFT VB-LoRA adapter at '{path}' trains bias={pc['bias']!r}; deltatune imports 'none'")
    bank = tensors.pop(_BANK)
    per_layer = layer_tensors(tensors, _KEYS, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    config = make_config("vblora", r=pc["r"], num_vectors=pc["num_vectors"], vector_length=pc["vector_length"],
                         topk=pc["topk"], dropout=pc.get("vblora_dropout", 0.0),
                         init_vector_bank_bound=pc.get("init_vector_bank_bound", 0.02),
                         init_logits_std=pc.get("init_logits_std", 0.1),
                         save_only_topk_weights=pc.get("save_only_topk_weights", False), targets=sorted(per_layer))
    state = {"__shared__.vblora_vector_bank": bank}
    for p, parts in per_layer.items():
        for f in "AB":
            state[f"{p}.vblora_logits_{f}"] = _logits(parts, f, pc["num_vectors"])
    return config, state


register_peft(PeftCodec("VBLORA", ("vblora",), _export, _load))
