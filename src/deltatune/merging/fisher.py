"""Diagonal Fisher information of a model on data, the per-entry importance of Fisher merging.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832:

    F = 1/N sum_n E_{y ~ p(y|x_n)} [ (grad_theta log p(y|x_n))^2 ]    (the diagonal; squares entry-wise)

merged by theta* = sum_i w_i F_i theta_i / sum_i w_i F_i (the "fisher" preset: merge_state_dicts(...,
importance=[F_1, ..., F_N])). We checked the official code, github.com/mmatena/model_merging (`fisher.py`,
`merging.py`): it takes the expectation over y exactly (a sum over classes weighted by p(y|x)) and floors
every Fisher at `fisher_floor` = 1e-6 when merging (our `importance_floor`); by default it also divides each
model's weight by the L2 norm of its whole Fisher (`normalize_fishers`, see `fisher_norm`). The official code
floors only the first ("target") model by default; we floor all, so entries where every Fisher is tiny fall
back to the weighted mean. The floor is absolute: for MiniLM with a fresh head on 8 reviews, 99% of the
entries are below 1e-6, so lower `importance_floor` (e.g. 1e-12) to let such Fishers decide.

Here y is one sample from the model (an unbiased estimate of the same expectation, which also works for a
causal LM's vocabulary), or the gold label with `empirical=True` (the "empirical Fisher"). For a causal LM one
example is one sequence: log p(y|x) = sum_t log p(y_t | x_<t) over the attended next-token positions (labels
-100 excluded), each y_t sampled at the gold prefix; as the sampled y_t are independent with zero-mean scores,
the square of the sum estimates the sum of per-token Fishers without T backward passes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.engine.atomic import atomic_path
from deltatune.engine.targeting import resolve

Batch = Mapping[str, Tensor]


def fisher_parameters(model: nn.Module, targets: object = None) -> dict[str, nn.Parameter]:
    """state_dict name -> trainable parameter (of the `targets` modules only); a tied one under each name."""
    allowed = {id(p) for p in model.parameters() if p.requires_grad}
    if targets is not None:
        paths = resolve(model, targets, need_kind=False)
        inside = {id(p) for path in paths for p in model.get_submodule(path).parameters()}
        allowed &= inside
    state = model.state_dict(keep_vars=True)
    params = {name: t for name, t in state.items() if isinstance(t, nn.Parameter) and id(t) in allowed}
    if not params:
        raise ValueError(f"no trainable parameter in {'the model' if targets is None else repr(targets)}: "
                         "set requires_grad=True on the parameters to weigh, or choose other targets")
    return params


def examples(batches: Batch | Iterable[Batch], limit: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Single examples (batch size 1) sliced out of batch dicts, at most `limit` of them."""
    if isinstance(batches, Mapping):
        batches = [batches]
    count = 0
    for batch in batches:
        tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0}
        if "input_ids" not in tensors:
            raise ValueError(f"each batch needs 'input_ids' (got keys {sorted(batch)}); "
                             "tokenize with return_tensors='pt'")
        for i in range(tensors["input_ids"].shape[0]):
            if limit is not None and count >= limit:
                return
            yield {k: v[i : i + 1] for k, v in tensors.items()}
            count += 1


def sample(log_probs: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of (..., C) log-probabilities."""
    probs = log_probs.detach().float().exp().reshape(-1, log_probs.shape[-1]).cpu()
    return torch.multinomial(probs, 1, generator=generator).reshape(log_probs.shape[:-1]).to(log_probs.device)


def classifier_log_likelihood(
    logits: Tensor, labels: Tensor | None, empirical: bool, g: torch.Generator
) -> Tensor:
    """log p(y|x) of one example's (C,) logits; y sampled from the model unless `empirical`."""
    if logits.shape[-1] < 2:
        raise ValueError("estimate_fisher needs a classifier with >= 2 labels (not a regression head)")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if empirical and labels is None:
        raise ValueError("empirical=True uses the gold labels: give each batch a 'labels' tensor")
    y = labels.reshape(-1)[0] if empirical else sample(log_probs, g)
    return log_probs[y]


def causal_lm_log_likelihood(
    logits: Tensor, example: Batch, empirical: bool, g: torch.Generator
) -> Tensor | None:
    """sum_t log p(y_t | x_<t) of one sequence's (T, V) logits, or None if no position predicts a token."""
    gold = example.get("labels", example["input_ids"])[0, 1:]  # (T-1,) position t predicts token t+1
    keep = gold != -100  # HF's ignore index
    if "attention_mask" in example:
        keep &= example["attention_mask"][0, 1:].bool()
    if not keep.any():
        return None
    log_probs = torch.log_softmax(logits[:-1][keep].float(), dim=-1)  # (K, V)
    y = gold[keep] if empirical else sample(log_probs, g)
    return log_probs.gather(1, y[:, None]).sum()


def log_likelihood(model: nn.Module, example: Batch, empirical: bool, g: torch.Generator) -> Tensor | None:
    """log p(y|x) of one example for a sequence classifier ((1, C) logits) or a causal LM ((1, T, V))."""
    out = model(**{k: v for k, v in example.items() if k != "labels"})
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        raise ValueError("estimate_fisher needs (B, C) classifier or (B, T, V) causal-LM logits")
    if logits.dim() == 2:
        return classifier_log_likelihood(logits[0], example.get("labels"), empirical, g)
    return causal_lm_log_likelihood(logits[0], example, empirical, g)


def estimate_fisher(
    model: nn.Module,
    batches: Batch | Iterable[Batch],
    *,
    n_samples: int | None = None,
    empirical: bool = False,
    targets: object = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher, the mean over examples of squared per-example gradients of log p(y|x).

    Args:
        model: an HF sequence classifier or causal LM (anything returning `.logits` or a logits tensor).
        batches: dicts with input_ids (+ attention_mask, token_type_ids, labels ...), or one such dict.
        n_samples: use at most this many examples (None: all of them).
        empirical: use the gold `labels` (empirical Fisher), not y sampled from the model (true Fisher).
        targets: only the parameters of these modules (names, "re:<regex>", types; see engine.targeting).
        seed: seeds the sampled labels.

    Returns:
        float32 tensors keyed by model.state_dict() names of the trainable parameters (tied parameters under
        each name). The model runs in eval mode (no dropout) and is restored to its mode afterwards.
    """
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1 (or None for every example), got {n_samples}")
    params = fisher_parameters(model, targets)
    unique = list({id(p): p for p in params.values()}.values())
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in unique]
    generator = torch.Generator().manual_seed(seed)
    count, was_training = 0, model.training
    model.eval()
    try:
        for example in examples(batches, n_samples):
            log_p = log_likelihood(model, example, empirical, generator)
            if log_p is None:
                continue
            # one backward per example: the square of a batch's summed gradient is not a sum of squares
            grads = torch.autograd.grad(log_p, unique, allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    total.addcmul_(grad.float(), grad.float())
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no example to estimate the Fisher on: `batches` is empty or has no predicted token")
    means = {id(p): total / count for p, total in zip(unique, sums)}
    fisher, handed_out = {}, set()
    for name, p in params.items():  # a tied parameter gets its own copy under each name
        fisher[name] = means[id(p)].clone() if id(p) in handed_out else means[id(p)]
        handed_out.add(id(p))
    return fisher


def fisher_norm(fisher: Mapping[str, Tensor]) -> float:
    """L2 norm of a whole Fisher; dividing each model's weight by it is the official `normalize_fishers`."""
    return math.sqrt(sum(float(f.float().square().sum()) for f in fisher.values()))


def save_fisher(fisher: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a Fisher as one safetensors file, atomically (a reader never sees half of it)."""
    tensors, seen = {}, set()
    for name, f in fisher.items():
        t = f.detach().cpu().contiguous()
        tensors[name] = t.clone() if t.data_ptr() in seen else t  # safetensors refuses shared storage
        seen.add(t.data_ptr())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "content": "diagonal fisher"})


def load_fisher(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a Fisher written by save_fisher (safetensors only: nothing is unpickled)."""
    if not Path(path).is_file():
        raise ValueError(f"no Fisher file at {path}: write one with deltatune.merging.fisher.save_fisher")
    return load_file(str(path))
