"""DAREx-q: DARE with the rescaling factor 1/q tuned instead of fixed at 1/(1-p).

Deng et al. 2024, "DARE the Extreme: Revisiting Delta-Parameter Pruning For Fine-Tuned Models",
arXiv:2410.09344. DARE keeps each delta entry with probability 1-p and scales survivors by 1/(1-p). At extreme
p (0.99: a factor of 100) the pruned model's outputs drift; a q above 1-p trades DARE's unbiasedness for less
variance. The rescale itself is `TaskVectorMerge.rescale_q` / `sparsify.random_drop(rescale_q=...)`; this
module chooses q:

- `search_q`: one global q, the argmax of a validation score (or of minus an output change) over candidates.
- `layer_q` / `per_layer_q`: one q per layer, minimising the official code's bound on each neuron's change.
- `darex_prune`: prune one fine-tuned model's deltas with a global or per-layer q (the paper's setting).

Checked against the official code, github.com/vengdeng/DAREx: `utils/deltaprune.py` (rescale by 1/q, biases
use their weight's q, other tensors the mean q), `utils/analyticalq.py` (the per-neuron objective below) and
`utils/getwx.py` (c = delta times the layer's mean input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from deltatune.engine.kinds import CONV1D, LINEAR, kind_of
from deltatune.engine.targeting import resolve
from deltatune.merging.fisher import Batch
from deltatune.merging.sparsify import Sparsify
from deltatune.merging.task_arithmetic import StateDict, TaskVectorMerge, check_compatible, tensor_generator


def search_q(
    candidates: Iterable[float], score: Callable[[float], float]
) -> tuple[float, dict[float, float]]:
    """The candidate q with the highest `score(q)` (ties: the first), and every candidate's score.

    `score` is e.g. validation accuracy of the model pruned with rescale_q=q, or minus the mean |change| of
    the last hidden layer against the fine-tuned model on an unlabeled batch (the paper's label-free proxy).
    """
    scores: dict[float, float] = {}
    for q in candidates:
        q = float(q)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"candidate q must be in (0, 1] (survivors are scaled by 1/q), got {q}")
        value = float(score(q))
        if not math.isfinite(value):
            raise ValueError(f"score({q}) returned {value}; it must be a finite number (higher is better)")
        scores[q] = value
    if not scores:
        raise ValueError("need at least one candidate q, e.g. [0.1, 0.15, 0.2, 0.25, 0.3] for p = 0.9")
    best = max(scores, key=scores.__getitem__)  # max() keeps the first of equal scores
    return best, scores


def bernoulli_phi(p: float) -> float:
    """phi(p) = (1 - 2p) / log((1 - p) / p), the sub-Gaussian variance factor of a Bernoulli(p) mask."""
    if p in (0.0, 1.0):
        return 0.0
    if abs(p - 0.5) < 1e-9:
        return 0.5  # the limit of 0/0
    return (1 - 2 * p) / math.log((1 - p) / p)


def layer_q(
    delta: Tensor,
    mean_input: Tensor,
    density: float,
    eta: float,
    *,
    bias_delta: Tensor | None = None,
    prob: float = 0.95,
    step: float = 1e-3,
) -> float:
    """Per-layer DAREx-q: for each output neuron i, the q on the grid [density, 1) minimising

        | eta (1 - density / q) sum_j c_ij  +  eta^2 phi(p) sum_j c_ij^2 / (4 q^2)  +  log(2 / (1 - prob)) |

    with c_ij = delta_ij * mean_input_j (the bias delta as one more column with input 1) and p = 1 - density;
    the layer's q is the mean over neurons. The first term is the expected output change of rescaling by 1/q
    instead of 1/(1-p), the second a concentration term; eta (tuned on validation in the paper) balances them.
    Official `analytical_resolve_new` also stops scanning once 80% of the neurons stop improving (against
    outlier features); this scans the whole grid.

    Args:
        delta: (d_out, d_in) weight delta of a linear layer.
        mean_input: (d_in,) the layer's mean input on calibration data.
    """
    if delta.dim() != 2 or mean_input.shape != delta.shape[1:]:
        raise ValueError(f"need a (d_out, d_in) delta and a (d_in,) mean input, got {tuple(delta.shape)} and "
                         f"{tuple(mean_input.shape)}")
    if not 0.0 < density < 1.0 or not 0.0 < prob < 1.0:
        raise ValueError(f"need 0 < density < 1 and 0 < prob < 1, got {density} and {prob}")
    c = delta.float() * mean_input.float()  # (d_out, d_in): each input's contribution to each output
    if bias_delta is not None:
        c = torch.cat([c, bias_delta.float().reshape(-1, 1)], dim=1)
    s1, s2 = c.sum(1, keepdim=True), c.square().sum(1, keepdim=True)  # (d_out, 1)
    q = torch.arange(math.ceil(density / step - 1e-9), round(1 / step)) * step  # (G,) density .. 1 - step
    if q.numel() == 0:
        q = torch.tensor([density])
    bound = eta * (1 - density / q) * s1 + eta**2 * bernoulli_phi(1 - density) * s2 / (4 * q**2)
    best = q[(bound + math.log(2 / (1 - prob))).abs().argmin(dim=1)]  # (d_out,)
    return float(best.mean())


@torch.no_grad()
def mean_inputs(
    model: nn.Module, batches: Batch | Iterable[Batch], paths: Sequence[str]
) -> dict[str, Tensor]:
    """Mean input feature vector (d_in,) of each linear layer at `paths`, over every token of every batch."""
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(paths, 0)

    def hook(path: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: object) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, d_in)
            sums[path] = sums.get(path, 0) + x.sum(0)
            counts[path] += x.shape[0]

        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    was_training = model.training
    model.eval()
    try:
        for batch in [batches] if isinstance(batches, Mapping) else batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [p for p in paths if counts[p] == 0]
    if missing:
        raise ValueError(f"layers {missing[:5]} saw no input: are they used in the model's forward?")
    return {p: sums[p] / counts[p] for p in paths}


def per_layer_q(
    model: nn.Module,
    base: StateDict,
    batches: Batch | Iterable[Batch],
    density: float,
    eta: float,
    *,
    targets: object = nn.Linear,
    exclude: object = None,
    prob: float = 0.95,
) -> dict[str, float]:
    """{'<layer>.weight': q} for the linear layers of fine-tuned `model` (base: the pre-trained state dict).

    Mean inputs come from the fine-tuned model on `batches` (the official code: 50 x 128 unlabeled tokens).
    Like the official code, leave the task head out (exclude=["classifier"]): it is copied, not pruned.
    """
    paths = resolve(model, targets, exclude)
    sd = model.state_dict()
    for p in paths:
        if kind_of(model.get_submodule(p)) not in (LINEAR, CONV1D):
            raise ValueError(f"per_layer_q handles linear layers (nn.Linear, HF Conv1D); '{p}' is not one")
    inputs = mean_inputs(model, batches, paths)
    qs = {}
    for p in paths:
        kind = kind_of(model.get_submodule(p))
        delta = kind.to_matrix(sd[f"{p}.weight"].float() - base[f"{p}.weight"].float())  # (d_out, d_in)
        bias = f"{p}.bias"
        bias_delta = sd[bias].float() - base[bias].float() if bias in sd and bias in base else None
        qs[f"{p}.weight"] = layer_q(delta, inputs[p], density, eta, bias_delta=bias_delta, prob=prob)
    return qs


def q_for(key: str, q: float | Mapping[str, float]) -> float:
    """A tensor's q: the global one, its own, its weight's (for a bias), else the mean (official code)."""
    if not isinstance(q, Mapping):
        return float(q)
    if not q:
        raise ValueError("the per-layer q mapping is empty")
    if key in q:
        return float(q[key])
    if key.endswith(".bias") and key[: -len("bias")] + "weight" in q:
        return float(q[key[: -len("bias")] + "weight"])
    return sum(q.values()) / len(q)


def darex_prune(
    base: StateDict,
    finetuned: StateDict,
    density: float,
    q: float | Mapping[str, float],
    *,
    keep: Iterable[str] = (),
    seed: int = 0,
) -> dict[str, Tensor]:
    """theta0 + m * (theta - theta0) / q with m ~ Bernoulli(density): DAREx-q delta pruning of one model.

    `keep` names tensors copied from `finetuned` unpruned (the task head, as the official code does).
    """
    check_compatible(base, [finetuned])
    keep = set(keep)
    unknown = sorted(keep - base.keys())
    if unknown:
        raise ValueError(f"keep names tensors the model lacks: {unknown[:5]}")
    out = {}
    for key, b in base.items():
        if key in keep or not b.is_floating_point():
            out[key] = (finetuned[key] if key in keep else b).clone()
            continue
        method = TaskVectorMerge(sparsify=Sparsify.random, density=density, rescale_q=q_for(key, q))
        out[key] = method.merge_tensor(b, [finetuned[key]], [1.0], tensor_generator(seed, key))
    return out
