"""Prompt tuning (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691):

    inputs = [E_p ; E(x)],   E_p in R^{l x d} trained, the model frozen,

l virtual token embeddings prepended to the real tokens' (the engine extends the mask, labels and positions).
Initialisation as HF peft 0.21 `tuners/prompt_tuning` does it: "random" N(0, 1) (nn.Embedding's default),
"sample_vocab" the embeddings of l random vocabulary tokens, "text" the embeddings of `init_text`'s tokens
(or `init_token_ids`), repeated then cut to l. P = l·d.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from ...engine.peft_format import PeftCodec, check_prompt_fields, prompt_fields, register_peft
from ...engine.prompt import PROMPT, PromptConfig, PromptDelta, PromptSite
from ...engine.registry import register


class PromptTuningConfig(PromptConfig):
    init: Literal["random", "sample_vocab", "text"] = Field(
        "random", description="E_p's start: N(0, 1), random vocabulary tokens' embeddings, or init_text's")
    init_text: str | None = Field(None, description="init='text': the text whose token embeddings start E_p")
    tokenizer: str | None = Field(None, description="init='text': the tokenizer (path) that splits init_text")
    init_token_ids: list[int] | None = Field(None, description="init='text' without a tokenizer: the token ids")

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return str(value) if value is not None and not isinstance(value, str) else value  # a Path is fine

    @model_validator(mode="after")
    def _text_source(self) -> PromptTuningConfig:
        if self.init == "text" and self.init_token_ids is None and (self.init_text is None or self.tokenizer is None):
            raise ValueError("init='text' needs init_text and tokenizer (a tokenizer path), or init_token_ids")
        if self.init_token_ids is not None and not self.init_token_ids:
            raise ValueError("init_token_ids is empty: give at least one token id")
        return self


def text_token_ids(config: PromptTuningConfig) -> list[int]:
    """init='text''s token ids, repeated then cut to l (PEFT's PromptEmbedding)."""
    ids = config.init_token_ids
    if ids is None:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(config.tokenizer)(config.init_text)["input_ids"]
    n = config.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


@register("prompt_tuning", config=PromptTuningConfig, family="prompt", formula="l·d (model-level)",
          paper="https://arxiv.org/abs/2104.08691", summary="l trained virtual token embeddings before the inputs")
class PromptTuning(PromptDelta):
    def __init__(self, config: PromptTuningConfig, site: PromptSite, initialize: bool = True):
        super().__init__(config, site, initialize)
        W = site.embedding.weight
        self.prompt_embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, site.hidden_size,
                                                          device=W.device))  # E_p (l, d), float32 as in PEFT
        if initialize:
            self.reset(config, site)

    @torch.no_grad()
    def reset(self, config: PromptTuningConfig, site: PromptSite) -> None:
        W, n = site.embedding.weight, config.num_virtual_tokens
        if config.init == "random":
            self.prompt_embeddings.normal_()
            return
        ids = torch.randint(0, site.vocab_size, (n,)) if config.init == "sample_vocab" else \
            torch.tensor(text_token_ids(config))
        if int(ids.max()) >= site.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"init token ids must lie in [0, {site.vocab_size}) (the model's vocabulary); "
                             f"got {ids.tolist()}")
        self.prompt_embeddings.copy_(W[ids.to(W.device)].float())

    def input_prompt(self, batch: int) -> Tensor:
        return self.prompt_embeddings[None].expand(batch, -1, -1)  # (batch, l, d)


_PEFT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _peft_export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    site, cfg = dm.prompt_site, adapter.config
    fields = {**prompt_fields(dm, adapter, site.hidden_size, site.num_heads),
              "prompt_tuning_init": _PEFT_INITS[cfg.init], "prompt_tuning_init_text": cfg.init_text,
              "tokenizer_name_or_path": cfg.tokenizer, "tokenizer_kwargs": None}
    return fields, {"prompt_embeddings": dm.prompts[adapter.name].prompt_embeddings.detach()}


def _peft_load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any
               ) -> tuple[PromptTuningConfig, dict[str, Tensor]]:
    site = dm.prompt_site
    check_prompt_fields(dm, pc, path, site.hidden_size, site.num_heads)
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"PEFT prompt-tuning adapter at '{path}' holds {sorted(tensors)[:4]}, not one "
                         "'prompt_embeddings' tensor; save the adapter from PEFT again")
    init = {v: k for k, v in _PEFT_INITS.items()}.get(pc.get("prompt_tuning_init") or "RANDOM", "random")
    text = {"init_text": pc.get("prompt_tuning_init_text"), "tokenizer": pc.get("tokenizer_name_or_path")}
    if init == "text" and None in text.values():  # the init is history once the weights load
        init, text = "random", {}
    config = PromptTuningConfig(num_virtual_tokens=pc["num_virtual_tokens"], init=init, **text)
    return config, {f"{PROMPT}.prompt_embeddings": tensors["prompt_embeddings"]}


register_peft(PeftCodec("PROMPT_TUNING", ("prompt_tuning",), _peft_export, _peft_load, model_prefix="base_model."))
