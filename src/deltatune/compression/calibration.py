"""Calibration data and the statistics data-aware pruning reads from it.

- `text_batches`: a few windows of real text, tokenised so that `model(**batch).loss` works for causal LMs.
- `input_norms`: Wanda's ||X_j||_2, the L2 norm of input feature j over every calibration token
  (*A Simple and Effective Pruning Approach for LLMs*, Sun et al., https://arxiv.org/abs/2306.11695, Eq. (1)).
- `gradient_norms`: GBLM-Pruner's ||G_ij||_2, the L2 norm over calibration samples of the per-sample
  gradients of the loss with respect to each weight (*Beyond Size: How Gradients Shape Pruning Decisions in
  LLMs*, Das et al., https://arxiv.org/abs/2311.04902, Sec. 3).

Checked against the official code: locuslab/wanda lib/layerwrapper.py accumulates ||X_j||^2 / n_samples
over forward hooks on each linear (the 1/n_samples factor does not change a ranking, so the plain norm is
returned here); VILA-Lab/GBLM-Pruner (RocktimJyotiDas/GBLM-Pruner) gradient_computation.py runs one
backward pass per calibration sequence and sums (scale * grad)^2, the square root of which is the l2 norm
(its default; scale=100 is the paper's alpha and is applied in `pruning.gblm_scores`). Departures, both
deliberate: padding tokens never count (the official code calibrates on unpadded windows only), and the
model runs in eval mode (the official script calls model.train() on LLaMA, which has no dropout).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.compression.layers import MODEL_INPUTS
from deltatune.engine.kinds import kind_of

Batch = dict[str, Tensor]
IGNORE = -100  # label of a padding position: the loss skips it


# --- data ----------------------------------------------------------------------------------------
def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # any id works: padding is masked out of attention and loss


def _collate(sequences: list[list[int]], pad_id: int) -> Batch:
    """Right-padded input_ids / attention_mask / labels (labels = input_ids, -100 on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def text_batches(tokenizer: Any, texts: Sequence[str], *, n_samples: int = 64, seq_len: int = 128,
                 batch_size: int = 8, seed: int = 0) -> list[Batch]:
    """Up to `n_samples` sequences of at most `seq_len` tokens, in batches of `batch_size`.

    Wanda and GBLM calibrate on full windows of long documents (C4). Reviews and Q/A pairs are short,
    so texts are shuffled (by `seed`) and joined with blank lines until a window holds `seq_len` tokens;
    each text is used at most once, and the last window may be shorter (padded). The tokenizer adds its
    own special tokens once per window.
    """
    if n_samples < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need n_samples >= 1, seq_len >= 2 and batch_size >= 1; got {n_samples}, {seq_len}, "
                         f"{batch_size}")
    if bad := [t for t in texts if not isinstance(t, str)]:
        raise ValueError(f"texts must be strings, got a {type(bad[0]).__name__}; pass e.g. "
                         "[row['text'] for row in rows]")
    windows: list[list[int]] = []
    chunk: list[str] = []
    filled = 0
    for i in random.Random(seed).sample(range(len(texts)), len(texts)):
        if not texts[i].strip():
            continue
        chunk.append(texts[i].strip())
        filled += len(tokenizer(chunk[-1], add_special_tokens=False)["input_ids"])
        if filled >= seq_len:
            windows.append(tokenizer("\n\n".join(chunk), truncation=True, max_length=seq_len)["input_ids"])
            chunk, filled = [], 0
            if len(windows) == n_samples:
                break
    if chunk and len(windows) < n_samples:
        windows.append(tokenizer("\n\n".join(chunk), truncation=True, max_length=seq_len)["input_ids"])
    if not windows:
        raise ValueError("no calibration text: every text is empty; pass some non-empty strings")
    pad = _pad_id(tokenizer)
    return [_collate(windows[i: i + batch_size], pad) for i in range(0, len(windows), batch_size)]


# --- running the model ---------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after that module is needed)."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _linear_layer(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    base = getattr(module, "base_layer", module)  # a DeltaLayer's input is its base layer's input
    if kind_of(base) is None or kind_of(base).name not in ("linear", "conv1d_transposed"):
        raise ValueError(f"'{path}' is a {type(base).__name__}: activation and gradient statistics cover "
                         "nn.Linear and transformers Conv1D layers; exclude it or prune it by magnitude")
    return module


# --- statistics ----------------------------------------------------------------------------------
@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[Batch], layers: Sequence[str], *,
                stop_after: nn.Module | None = None) -> dict[str, Tensor]:
    """{layer path: ||X_j||_2 for each input feature j, shape (d_in,), float32} over all non-padding tokens.

    Args:
        batches: dicts with input_ids and optionally attention_mask (0 = padding, never counted);
            labels are not passed to the model.
        layers: paths of nn.Linear / Conv1D layers (their inputs are (..., d_in)).
        stop_after: end each forward pass once this module has run (Wanda's block-by-block pass needs
            only the blocks up to the one being pruned).
    """
    modules = {path: _linear_layer(model, path) for path in layers}
    sums: dict[str, Tensor] = {}
    mask: Tensor | None = None

    def record(path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if mask is not None:
                if x.shape[:-1] != mask.shape:
                    raise ValueError(f"'{path}' sees inputs of shape {tuple(x.shape)}, which do not line up with "
                                     f"the attention mask {tuple(mask.shape)}; padding cannot be told apart there")
                x = x[mask.bool()]
            square = x.reshape(-1, x.shape[-1]).float().square().sum(0)  # (d_in,)
            sums[path] = square if path not in sums else sums[path] + square
        return hook

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    handles = [module.register_forward_hook(record(path)) for path, module in modules.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    device = _device(model)
    try:
        with _eval_mode(model):
            for batch in batches:
                mask = batch["attention_mask"].to(device) if "attention_mask" in batch else None
                try:
                    model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    if missing := [p for p in layers if p not in sums]:
        raise ValueError(f"no calibration token reached {missing[:3]}: pass at least one batch with a "
                         "non-padding token, and layers that the model's forward uses")
    return {path: sums[path].sqrt() for path in layers}


def samples(batch: Batch) -> Iterator[Batch]:
    """Each sequence of `batch` alone, with its padding cut off (GBLM's per-sample gradients)."""
    n, width = batch["input_ids"].shape
    keep = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones(n, width, dtype=torch.bool)
    for i in range(n):
        if keep[i].any():
            yield {k: v[i: i + 1, keep[i]] if v.dim() >= 2 and v.shape[1] == width else v[i: i + 1]
                   for k, v in batch.items()}


def gradient_norms(model: nn.Module, batches: Iterable[Batch], layers: Sequence[str]) -> dict[str, Tensor]:
    """{layer path: sqrt(sum_n g_n^2), shape (d_out, d_in), float32}: the l2 norm over calibration sequences n
    of the gradient g_n of sequence n's loss with respect to the layer's weight (as a d_out x d_in matrix).

    One backward pass per sequence, as GBLM-Pruner's gradient_computation.py (batch size 1). The batches need
    labels (`text_batches` provides them); only the target weights get gradients.
    """
    modules = {path: _linear_layer(model, path) for path in layers}
    weights = {path: m.weight for path, m in modules.items()}
    kinds = {path: kind_of(getattr(m, "base_layer", m)) for path, m in modules.items()}
    sums = {path: torch.zeros(kinds[path].to_matrix(w).shape, dtype=torch.float32, device=w.device)
            for path, w in weights.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    device, count = _device(model), 0
    try:
        with _eval_mode(model):
            for batch in batches:
                if "labels" not in batch:
                    raise ValueError("gradient_norms needs batches with labels (a loss to differentiate); "
                                     "text_batches adds labels = input_ids")
                for sample in samples(batch):
                    loss = getattr(model(**{k: v.to(device) for k, v in sample.items()}), "loss", None)
                    if loss is None:
                        raise ValueError(f"{type(model).__name__} returned no loss for a batch with labels; "
                                         "gradient importance needs a model that computes its loss from labels")
                    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                    for path, g in zip(weights, grads):
                        if g is not None:
                            sums[path] += kinds[path].to_matrix(g).float().square()
                    count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("gradient_norms got no calibration sequence with a non-padding token")
    return {path: s.sqrt() for path, s in sums.items()}


def n_sequences(batches: Iterable[Batch]) -> int:
    """How many calibration sequences the batches hold (rows with at least one real token)."""
    total = 0
    for b in batches:
        mask = b.get("attention_mask")
        total += int(mask.bool().any(1).sum()) if mask is not None else b["input_ids"].shape[0]
    return total
