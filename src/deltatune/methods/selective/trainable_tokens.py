"""Trainable tokens (PEFT's TRAINABLE_TOKENS): train the input embedding's rows of chosen token ids only.

A selection delta on the embedding weight's entries row·dim + j for each row in `token_indices`: the
engine's sparse Embedding path gathers the touched rows and never forms a vocabulary-sized ΔE. With tied
word embeddings (the lm_head's weight is the embedding's tensor) the update goes on the lm_head too, as
PEFT ties its layer there: one set of values, read by both, so the output logits of those tokens move as well
(the engine's tied-parameter rule, engine/selection.py).

PEFT stores the trained rows themselves (`<path>.trainable_tokens_delta`, in token_indices order, and
again under the tied lm_head); deltatune stores their change: the codec converts.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ...engine.layer import DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.selection import SelectionConfig, SelectionDelta
from ...engine.targeting import require_layers

# the input embedding's usual names (Llama/Mistral/Qwen, BERT, GPT-2, GPT-NeoX, T5): PEFT asks the model
# (get_input_embeddings) and falls back to 'embed_tokens'; a model named otherwise gives targets
INPUT_EMBEDDINGS = "re:(.*\\.)?(embed_tokens|word_embeddings|wte|embed_in|shared)\\.weight"


class TrainableTokensConfig(SelectionConfig):
    token_indices: list[int] = Field(description="the token ids whose embedding rows are trained")

    @field_validator("token_indices")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("token_indices is empty: give the ids of the tokens to train, e.g. "
                             "tokenizer.convert_tokens_to_ids(['<new_token>'])")
        if min(v) < 0:
            raise ValueError(f"token_indices holds a negative id ({min(v)}); token ids start at 0")
        if len(set(v)) != len(v):
            dup = sorted({i for i in v if v.count(i) > 1})
            raise ValueError(f"token_indices repeats ids {dup[:5]}; list each token once")
        return v

    def default_parameter_targets(self) -> Any:
        return [INPUT_EMBEDDINGS]


@register("trainable_tokens", config=TrainableTokensConfig, family="selective", formula="len(token_indices) · d",
          paper="", summary="train the embedding rows of chosen tokens")
class TrainableTokens(SelectionDelta):
    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        if param.dim() != 2:
            raise ValueError(f"trainable_tokens selects rows of an embedding matrix; '{layer.path}.{name}' has "
                             f"shape {tuple(param.shape)}: target the input embedding's weight")
        rows = torch.tensor(self.config.token_indices, dtype=torch.long)
        if rows.max() >= param.shape[0]:
            raise ValueError(f"token id {int(rows.max())} is out of range for '{layer.path}' ({param.shape[0]} "
                             "rows); resize the embeddings (model.resize_token_embeddings) before adding the tokens")
        return (rows[:, None] * param.shape[1] + torch.arange(param.shape[1])).reshape(-1)

    def rows(self, layer: DeltaLayer, name: str = "weight") -> Tensor:
        """The update of the chosen rows, (len(token_indices), d) in token_indices order."""
        dim = self._shape(layer, name)[1]
        rows = self.index(name).reshape(-1, dim)[:, 0] // dim  # the sorted row of each block of d entries
        order = torch.searchsorted(rows, torch.tensor(self.config.token_indices, device=rows.device))
        return self.value(name).reshape(-1, dim)[order]


# --- PEFT format: '<path>.trainable_tokens_delta', the trained rows in token_indices order ---------------------
_KEY = "trainable_tokens_delta"


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors, first = {}, []
    ids = adapter.config.token_indices
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        delta = layer.deltas[adapter.name]
        base = layer.weight[torch.tensor(ids, device=layer.weight.device)]
        tensors[f"{p}.{_KEY}"] = (base + delta.rows(layer).to(base.dtype)).detach().clone()
        first += [] if "weight" in delta._alias else [p]  # PEFT targets the embedding; it ties the lm_head itself
    return {"target_modules": first[0] if len(first) == 1 else first, "token_indices": ids,
            "init_weights": True}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    per_layer = layer_tensors(tensors, {_KEY: "rows"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    ids = [int(i) for i in pc["token_indices"]]
    ids_t = torch.tensor(ids)
    order = torch.argsort(ids_t)  # deltatune's layout: entries row·d + j with the rows sorted
    seen: dict[int, str] = {}  # weight tensor -> the first path holding it (a tied lm_head reads the embedding's)
    state = {}
    for p in sorted(per_layer):
        module = dm.model.get_submodule(p)
        weight = getattr(module, "base_layer", module).weight
        rows, d = per_layer[p]["rows"], weight.shape[1]
        if rows.shape != (len(ids), d):
            raise ValueError(f"PEFT adapter '{path}': '{p}.{_KEY}' has shape {tuple(rows.shape)}, not "
                             f"({len(ids)}, {d}) for token_indices and '{p}'; load it onto its model")
        if id(weight) in seen:
            if not torch.equal(rows, per_layer[seen[id(weight)]]["rows"]):
                raise ValueError(f"PEFT adapter '{path}' holds different rows for '{p}' and '{seen[id(weight)]}', "
                                 "whose weights are tied here; load it onto the model it was trained on")
            continue
        seen[id(weight)] = p
        change = rows.to(weight.dtype) - weight.detach()[ids_t.to(weight.device)].to(rows.device)  # PEFT: the rows
        state[f"{p}.values.weight"] = change[order].reshape(-1)
        state[f"{p}.index_weight"] = (ids_t[order][:, None] * d + torch.arange(d)).reshape(-1)
    config = make_config("trainable_tokens", token_indices=ids, targets=[f"{p}.weight" for p in seen.values()])
    return config, state


register_peft(PeftCodec("TRAINABLE_TOKENS", ("trainable_tokens",), _export, _load))
