"""P-tuning: virtual tokens made by a prompt encoder (Liu et al., "GPT Understands, Too", arXiv:2103.10385).

    P = encoder(E),   E ∈ R^{l×d} trained input vectors,   P ∈ R^{l×d} prepended to the input embeddings,

encoder = 'MLP': Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d), or 'LSTM': a bidirectional
LSTM (d -> 2h, `encoder_num_layers` layers, dropout between them) then Linear(2h, 2h) -> ReLU -> Linear(2h, d).
Shapes, initialisation (PyTorch's defaults: E ~ N(0, 1)) and parameter names follow HF peft 0.21
`tuners/p_tuning` (PEFT's MLP always has these three layers and ignores encoder_num_layers: here that is
an error instead). h defaults to d. Once trained, `fold()` replaces the encoder by its output P, which is
also what PEFT saves (`prompt_embeddings`): an exported P-tuning adapter is P alone. Departure: fold and
export run the encoder in eval mode (PEFT runs it in the model's mode, so a save during training with
encoder_dropout > 0 would store one dropout draw).
P = l·d + |encoder|, see `encoder_parameters`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.peft_format import (
    PeftCodec,
    base_heads,
    check_prompt_fields,
    prompt_embeddings,
    prompt_fields,
    register_peft,
)
from ...engine.prompt import PROMPT, PromptConfig, PromptDelta, PromptSite
from ...engine.registry import register

EncoderKind = Literal["MLP", "LSTM"]


def encoder_parameters(tokens: int, d: int, h: int, kind: EncoderKind, num_layers: int = 2) -> int:
    """Trainable parameters of a prompt encoder: E (l×d, l = `tokens`) plus its head, by formula."""
    if kind == "MLP":
        return tokens * d + (d * h + h) + (h * h + h) + (h * d + d)
    # each LSTM direction of each layer: 4 gates × (input + hidden weights + two biases)
    lstm = sum(2 * 4 * h * ((d if i == 0 else 2 * h) + h + 2) for i in range(num_layers))
    return tokens * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


class PromptEncoder(nn.Module):
    """E (l×d) and the head that maps it to the l virtual-token embeddings; forward() -> P (l, d)."""

    def __init__(self, tokens: int, d: int, kind: EncoderKind = "MLP", hidden: int | None = None,
                 num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        h = hidden or d
        self.kind = kind
        self.embedding = nn.Embedding(tokens, d)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        elif kind == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        else:
            raise ValueError(f"unknown prompt encoder '{kind}': use 'MLP' or 'LSTM'")

    def forward(self) -> Tensor:
        E = self.embedding.weight.unsqueeze(0)  # (1, l, d): the LSTM reads the l tokens as one sequence
        if self.kind == "LSTM":
            E = self.lstm_head(E)[0]  # (1, l, 2h)
        return self.mlp_head(E)[0]  # (l, d)

    @torch.no_grad()
    def folded(self) -> Tensor:
        """P as a plain tensor (the encoder in eval mode: no LSTM dropout), for fold() and PEFT export."""
        was = self.training
        self.eval()
        try:
            return self().detach().clone()
        finally:
            self.train(was)


class PTuningConfig(PromptConfig):
    encoder_reparameterization_type: EncoderKind = Field("MLP", description="prompt encoder: 'MLP' or 'LSTM'")
    encoder_hidden_size: int | None = Field(None, ge=1, description="h, the encoder's width; None = d")
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (the MLP always has PEFT's three Linear layers)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers")
    folded: bool = Field(False, description="the encoder is replaced by its output P (set by fold_prompt())")

    @model_validator(mode="after")
    def _mlp_has_fixed_depth(self) -> PTuningConfig:
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2:
            raise ValueError(f"encoder_num_layers={self.encoder_num_layers} applies to the LSTM encoder only (PEFT's "
                             "MLP has a fixed depth and ignores it): drop it or set encoder_reparameterization_type="
                             "'LSTM'")
        return self


@register("p_tuning", config=PTuningConfig, family="prompt", formula="l*d + encoder", paper="arXiv:2103.10385",
          summary="P-tuning: l virtual tokens made by an MLP or LSTM prompt encoder, folded to l*d after training")
class PTuning(PromptDelta):
    def __init__(self, config: PTuningConfig, site: PromptSite, initialize: bool = True):
        super().__init__(config, site, initialize)
        tokens, d = config.num_virtual_tokens, site.hidden_size
        device = site.embedding.weight.device
        if config.folded:  # P itself, as fold() left it (or as PEFT saves it)
            self.prompt_embeddings = nn.Parameter(torch.zeros(tokens, d, device=device))
        else:
            self.encoder = PromptEncoder(tokens, d, config.encoder_reparameterization_type, config.encoder_hidden_size,
                                         config.encoder_num_layers, config.encoder_dropout).to(device)

    def virtual_tokens(self) -> Tensor:
        """P (l, d): the encoder's output, or the folded tensor."""
        return self.prompt_embeddings if self.config.folded else self.encoder()

    def input_prompt(self, batch: int) -> Tensor:
        return self.virtual_tokens().unsqueeze(0).expand(batch, -1, -1)  # computed once, shared by the rows

    def fold(self) -> None:
        if self.config.folded:
            return
        trains = self.encoder.embedding.weight.requires_grad
        self.prompt_embeddings = nn.Parameter(self.encoder.folded(), requires_grad=trains)
        del self.encoder
        self.config = self.config.model_copy(update={"folded": True})


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    delta, c = dm.prompts[adapter.name], adapter.config
    P = delta.prompt_embeddings.detach() if c.folded else delta.encoder.folded()
    site = dm.prompt_site
    fields = {**prompt_fields(dm, adapter, site.hidden_size, site.num_heads),
              "encoder_reparameterization_type": c.encoder_reparameterization_type,
              "encoder_hidden_size": c.encoder_hidden_size or site.hidden_size,
              "encoder_num_layers": c.encoder_num_layers, "encoder_dropout": c.encoder_dropout}
    return fields, {"prompt_embeddings": P, **base_heads(dm, adapter)}


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[PTuningConfig, dict]:
    check_prompt_fields(dm, pc, path, dm.prompt_site.hidden_size, dm.prompt_site.num_heads)
    P = prompt_embeddings(tensors, path)
    kind = pc.get("encoder_reparameterization_type", "MLP")
    config = PTuningConfig(num_virtual_tokens=P.shape[0], encoder_reparameterization_type=kind,
                           encoder_hidden_size=pc.get("encoder_hidden_size"),
                           encoder_num_layers=pc.get("encoder_num_layers", 2) if kind == "LSTM" else 2,
                           encoder_dropout=pc.get("encoder_dropout", 0.0), folded=True)  # PEFT saves P alone
    return config, {f"{PROMPT}.prompt_embeddings": P}


register_peft(PeftCodec("P_TUNING", ("p_tuning",), _export, _load, model_prefix="base_model."))
