"""Unstructured and N:M pruning: magnitude, Wanda and GBLM-Pruner scores, compared per row, layer or globally.

Each method scores every weight of a layer's d_out x d_in matrix (deltatune.engine.kinds), zeros the
lowest-scoring weights in place and returns boolean keep-masks:

- magnitude: S_ij = |W_ij| (Han et al. 2015, https://arxiv.org/abs/1506.02626).
- wanda: S_ij = |W_ij| · ||X_j||_2, ||X_j|| the norm of input feature j over the calibration tokens
  (*A Simple and Effective Pruning Approach for LLMs*, Sun et al., https://arxiv.org/abs/2306.11695, Eq. (1)).
- gblm: S_ij = |W_ij| · ||X_j||_2 / sqrt(n) + alpha · |W_ij| · ||G_ij||_2, G the per-sample gradients of n
  calibration sequences, alpha = 100 (*Beyond Size: How Gradients Shape Pruning Decisions in LLMs*, Das et al.,
  https://arxiv.org/abs/2311.04902, Sec. 3: W_m = |W|·||X||_2 + alpha·|W|·||G||_p, with p = 2).
- n_m=(N, M) (*Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch*, Zhou et al.,
  https://arxiv.org/abs/2102.04010): each group of M consecutive input weights of a row keeps its N best
  scores; 2:4 is the pattern Ampere+ sparse tensor cores run (torch `to_sparse_semi_structured`).

Checked against the official code. locuslab/wanda lib/prune.py (prune_wanda): scores |W| · sqrt(mean ||x_j||^2),
compared within each output row ("per-output"), with the blocks pruned in order and each block's
activations recorded after the blocks before it were pruned; its N:M loop prunes the M-N lowest of each group
(here n_m names the N kept). VILA-Lab/GBLM-Pruner lib/prune.py (prune_gblm): the same block order, and
W_metric = |W| · sqrt(sum_t x^2 / n) + |W| · ||100 · g||_2 with gradients precomputed once on the dense model
(gradient_computation.py, --scale 100); the 1/n of the activation term matters here because the two terms
are added. Departures: padding tokens never count, and ties are broken by position so every scope prunes
exactly round(sparsity · count) weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.compression.calibration import Batch, gradient_norms, input_norms, n_sequences
from deltatune.compression.layers import find_blocks
from deltatune.engine.kinds import CONV1D, LINEAR, LINEAR_KINDS, LayerKind, float_kind_of, kind_of
from deltatune.engine.registry import did_you_mean
from deltatune.engine.targeting import named_layers, resolve

SCOPES = ("row", "layer", "global")
GBLM_ALPHA = 100.0  # the paper's alpha; the official code folds it into the gradients as --scale 100


# --- scores: (d_out, d_in) float32, non-negative --------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """What calibration measured for one layer."""

    x_norm: Tensor | None = None  # (d_in,) ||X_j||_2
    g_norm: Tensor | None = None  # (d_out, d_in) ||G_ij||_2
    n_samples: int = 1  # calibration sequences behind g_norm and x_norm


def magnitude_scores(W: Tensor) -> Tensor:
    """|W_ij|."""
    return W.detach().abs().float()


def wanda_scores(W: Tensor, x_norm: Tensor) -> Tensor:
    """|W_ij| · ||X_j||_2; W (d_out, d_in), x_norm (d_in,)."""
    return magnitude_scores(W) * x_norm.to(W.device, torch.float32)[None, :]


def gblm_scores(W: Tensor, x_norm: Tensor, g_norm: Tensor, n_samples: int, alpha: float = GBLM_ALPHA) -> Tensor:
    """|W_ij| · (||X_j||_2 / sqrt(n) + alpha · ||G_ij||_2); g_norm (d_out, d_in) over n calibration sequences."""
    x_term = x_norm.to(W.device, torch.float32)[None, :] / math.sqrt(n_samples)
    return magnitude_scores(W) * (x_term + alpha * g_norm.to(W.device, torch.float32))


SCORES: dict[str, Callable[[Tensor, Stats], Tensor]] = {
    "magnitude": lambda W, s: magnitude_scores(W),
    "wanda": lambda W, s: wanda_scores(W, s.x_norm),
    "gblm": lambda W, s: gblm_scores(W, s.x_norm, s.g_norm, s.n_samples),
}
NEEDS_DATA = ("wanda", "gblm")


# --- masks: True = keep ----------------------------------------------------------------------------
def n_pruned(count: int, sparsity: float) -> int:
    return round(count * sparsity)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Zero the round(sparsity · d_in) lowest scores of every row (ties: the lower index goes first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = n_pruned(scores.shape[1], sparsity)
    return keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], False)


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Zero the round(sparsity · numel) lowest scores of the whole matrix."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[scores.flatten().argsort(stable=True)[: n_pruned(scores.numel(), sparsity)]] = False
    return keep.view_as(scores)


SELECT: dict[str, Callable[[Tensor, float], Tensor]] = {"row": row_mask, "layer": layer_mask}


def _check_nm(n: Any, m: Any) -> tuple[int, int]:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"n_m=({n}, {m}) is not an N:M pattern: use whole numbers 0 < N < M, e.g. (2, 4)")
    return n, m


def _check_groups(d_in: int, n: int, m: int, where: str = "this layer") -> None:
    if d_in % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, but {where} has {d_in}; "
                         "exclude it or prune it unstructured")


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores in each group of m consecutive inputs of every row; scores (d_out, d_in)."""
    n, m = _check_nm(n, m)
    d_out, d_in = scores.shape
    _check_groups(d_in, n, m)
    groups = scores.reshape(d_out, d_in // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    return keep.scatter_(2, groups.topk(n, dim=2).indices, True).reshape(d_out, d_in)


def _matrix(weight: Tensor | nn.Module) -> Tensor:
    if isinstance(weight, nn.Module):
        kind = kind_of(weight)
        if kind is None:
            raise ValueError(f"{type(weight).__name__} has no weight matrix deltatune knows")
        return kind.to_matrix(weight.weight)
    return weight.reshape(weight.shape[0], -1)


def nm_ok(weight: Tensor | nn.Module, n: int, m: int) -> bool:
    """Whether every group of m consecutive inputs of every row has at most n non-zeros (what N:M kernels run).

    `weight`: a layer (its d_out x d_in matrix view is checked) or a matrix laid out as nn.Linear stores it.
    """
    n, m = _check_nm(n, m)
    W = _matrix(weight)
    if W.shape[1] % m:
        return False
    return bool(((W != 0).reshape(W.shape[0], -1, m).sum(-1) <= n).all())


def _bits(scores: Tensor) -> Tensor:
    """Non-negative float32 values as int32: IEEE 754 orders non-negative floats like their bit patterns."""
    return scores.float().contiguous().view(torch.int32).flatten().long()


def kth_smallest(score_sets: Callable[[], Iterable[Tensor]], k: int) -> tuple[Tensor, int]:
    """(t, ties): the k-th smallest (k >= 1) of all non-negative scores, and how many scores equal to t rank
    among the k smallest. A radix select, 8 bits per pass over the float32 patterns: 4 passes, each reading
    one layer's scores at a time from `score_sets()`, so the scores of all layers are never held at once."""
    prefix = 0
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.long)
        for scores in score_sets():
            b = _bits(scores)
            if shift < 24:
                b = b[(b >> (shift + 8)) == prefix]  # only the values that share the digits found so far
            hist += torch.bincount((b >> shift) & 255, minlength=256).cpu()
        below = hist.cumsum(0)
        digit = int(torch.searchsorted(below, k))  # the first digit whose cumulative count reaches k
        k -= int(below[digit - 1]) if digit else 0
        prefix = (prefix << 8) | digit
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0], k


def global_masks(paths: Sequence[str], score: Callable[[str], Tensor], sparsity: float, total: int
                 ) -> Iterator[tuple[str, Tensor]]:
    """(path, keep) pruning the round(sparsity · total) lowest of the `total` scores of all layers against one
    shared threshold; ties at the threshold go in layer order, then by position."""
    k = n_pruned(total, sparsity)
    threshold, ties = kth_smallest(lambda: (score(p) for p in paths), k) if k else (torch.tensor(-1.0), 0)
    for p in paths:
        s = score(p)
        keep = s > threshold.to(s.device)
        tied = (s == threshold.to(s.device)).flatten().nonzero().squeeze(1)
        keep.view(-1)[tied[ties:]] = True
        ties = max(ties - tied.numel(), 0)
        yield p, keep


# --- which layers ----------------------------------------------------------------------------------
def prune_targets(model: nn.Module, targets: Any = None, exclude: Any = None) -> list[str]:
    """Paths of the layers to prune. Default: every nn.Linear and transformers Conv1D inside the model's
    repeated blocks, so embeddings, the LM head and classifier heads stay dense."""
    if targets is not None:
        return resolve(model, targets, exclude)
    block_path, _ = find_blocks(model)
    layers = dict(named_layers(model))
    paths = resolve(model, f"re:{re.escape(block_path)}\\..*", exclude)
    return [p for p in paths if kind_of(layers[p]) in LINEAR_KINDS]  # quantized ones are refused by prune()


def _groups(model: nn.Module, paths: list[str], sequential: bool) -> list[tuple[nn.Module | None, list[str]]]:
    """(stop module, paths) in calibration order: one group per block (the forward can stop after it), then
    any layer outside the blocks. Not sequential: one group, one full pass."""
    if not sequential:
        return [(None, paths)]
    try:
        block_path, blocks = find_blocks(model)
    except ValueError:  # no repeated blocks: one pass over everything
        return [(None, paths)]
    by_block: dict[int, list[str]] = {}
    rest = []
    for p in paths:
        if p.startswith(block_path + "."):
            by_block.setdefault(int(p[len(block_path) + 1:].split(".")[0]), []).append(p)
        else:
            rest.append(p)
    groups: list[tuple[nn.Module | None, list[str]]] = [(blocks[i], by_block[i]) for i in sorted(by_block)]
    return groups + ([(None, rest)] if rest else [])


# --- pruning ---------------------------------------------------------------------------------------
def _check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown pruning {what} '{value}'{did_you_mean(str(value), choices)} "
                         f"(choose from {', '.join(choices)})")


@torch.no_grad()
def _zero(layer: nn.Module, kind: LayerKind, keep: Tensor) -> Tensor:
    """Write zeros where `keep` (d_out, d_in) is False; returns the mask in the weight's own layout."""
    W = layer.weight
    keep_w = kind.to_weight(keep.to(W.device), W).contiguous()
    W.masked_fill_(~keep_w, 0)
    return keep_w


def prune(model: nn.Module, method: str = "magnitude", sparsity: float = 0.5, *, targets: Any = None,
          exclude: Any = None, scope: str = "row", n_m: tuple[int, int] | None = None,
          calibration: list[Batch] | None = None, sequential: bool = True) -> dict[str, Tensor]:
    """Zero the lowest-scoring weights of the target layers in place; return {path: keep-mask}.

    Args:
        method: "magnitude", "wanda" or "gblm" (the last two read `calibration`).
        sparsity: fraction of weights zeroed in each row / layer / the whole set (scope); ignored with n_m.
        targets, exclude: layers as in deltatune targeting; None = every Linear / Conv1D inside the blocks.
        scope: "row" compares the weights of each output row (Wanda's choice), "layer" those of a layer,
            "global" all targets against one threshold.
        n_m: (N, M) keeps N of every M consecutive input weights of a row instead (then scope must be "row").
        calibration: batches from `calibration.text_batches` (input_ids, attention_mask, labels for gblm).
        sequential: as the official code, measure each block's activations after the blocks before it were
            pruned; False: all on the dense model in one pass. Global scope is always one dense pass.

    Returns:
        Boolean masks shaped like each layer's weight, True where the weight was kept. Weights keep their
        dtype and device; pruned entries are exactly 0.
    """
    _check_choice("method", method, SCORES)
    _check_choice("scope", scope, SCOPES)
    if n_m is not None:
        n_m = _check_nm(*n_m)
        if scope != "row":
            raise ValueError(f"n_m={n_m} keeps N weights in groups of each row; use scope='row', not '{scope}'")
    elif not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must lie strictly between 0 and 1 (the fraction of weights zeroed)")
    paths = prune_targets(model, targets, exclude)
    chosen = set(paths)
    layers = {p: m for p, m in named_layers(model) if p in chosen}
    kinds = {p: float_kind_of(layers[p], p, "prune") for p in paths}
    data = method in NEEDS_DATA
    if data and not calibration:
        raise ValueError(f"'{method}' scores weights by calibration activations: pass calibration=text_batches("
                         "tokenizer, texts), or use method='magnitude'")
    for p in paths:
        if data and kinds[p] not in (LINEAR, CONV1D):
            raise ValueError(f"'{method}' needs linear layers (it reads each input feature's activations), but "
                             f"'{p}' is a {type(layers[p]).__name__}; exclude it or use method='magnitude'")
        if n_m:  # every check before the first weight changes
            _check_groups(kinds[p].to_matrix(layers[p].weight).shape[1], *n_m, where=f"'{p}'")
    batches = list(calibration or [])
    grads = gradient_norms(model, batches, paths) if method == "gblm" else {}
    n = n_sequences(batches) if data else 1

    def stats(norms: dict[str, Tensor], p: str) -> Stats:
        return Stats(norms.get(p), grads.get(p), n)

    def select(scores: Tensor) -> Tensor:
        return nm_mask(scores, *n_m) if n_m else SELECT[scope](scores, sparsity)

    def score(p: str, norms: dict[str, Tensor]) -> Tensor:
        return SCORES[method](kinds[p].to_matrix(layers[p].weight), stats(norms, p))

    masks: dict[str, Tensor] = {}
    if scope == "global":
        norms = input_norms(model, batches, paths) if data else {}
        total = sum(layers[p].weight.numel() for p in paths)
        for p, keep in global_masks(paths, lambda p: score(p, norms), sparsity, total):
            masks[p] = _zero(layers[p], kinds[p], keep)
    else:
        for stop, group in _groups(model, paths, sequential and data):
            norms = input_norms(model, batches, group, stop_after=stop) if data else {}
            for p in group:
                masks[p] = _zero(layers[p], kinds[p], select(score(p, norms)))
    return {p: masks[p] for p in paths}


def sparsity(model: nn.Module, targets: Any = None) -> dict[str, float]:
    """{layer path: fraction of exactly-zero weights} for `targets` (default: the layers `prune` targets)."""
    layers = dict(named_layers(model))
    return {p: (layers[p].weight == 0).sum().item() / layers[p].weight.numel()
            for p in prune_targets(model, targets)}
