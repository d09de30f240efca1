"""DePT: Decomposed Prompt Tuning (Shi & Lipani, arXiv:2309.05173, ICLR 2024), Sec. 2:

    x' = [P_s ; E(x) + s · A B],   P_s ∈ R^{m×d},   A ∈ R^{S×r},   B ∈ R^{r×d},   s = alpha / sqrt(r),

a short prompt of m tokens plus a low-rank update of the frozen input embeddings E(x) of the first S
input tokens (S = max_length: the official code pads every input to max_seq_length and adds A B to all of
its positions). m is derived so that DePT trains as many parameters as vanilla prompt tuning with l tokens:

    m·d + r(S + d) = l·d   ->   m = floor((l·d - r(S + d)) / d)   (floor: never over the budget).

Checked against the official code (ZhengxiangShi/DePT, peft/tuners/prompt_tuning_lora.py and peft_model.py):
A starts Kaiming-uniform (a = sqrt(5)), B at zero (so DePT starts as prompt tuning with m tokens), scale
lora_alpha / sqrt(r) with lora_alpha = 8, and P_s and (A, B) train with two learning rates (train.py:
`learning_rate` for the prompt, `lora_embedding_lr` for A and B). Departure, same function on the
official code's inputs: the row of A a token uses is its index among the real tokens (position = number
of unmasked tokens before it), not its slot in the padded array, so left-padded batches and generation
with a KV cache give each token its own row; tokens past S get no update.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.prompt import PromptConfig, PromptDelta, PromptSite
from ...engine.registry import register


def prompt_length(tokens: int, d: int, r: int, max_length: int) -> int:
    """m, the DePT prompt length with the trainable budget of l = `tokens` prompt-tuning tokens of width d."""
    m = (tokens * d - r * (max_length + d)) // d
    if m < 1:
        raise ValueError(
            f"DePT's pair A ({max_length}×{r}), B ({r}×{d}) takes r(max_length + d) = {r * (max_length + d):,} "
            f"parameters, leaving no prompt token in the budget of num_virtual_tokens·d = {tokens * d:,}: lower rank "
            f"or max_length, or raise num_virtual_tokens")
    return m


def dept_parameters(tokens: int, d: int, r: int, max_length: int) -> int:
    """Trainable parameters: m·d + r(S + d) (at most l·d, l = `tokens`)."""
    return prompt_length(tokens, d, r, max_length) * d + r * (max_length + d)


def embedding_update(A: Tensor, B: Tensor, scale: float, positions: Tensor) -> Tensor:
    """s · (A B)[positions] (batch, n, d), zero where position >= S (the rows A has)."""
    inside = positions < A.shape[0]
    rows = A[positions.clamp(max=A.shape[0] - 1)] * inside.unsqueeze(-1).to(A.dtype)  # (batch, n, r)
    return scale * (rows @ B)


def init_pair(max_length: int, r: int, d: int, **kw) -> tuple[Tensor, Tensor]:
    """A (S, r) Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(r)), B (r, d) zero, as the official code."""
    A = torch.nn.init.kaiming_uniform_(torch.empty(max_length, r, **kw), a=math.sqrt(5))
    return A, torch.zeros(r, d, **kw)


class DePTConfig(PromptConfig):
    num_virtual_tokens: int = Field(20, gt=0, description="l: the prompt-tuning length whose budget l*d DePT "
                                    "matches; its own prompt is m = floor((l*d - r(max_length + d)) / d) tokens")
    rank: int = Field(8, ge=1, description="r, the rank of the embedding update A (max_length x r) B (r x d)")
    max_length: int = Field(64, ge=1, description="S: input positions A B updates (the official code pads every "
                                                  "input to it); set it to the task's max length")
    alpha: float = Field(8.0, gt=0, description="scale s = alpha / sqrt(r) (the official code: lora_alpha = 8)")
    pair_lr_ratio: float = Field(1.0, gt=0, description="A and B learn at lr * ratio (the prompt at lr); the paper "
                                                        "searches the pair's rate apart, e.g. prompt 0.3, pair 5e-3")
    pair_lr: float | None = Field(None, gt=0, description="A and B's absolute learning rate (peak), instead of "
                                                          "pair_lr_ratio")

    @model_validator(mode="after")
    def _one_pair_rate(self) -> DePTConfig:
        if self.pair_lr is not None and self.pair_lr_ratio != 1.0:
            raise ValueError("give the embedding pair's learning rate once: pair_lr (absolute) or pair_lr_ratio "
                             "(times the optimizer's lr), not both")
        return self


@register("dept", config=DePTConfig, family="prompt", formula="m*d + r*(S + d) <= l*d", paper="arXiv:2309.05173",
          summary="DePT: a short prompt (m tokens) plus a low-rank update A B of the first S input embeddings, "
                  "two learning rates, the budget of l-token prompt tuning")
class DePT(PromptDelta):
    def __init__(self, config: DePTConfig, site: PromptSite, initialize: bool = True):
        super().__init__(config, site, initialize)
        d, r, S = site.hidden_size, config.rank, config.max_length
        self.num_virtual_tokens = prompt_length(config.num_virtual_tokens, d, r, S)  # m: what it prepends
        kw = {"device": site.embedding.weight.device}
        self.prompt_embeddings = nn.Parameter(torch.randn(self.num_virtual_tokens, d, **kw))  # nn.Embedding's N(0, 1)
        A, B = init_pair(S, r, d, **kw)
        self.dept_A, self.dept_B = nn.Parameter(A), nn.Parameter(B)
        self.scale = config.alpha / math.sqrt(r)

    def input_prompt(self, batch: int) -> Tensor:
        return self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1)

    def embed(self, input_ids: Tensor, embeds: Tensor, positions: Tensor) -> Tensor:
        """E(x) + s·(A B)[positions] (positions: each token's index among its row's real tokens)."""
        return embeds + embedding_update(self.dept_A, self.dept_B, self.scale, positions).to(embeds.dtype)

    def lr_groups(self, lr: float) -> list[tuple[list[nn.Parameter], float]]:
        """The prompt at lr, the pair A, B at its own rate (training/param_groups.py reads this)."""
        c = self.config
        return [([self.prompt_embeddings], lr), ([self.dept_A, self.dept_B], c.pair_lr if c.pair_lr else lr * c.pair_lr_ratio)]
