"""Layer removal by Block Influence: ShortGPT.

*ShortGPT: Layers in Large Language Models are More Redundant Than You Expect*, Men et al. 2024,
https://arxiv.org/abs/2403.03853, Eq. (1):

    BI_i = 1 - E_{X,t} [ X_{i,t} . X_{i+1,t} / (||X_{i,t}|| ||X_{i+1,t}||) ]

where X_i is the input of block i and X_{i+1} its output, t a token. A block whose output points the
way its input did changes little and is the first to go: delete the n blocks with the lowest BI.

Checked against the official code (github.com/icip-cas/ShortGPT, shortgpt/metrics.py and shortgpt.py):
it takes consecutive pairs of Hugging Face `output_hidden_states` and sums 1 - cos over every token,
padding included. Two departures here, both tested:
- the states are read by hooks on the blocks themselves, because Hugging Face applies the final norm
  to the last entry of `hidden_states`, so the official pairs measure the last block against a
  normalised output (its BI is then too high to ever remove);
- the mean runs over non-padding tokens only (the attention mask), as the paper's E_t intends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# config lists with one entry per block, filtered along with the blocks
PER_LAYER_CONFIG = ("layer_types",)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def no_cache(model: nn.Module) -> dict[str, bool]:
    """Forward kwargs that stop a Hugging Face model from building a KV cache nobody reads."""
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the model's repeated blocks: the longest nn.ModuleList whose children share one type.

    Llama: model.layers; BERT: bert.encoder.layer; GPT-2: transformer.h. The outermost wins a tie.
    """
    lists = [
        (path, m) for path, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(block) for block in m}) == 1
    ]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical blocks (transformer layers); "
                         "name the layers to work on explicitly")
    return max(lists, key=lambda item: len(item[1]))


def cosine_sums(h_in: Tensor, h_out: Tensor, mask: Tensor | None = None) -> tuple[float, int]:
    """(sum of cos(h_in_t, h_out_t), number of tokens) over the tokens where `mask` is 1.

    h_in, h_out: (B, T, D); mask: (B, T) or None (every token counts).
    """
    cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
    if mask is None:
        return cos.sum().item(), cos.numel()
    keep = mask.bool()
    return cos[keep].sum().item(), int(keep.sum().item())


def influence_from_states(states: Sequence[Tensor], mask: Tensor | None = None) -> list[float]:
    """BI of each block from [X_0, X_1, ..., X_L]: the input of block 0, then every block's output."""
    sums = [cosine_sums(a, b, mask) for a, b in zip(states, states[1:])]
    return [1.0 - total / count for total, count in sums]


def _hidden(value) -> Tensor:
    """The hidden states in a block's input or output (blocks return a tensor or a tuple starting with it)."""
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> list[float]:
    """BI_i of every block, averaged over the non-padding tokens of all `batches`.

    Args:
        model: a Hugging Face model (or any model whose blocks sit in one nn.ModuleList).
        batches: dicts with input_ids and optionally attention_mask (labels are ignored).
    """
    _, blocks = find_blocks(model)
    inputs: list[Tensor | None] = [None] * len(blocks)
    totals = [[0.0, 0] for _ in blocks]
    mask: Tensor | None = None

    def hook(i: int):
        def pre(module, args, kwargs):
            inputs[i] = _hidden(args[0] if args else kwargs["hidden_states"])

        def post(module, args, kwargs, output):
            total, count = cosine_sums(inputs[i], _hidden(output), mask)
            totals[i][0] += total
            totals[i][1] += count

        return pre, post

    handles = []
    for i, block in enumerate(blocks):
        pre, post = hook(i)
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.register_forward_hook(post, with_kwargs=True)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask = batch["attention_mask"].to(device) if "attention_mask" in batch else None  # read by `post`
            model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}, **no_cache(model))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if totals[0][1] == 0:
        raise ValueError("block_influence needs at least one batch with a non-padding token")
    return [1.0 - total / count for total, count in totals]


def _check_indices(indices: Iterable[int], n_blocks: int) -> list[int]:
    chosen = sorted(set(int(i) for i in indices))
    if bad := [i for i in chosen if not 0 <= i < n_blocks]:
        raise ValueError(f"layer indices {bad} are out of range: the model has layers 0..{n_blocks - 1}")
    if len(chosen) >= n_blocks:
        raise ValueError(f"cannot remove all {n_blocks} layers; keep at least one")
    return chosen


def remove_layers(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Delete blocks `indices` in place and renumber what depends on the count; returns them sorted.

    Updates config.num_hidden_layers and per-layer config lists (`layer_types`), and sets every
    `layer_idx` attribute inside the kept blocks to its new position, so a KV cache built from the
    config has one slot per block and `save_pretrained` / `from_pretrained` round-trip the smaller model.
    """
    _, blocks = find_blocks(model)
    n_before = len(blocks)
    removed = _check_indices(indices, n_before)
    for i in reversed(removed):
        del blocks[i]  # nn.ModuleList renumbers its keys, so the state dict stays 0..n-1
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = getattr(model, "config", None)
    if config is not None:
        config.num_hidden_layers = len(blocks)
        for name in PER_LAYER_CONFIG:
            values = getattr(config, name, None)
            if isinstance(values, (list, tuple)) and len(values) == n_before:
                setattr(config, name, [v for i, v in enumerate(values) if i not in removed])
    return removed


@dataclass(frozen=True)
class LayerRemoval:
    """What `shortgpt` did: the removed block indices (original numbering) and every block's BI."""

    removed: list[int]
    influence: list[float]


def layers_to_remove(n_blocks: int, n: int | None, fraction: float | None) -> int:
    """How many blocks to remove: `n`, or round(fraction * n_blocks); exactly one must be given."""
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n (a count of layers) or fraction (of all layers)")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        n = round(fraction * n_blocks)
    if not 1 <= n < n_blocks:
        raise ValueError(f"can remove between 1 and {n_blocks - 1} of {n_blocks} layers, got {n}")
    return n


def shortgpt(model: nn.Module, batches: Iterable[dict[str, Tensor]], n: int | None = None, *,
             fraction: float | None = None) -> LayerRemoval:
    """Remove the `n` (or `fraction` of all) blocks with the lowest Block Influence, in place."""
    _, blocks = find_blocks(model)
    count = layers_to_remove(len(blocks), n, fraction)
    influence = block_influence(model, batches)
    lowest = sorted(range(len(influence)), key=lambda i: influence[i])[:count]
    return LayerRemoval(remove_layers(model, lowest), influence)
