"""Model-level deltas: virtual tokens before the inputs (prompt tuning) or virtual keys/values in every
attention layer (prefix tuning, P-tuning v2). A method says only what it adds (`PromptDelta`); this module
turns a batch into the one the base model runs: embeddings with the prompt in front, attention mask, labels,
token types and positions extended, the prefix passed as a transformers Cache.

Layout of one row, alone: cache [prefix (k)] + inputs [prompt (p), real tokens (T)]. Real tokens sit at
positions k + p + t, as PEFT runs them (the model counts the cache, then the prompt). In a mixed batch
(rows with other prompts or none) each row keeps that layout and is padded to the longest: masked cache
slots after its prefix, masked input slots after its tokens, and explicit position_ids, so that every row
equals itself alone on its first p + T output positions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from .registry import DeltaConfig

PROMPT = "__prompt__"  # state-dict prefix (and parameter_table layer) of a model-level delta's tensors
TASKS = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForSequenceClassification": "seq_cls",
         "ForTokenClassification": "token_cls", "ForQuestionAnswering": "qa"}


class PromptConfig(DeltaConfig):
    """Fields of every model-level delta: how many virtual tokens. `targets`/`exclude` do not apply."""

    num_virtual_tokens: int = Field(20, gt=0, description="l: how many virtual tokens (positions) it prepends")

    @field_validator("targets", "exclude")
    @classmethod
    def _no_targets(cls, value: Any) -> Any:
        if value not in (None, []):  # [] is how a saved model-level adapter lists its (no) layers
            raise ValueError(f"{cls.__name__} changes the whole model's inputs, not layers: remove targets/exclude "
                             f"(got {value!r})")
        return None


@dataclass
class PromptSite:
    """What a model-level delta needs to know about the model (from its config and input embedding)."""

    model_type: str
    hidden_size: int  # d: the embedding width
    num_layers: int  # L: attention layers that read a key/value prefix
    num_heads: int
    num_kv_heads: int  # key/value heads (GQA: fewer than num_heads)
    head_dim: int
    vocab_size: int
    embedding: nn.Module  # the model's input embedding (get_input_embeddings())
    is_encoder_decoder: bool = False
    task: str = "causal_lm"  # "seq_cls" | "causal_lm" | "token_cls" | "qa" | "feature"


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding as it runs now (a DeltaLayer when a weight adapter wraps it), or None."""
    getter = getattr(model, "get_input_embeddings", None)
    return getter() if callable(getter) else None


def prompt_site(model: nn.Module) -> PromptSite:
    """The PromptSite of a transformers model, or a one-line error saying what is missing."""
    config = getattr(model, "config", None)
    embedding = input_embedding(model)
    embedding = getattr(embedding, "base_layer", embedding)  # the table itself, under any weight adapter
    if config is None or not isinstance(embedding, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no transformers config or input embedding "
                         "(get_input_embeddings()), which prompt methods prepend to: use a transformers model")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    task = next((t for suffix, t in TASKS.items() if type(model).__name__.endswith(suffix)), "feature")
    return PromptSite(text.model_type, embedding.embedding_dim, text.num_hidden_layers, heads,
                      getattr(text, "num_key_value_heads", None) or heads, head_dim, embedding.num_embeddings,
                      embedding, bool(getattr(config, "is_encoder_decoder", False)), task)


class PromptDelta(nn.Module):
    """One adapter's change to the whole model's inputs. Methods give what they add; the engine does the rest.

    input_prompt(batch) -> (batch, l, d) embeddings prepended to the inputs, or None
    kv_prefix(batch) -> per layer (k, v), each (batch, kv_heads, l, head_dim), or None
    embed(input_ids, embeds, positions) -> the real tokens' embeddings (DePT changes them); default: unchanged.
        positions (batch, n): each token's index among its row's real tokens (left padding and generate()'s
        later steps included)
    loss(logits, labels, **batch) -> the method's own loss (CPT), given the caller's labels and the batch
        entries named in `batch_keys` (taken out before the base model runs); default None: the model's loss
    fold() drops a reparameterisation (prefix MLP, P-tuning encoder), outputs unchanged
    """

    method: str = ""
    mergeable = False
    model_level = True

    def __init__(self, config: PromptConfig, site: PromptSite, initialize: bool = True):
        super().__init__()
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        # the base model's embedding, not a submodule: neither saved nor counted with the adapter
        self.__dict__["site"] = site

    def input_prompt(self, batch: int) -> Tensor | None:
        return None

    def kv_prefix(self, batch: int) -> list[tuple[Tensor, Tensor]] | None:
        return None

    batch_keys: tuple[str, ...] = ()

    def embed(self, input_ids: Tensor, embeds: Tensor, positions: Tensor) -> Tensor:
        return embeds

    def loss(self, logits: Tensor, labels: Tensor, **batch: Tensor) -> Tensor | None:
        return None

    def fold(self) -> None:
        """Replace a reparameterisation by its output (no-op when there is none)."""

    def regularizer(self) -> Tensor | None:
        return None

    def on_step(self, step: int) -> None:
        """Called before each training step's forward (DeltaModel.on_train_step)."""

    def extra_repr(self) -> str:
        options = self.config.model_dump(exclude={"targets", "exclude"}, exclude_defaults=True)
        return ", ".join(f"{k}={v}" for k, v in options.items())


@dataclass
class _Rows:
    """One batch's prompt parts, assembled per row: the input prompt and the cache prefix, with their lengths."""

    prompt: Tensor | None  # (B, P, d), rows padded after their own prompt
    prompt_len: list[int]  # p per row
    prefix: list[tuple[Tensor, Tensor]] | None  # per layer (B, kv_heads, K, head_dim)
    prefix_len: list[int]  # k per row

    @property
    def uniform(self) -> bool:
        return len(set(self.prompt_len)) == 1 and len(set(self.prefix_len)) == 1


def _pad_to(t: Tensor, n: int, dim: int) -> Tensor:
    """`t` zero-padded at the end of `dim` to length n."""
    pad = list(t.shape)
    pad[dim] = n - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim) if pad[dim] else t


def assemble(deltas: Sequence[PromptDelta | None]) -> _Rows:
    """The prompt parts of a batch whose row i uses deltas[i] (None: no prompt). One delta for every row
    computes its parts once at batch size B; mixed rows get theirs per distinct delta, padded and stacked."""
    batch = len(deltas)
    distinct = list(dict.fromkeys(d for d in deltas if d is not None))
    if len(distinct) == 1 and len(distinct) == len(set(deltas)):  # every row the same delta
        d = distinct[0]
        prompt, prefix = d.input_prompt(batch), d.kv_prefix(batch)
        p = 0 if prompt is None else prompt.shape[1]
        k = 0 if prefix is None else prefix[0][0].shape[2]
        return _Rows(prompt, [p] * batch, prefix, [k] * batch)
    parts = {d: (d.input_prompt(1), d.kv_prefix(1)) for d in distinct}
    prompt_of = [parts[d][0] if d is not None else None for d in deltas]
    prefix_of = [parts[d][1] if d is not None else None for d in deltas]
    p = [0 if t is None else t.shape[1] for t in prompt_of]
    k = [0 if t is None else t[0][0].shape[2] for t in prefix_of]
    prompt = None
    if max(p):
        ref = next(t for t in prompt_of if t is not None)
        empty = ref.new_zeros(1, 0, ref.shape[2])
        prompt = torch.cat([_pad_to(t if t is not None else empty, max(p), 1) for t in prompt_of])
    prefix = None
    if max(k):
        ref = next(t for t in prefix_of if t is not None)
        empty = [tuple(x.new_zeros(*x.shape[:2], 0, x.shape[3]) for x in kv) for kv in ref]
        rows = [t if t is not None else empty for t in prefix_of]
        prefix = [tuple(torch.cat([_pad_to(r[layer][j], max(k), 2) for r in rows]) for j in range(2))
                  for layer in range(len(ref))]
    return _Rows(prompt, p, prefix, k)


def _slots(lengths: list[int], width: int, device: torch.device) -> Tensor:
    """(B, width) 0/1: row i's first lengths[i] slots set."""
    return (torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()


def cache_argument(model: nn.Module) -> str:
    """The keyword the model's forward takes a Cache under: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


@functools.cache
def _prefix_cache_class() -> type:
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A DynamicCache holding the prefix. `grow=False` (a training forward): update() returns [prefix; new]
        without storing the new keys/values, so a layer run again on the same call (gradient checkpointing's
        recompute) sees the prefix alone again instead of its own first pass appended to it."""

        def __init__(self, prefix: list[tuple[Tensor, Tensor]], grow: bool):
            super().__init__(prefix)
            self.grow = grow

        def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
                   ) -> tuple[Tensor, Tensor]:
            if self.grow:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)

    return PrefixCache


def make_cache(prefix: list[tuple[Tensor, Tensor]], grow: bool = True) -> Any:
    return _prefix_cache_class()(prefix, grow)


@contextlib.contextmanager
def read_only_cache(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """Within the block, transformers' checkpointed layers keep a prefix cache that is only read (a training
    forward): they drop any cache under gradient checkpointing, as a written one would be written twice, which
    would silently train without the prefix."""
    if not any(getattr(v, "grow", True) is False for v in kwargs.values()):
        yield
        return
    layers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    before = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, old in zip(layers, before):
            if old is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = old


def prepared_inputs(model: nn.Module, site: PromptSite, rows: _Rows, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The base model's keyword arguments for a batch with prompt parts `rows` (see the module docstring)."""
    kwargs = dict(kwargs)
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if (input_ids is None) == (embeds is None):
        raise ValueError("a prompt adapter needs exactly one of input_ids or inputs_embeds (as keyword arguments)")
    if embeds is None:  # through any weight adapter on the embedding, and the deltas' embed hook
        embeds = input_embedding(model)(input_ids)
    B, T = embeds.shape[:2]
    dev = embeds.device
    P, K = max(rows.prompt_len), max(rows.prefix_len)
    mask = kwargs.get("attention_mask")
    mask = torch.ones(B, T, dtype=torch.long, device=dev) if mask is None else mask
    if mask.dim() != 2:
        raise ValueError(f"prompt adapters extend a 2-D attention_mask (batch, sequence); got {tuple(mask.shape)}")
    # inputs: [prompt slots (P), real tokens (T)] reordered per row to [its prompt, its tokens, its unused slots]
    order = _input_order(rows.prompt_len, P, T, dev)

    def extend(t: Tensor, virtual: Tensor) -> Tensor:
        """`t` (B, T, ...) with the prompt slots' values `virtual` (B, P, ...) in front, in each row's order."""
        index = order.to(t.device).view(B, P + T, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
        return torch.cat([virtual.to(t.dtype), t], 1).gather(1, index)

    if P:  # unused prompt slots are masked, labelled -100 and of token type 0: padding
        embeds = extend(embeds, rows.prompt)
        mask = extend(mask, _slots(rows.prompt_len, P, dev))
        for key, fill in (("labels", -100), ("token_type_ids", 0)):
            t = kwargs.get(key)
            if t is not None and t.dim() == 2 and t.shape[1] == T:  # seq-cls labels (B,) stay as they are
                kwargs[key] = extend(t, torch.full((B, P), fill, device=t.device))
    if K:
        mask = torch.cat([_slots(rows.prefix_len, K, dev).to(mask.dtype), mask], 1)
        # a training forward only reads the cache (checkpointed layers run twice on it: read_only_cache); eval
        # forwards and generate() grow it as transformers' own cache does
        grow = not (model.training and torch.is_grad_enabled())
        kwargs[cache_argument(model)] = make_cache(rows.prefix, grow)
    kwargs["attention_mask"] = mask
    positions = kwargs.get("position_ids")
    if positions is not None or not rows.uniform:  # a row's tokens where they are alone: after k + p virtual ones
        k = torch.tensor(rows.prefix_len, device=dev)[:, None]
        p = torch.tensor(rows.prompt_len, device=dev)[:, None]
        real = (torch.arange(T, device=dev)[None, :] if positions is None else positions.to(dev)) + k + p
        real = real.expand(B, T)
        kwargs["position_ids"] = extend(real, k + torch.arange(P, device=dev)[None, :]) if P else real
    kwargs["inputs_embeds"] = embeds
    return kwargs


def _input_order(prompt_len: list[int], P: int, T: int, device: torch.device) -> Tensor:
    """(B, P + T) indices into [prompt slots (P), real tokens (T)] that put row i's p_i prompt slots first,
    its T tokens next and its unused prompt slots (padding) last."""
    j = torch.arange(P + T, device=device)[None, :]
    p = torch.tensor(prompt_len, device=device)[:, None]
    return torch.where(j < p, j, torch.where(j < p + T, P + j - p, j - T))


@contextlib.contextmanager
def embedding_hook(model: nn.Module, deltas: Sequence[PromptDelta | None], attention_mask: Tensor | None = None
                   ) -> Iterator[None]:
    """Within the block, the input embedding's output goes through each row's delta.embed (DePT): in a forward
    and in every generate() step. Deltas that keep the default `embed` add no hook.

    Positions: the first call embeds the whole input, laid out by `attention_mask` (each token's index among
    its row's real tokens); later calls are generate()'s steps, each new token the next real one."""
    changing = [d for d in dict.fromkeys(deltas)
                if d is not None and getattr(d.embed, "__func__", None) is not PromptDelta.embed]
    if not changing:
        yield
        return
    seen: list[Tensor] = []  # per row, real tokens embedded so far in this block

    def positions(ids: Tensor) -> Tensor:
        n = ids.shape[1]
        if not seen:
            mask = attention_mask if attention_mask is not None and attention_mask.shape == ids.shape else \
                torch.ones_like(ids)
            mask = mask.to(ids.device).long()
            seen.append(mask.sum(1))
            return (mask.cumsum(1) - 1).clamp(min=0)
        pos = seen[0][:, None] + torch.arange(n, device=ids.device)
        seen[0] = seen[0] + n
        return pos

    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        ids = args[0]
        pos = positions(ids)
        if len(set(deltas)) == 1:
            return deltas[0].embed(ids, out, pos)
        out = out.clone()
        for d in changing:
            rows = torch.tensor([i for i, r in enumerate(deltas) if r is d], device=out.device)
            out[rows] = d.embed(ids[rows], out[rows], pos[rows])
        return out

    handle = input_embedding(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def method_loss(deltas: Sequence[PromptDelta | None], kwargs: dict[str, Any]
                ) -> tuple[Callable[[Any], Any] | None, dict[str, Any]]:
    """(output -> output with the method's loss, kwargs without what the base model must not see), for a batch
    whose delta computes its own loss (CPT); (None, kwargs) otherwise."""
    owners = [d for d in dict.fromkeys(deltas) if d is not None and type(d).loss is not PromptDelta.loss]
    if not owners:
        return None, kwargs
    kwargs = dict(kwargs)
    batch = {k: kwargs.pop(k) for d in owners for k in d.batch_keys if k in kwargs}
    labels = kwargs.pop("labels", None)
    if labels is None:
        return None, kwargs
    if len(set(deltas)) > 1:
        raise ValueError(f"{owners[0].method} computes its own loss over the whole batch, so a batch with labels "
                         "cannot mix it with other adapters (adapter_names): run its rows apart")
    delta = owners[0]

    def with_loss(output: Any) -> Any:
        output.loss = delta.loss(output.logits, labels, **batch)
        return output

    return with_loss, kwargs


def generate(model: nn.Module, site: PromptSite, deltas: Sequence[PromptDelta | None], kwargs: dict[str, Any]) -> Any:
    """model.generate with the prompt parts on the first step and the prefix in the cache from the start.

    transformers' generate keeps the whole sequence in input_ids and treats the first cache-length tokens as
    already cached; so K + P placeholder ids go in front (the prefix fills the cache, the prompt is in
    inputs_embeds), and come off the returned sequences: input_ids + new tokens, as PEFT returns them."""
    rows = assemble(deltas)
    if not rows.uniform:
        raise ValueError("generate() with adapter_names whose prompts differ in length (or prompt and no prompt rows) "
                         "is not supported: generate each group of rows with its adapter active")
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("generate() with a prompt adapter needs input_ids (as a keyword argument)")
    inputs = prepared_inputs(model, site, rows, {**kwargs, "input_ids": input_ids})
    P, K = rows.prompt_len[0], rows.prefix_len[0]
    B, dev = input_ids.shape[0], input_ids.device
    filler = torch.zeros(B, K + P, dtype=input_ids.dtype, device=dev)
    inputs["input_ids"] = torch.cat([filler, input_ids], 1)
    embeds = inputs.pop("inputs_embeds")
    if P:  # placeholders for the cached positions, sliced off by generate's prefill
        inputs["inputs_embeds"] = torch.cat([embeds.new_zeros(B, K, embeds.shape[2]), embeds], 1)
    if "position_ids" in inputs:
        raise ValueError("generate() with a prompt adapter takes no position_ids; leave them to the model")
    if inputs.get("max_new_tokens") is None:  # a total length counts the real tokens, as in PEFT: not the placeholders
        limit = inputs.get("max_length") or getattr(getattr(model, "generation_config", None), "max_length", None)
        if limit is not None:
            inputs["max_length"] = limit + K + P
    out = model.generate(**inputs)
    if isinstance(out, Tensor):
        return out[:, K + P:]
    out.sequences = out.sequences[:, K + P:]
    return out
