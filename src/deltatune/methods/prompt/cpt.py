"""CPT: Context-aware Prompt Tuning (Blau et al., arXiv:2410.17222), as HF peft 0.21 `tuners/cpt` computes it.

The prompt is a context of l tokens (training examples written out: input templates, inputs, output
templates, labels), embedded by the frozen model and refined by a trained delta kept in an ε-ball:

    P = E(c) + Π(Δ),   Π(Δ)_i = Δ_i · ε_i / max(|Δ_i|_2, ε_i)   (projected gradient descent),

with one type per context token (PEFT's cpt_tokens_type_mask; example k uses 4k+1 .. 4k+4):
type % 4 = 1 input template, 2 input, 3 output template, 0 (and > 0) label. Only template and input tokens
train (the labels' Δ gets no gradient); ε_i = format_epsilon·sqrt(d/2048) for templates, epsilon·sqrt(d/2048)
for inputs, 1e-10 otherwise. Π is applied to Δ itself before each forward (PEFT: `delta_embedding.weight.data
= get_projection()`), so the optimizer steps from the projected point, as projected gradient descent does.

The loss covers the context's label tokens too: the labels of the context are its own token ids at label
positions, the batch's labels count where its `input_type_mask` (shifted past the context's types) is a
label type, and with loss_weighting='decay' the k-th label from the last is weighted decay^k. The loss is
the mean of the weighted per-token cross-entropies over every labelled token of the batch.
P = l·d (Δ; E(c) is a frozen copy).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.peft_format import (
    PeftCodec,
    check_prompt_fields,
    prompt_embeddings,
    prompt_fields,
    register_peft,
)
from ...engine.prompt import PROMPT, PromptConfig, PromptDelta, PromptSite
from ...engine.registry import register

MIN_EPSILON = 1e-10  # labels and untyped tokens: Δ stays (numerically) zero


def trained_tokens(types: Tensor) -> Tensor:
    """(l,) bool: the context tokens whose Δ trains (templates and inputs, not labels)."""
    return torch.remainder(types, 4) != 0


def epsilons(types: Tensor, d: int, epsilon: float, format_epsilon: float) -> Tensor:
    """(l,) radius of each token's ball, scaled by sqrt(d/2048) as PEFT does."""
    scale = math.sqrt(d / 2048)
    eps = torch.full(types.shape, MIN_EPSILON, dtype=torch.float32, device=types.device)
    kind = torch.remainder(types, 4)
    typed = types > 0
    eps[typed & ((kind == 1) | (kind == 3))] = format_epsilon * scale
    eps[typed & (kind == 2)] = epsilon * scale
    return eps


def project(delta: Tensor, eps: Tensor) -> Tensor:
    """Π: each row of delta scaled into its ε-ball (rows inside it unchanged, zero rows left zero)."""
    norm = delta.norm(dim=1)
    factor = eps.to(delta.dtype) / torch.maximum(norm, eps.to(delta.dtype))
    return torch.where((norm > 0).unsqueeze(1), delta * factor.unsqueeze(1), delta)


def context_labels(token_ids: Tensor, types: Tensor) -> Tensor:
    """(l,) the context's labels: its own ids at label positions, -100 elsewhere."""
    return torch.where(is_label(types), token_ids, torch.full_like(token_ids, -100))


def is_label(types: Tensor) -> Tensor:
    return (types > 0) & (torch.remainder(types, 4) == 0)


def full_labels(labels: Tensor, input_types: Tensor | None, token_ids: Tensor, types: Tensor
                ) -> tuple[Tensor, Tensor]:
    """(labels, types) for the sequence [context ; input], both (batch, l + n).

    input_types defaults to 4 everywhere (PEFT's default); typed input tokens are shifted past the
    context's largest type so that their examples count after the context's."""
    b, n = labels.shape
    if input_types is None:
        input_types = torch.full((b, n), 4, dtype=torch.long, device=labels.device)
    input_types = input_types.long().to(labels.device)
    input_types = torch.where(input_types > 0, input_types + types.max().to(labels.device), input_types)
    all_types = torch.cat([types.to(labels.device).expand(b, -1), input_types], dim=1)
    all_labels = torch.cat([context_labels(token_ids, types).to(labels.device).expand(b, -1), labels], dim=1)
    return torch.where(is_label(all_types), all_labels, torch.full_like(all_labels, -100)), all_types


def decay_weights(types: Tensor, decay: float) -> Tensor:
    """(batch, L) weight of each position: the label tokens of the k-th example from the last get decay^k.

    A row's examples are the distinct label types in it; positions of other types keep weight 1."""
    weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
    for i in range(types.shape[0]):
        examples = types[i][is_label(types[i])].unique()  # sorted ascending: the last example is the largest
        for k, t in enumerate(torch.flip(examples, [0])):
            weights[i][types[i] == t] = decay ** k
    return weights


def cpt_loss(logits: Tensor, labels: Tensor, types: Tensor, decay: float | None) -> Tensor:
    """Mean next-token cross-entropy over the labelled positions, decay-weighted when decay is given."""
    logits, labels, types = logits[:, :-1], labels[:, 1:], types[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             reduction="none", ignore_index=-100).view(labels.shape)
    keep = labels != -100
    weights = decay_weights(types, decay) if decay is not None else torch.ones_like(losses)
    return (losses[keep] * weights[keep]).mean()


class CPTConfig(PromptConfig):
    num_virtual_tokens: int = Field(1, gt=0, description="l: set from token_ids (the context's length)")
    token_ids: list[int] = Field(min_length=1, description="the context's token ids, which initialise P "
                                 "(PEFT's cpt_token_ids): training examples written out")
    type_mask: list[int] | None = Field(None, description="each context token's type, example k using 4k+1..4k+4: "
                                        "input template, input, output template, label (PEFT's "
                                        "cpt_tokens_type_mask); None = all 1 (templates)")
    loss_weighting: Literal["none", "decay"] = Field("none", description="'decay': the k-th label from the last "
                                                     "weighs loss_decay^k")
    loss_decay: float = Field(1.0, gt=0, description="the decay factor of loss_weighting='decay'")
    epsilon: float = Field(0.1, gt=0, description="radius of the input tokens' ball, times sqrt(d/2048)")
    format_epsilon: float = Field(0.1, gt=0, description="radius of the template tokens' ball, times sqrt(d/2048)")

    @model_validator(mode="before")
    @classmethod
    def _length_from_context(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("token_ids"):
            n = len(data["token_ids"])
            if data.get("num_virtual_tokens", n) != n:
                raise ValueError(f"num_virtual_tokens={data['num_virtual_tokens']} differs from the {n} token_ids: "
                                 "CPT's prompt is its context, so drop num_virtual_tokens")
            if data.get("type_mask") is not None and len(data["type_mask"]) != n:
                raise ValueError(f"type_mask has {len(data['type_mask'])} entries for {n} token_ids: give one type "
                                 "per context token")
            data = {**data, "num_virtual_tokens": n}
        return data


@register("cpt", config=CPTConfig, family="prompt", formula="l*d", paper="arXiv:2410.17222",
          summary="CPT: a context of examples as the prompt, its embeddings refined within an epsilon-ball "
                  "(projected gradient), the context's labels in the loss")
class CPT(PromptDelta):
    batch_keys = ("input_type_mask",)  # the batch's token types, taken out before the base model runs

    def __init__(self, config: CPTConfig, site: PromptSite, initialize: bool = True):
        super().__init__(config, site, initialize)
        if site.task != "causal_lm":
            raise ValueError(f"CPT trains on the context's label tokens with the language-model head, so it needs a "
                             f"causal LM (this model is {site.task}); use prompt tuning for other tasks")
        device = site.embedding.weight.device
        ids = torch.tensor(config.token_ids, device=device)
        if int(ids.max()) >= site.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"CPT token_ids must lie in the vocabulary [0, {site.vocab_size}); got "
                             f"{int(ids.min())} .. {int(ids.max())}")
        types = torch.tensor(config.type_mask or [1] * len(ids), device=device)
        self.register_buffer("cpt_token_ids", ids, persistent=False)
        self.register_buffer("cpt_types", types, persistent=False)
        with torch.no_grad():  # E(c): a frozen fp32 copy of the context's embeddings (saved: the file is whole)
            self.register_buffer("cpt_context", site.embedding(ids).detach().float().clone())
        self.cpt_delta = nn.Parameter(torch.zeros(len(ids), site.hidden_size, device=device))
        self.register_buffer("cpt_epsilon", epsilons(types, site.hidden_size, config.epsilon, config.format_epsilon),
                             persistent=False)
        self.register_buffer("cpt_trained", trained_tokens(types).float().unsqueeze(1), persistent=False)

    def input_prompt(self, batch: int) -> Tensor:
        with torch.no_grad():  # projected gradient descent: the step is taken from the projected point
            self.cpt_delta.copy_(project(self.cpt_delta, self.cpt_epsilon))
        P = self.cpt_context + self.cpt_delta * self.cpt_trained  # labels' rows get no gradient
        return P.unsqueeze(0).expand(batch, -1, -1)

    def virtual_tokens(self) -> Tensor:
        """P = E(c) + Π(Δ) (l, d), what PEFT saves as prompt_embeddings."""
        with torch.no_grad():
            return self.input_prompt(1)[0].clone()

    def loss(self, logits: Tensor, labels: Tensor, input_type_mask: Tensor | None = None) -> Tensor:
        """The CPT loss over [context ; inputs] (logits (batch, l + n, V), labels (batch, n))."""
        full, types = full_labels(labels, input_type_mask, self.cpt_token_ids, self.cpt_types)
        decay = self.config.loss_decay if self.config.loss_weighting == "decay" else None
        return cpt_loss(logits, full, types, decay)


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    delta, c = dm.prompts[adapter.name], adapter.config
    site = dm.prompt_site
    fields = {**prompt_fields(dm, adapter, site.hidden_size, site.num_heads), "cpt_token_ids": list(c.token_ids),
              "cpt_mask": [1] * len(c.token_ids), "cpt_tokens_type_mask": delta.cpt_types.tolist(),
              "opt_weighted_loss_type": c.loss_weighting, "opt_loss_decay_factor": c.loss_decay,
              "opt_projection_epsilon": c.epsilon, "opt_projection_format_epsilon": c.format_epsilon}
    return fields, {"prompt_embeddings": delta.virtual_tokens()}  # PEFT saves E(c) + Π(Δ)


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[CPTConfig, dict]:
    check_prompt_fields(dm, pc, path, dm.prompt_site.hidden_size, dm.prompt_site.num_heads)
    P = prompt_embeddings(tensors, path)
    config = CPTConfig(token_ids=pc["cpt_token_ids"], type_mask=pc.get("cpt_tokens_type_mask"),
                       loss_weighting=pc.get("opt_weighted_loss_type", "none"),
                       loss_decay=pc.get("opt_loss_decay_factor", 1.0), epsilon=pc.get("opt_projection_epsilon", 0.1),
                       format_epsilon=pc.get("opt_projection_format_epsilon", 0.1))
    # PEFT keeps P as the context and starts Δ again at zero, and so does the import
    return config, {f"{PROMPT}.cpt_context": P, f"{PROMPT}.cpt_delta": torch.zeros_like(P)}


register_peft(PeftCodec("CPT", ("cpt",), _export, _load, model_prefix="base_model."))
