"""PCB-Merging scores: intra- and inter-task balancing, then drop and rescale (arXiv:2410.02396).

Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS). For the N task vectors of one
tensor, flattened to tau (N, d):

    a_i     = clip(|tau_i|, quantile(clip), quantile(1 - clip))   per task: outliers clipped
    intra_i = exp(N * minmax(a_i)^2)                               importance within task i
    inter_i = tanh(tau_i * sum_j tau_j)                            agreement with the other tasks
    s_i     = minmax(max(intra_i * inter_i, t_i))                  t_i: the (1 - ratio) quantile, keep the top
    merged  = sum_i s_i * sign(tau_i) * a_i / sum_i s_i

This follows the official code, github.com/duguodong7/pcb-merging, which we read (`pcb-merging.py` PCB_merge,
`nlp_source_code/utils/merge_utils.py`): `clamp` is the quantile clip (0.0001 there), `normalize` is minmax,
`act` is tanh, pcb_ratio 0.05-0.2, and `run_merging.sh` searches lambda over 0.8-2.2 for T5 (1.0 for IA3).
The paper writes the balancings in a softmax notation; where they differ we follow the code. The weighted,
normalised sum is the shared TaskVectorMerge pipeline (preset "pcb", `density` = pcb_ratio).

Departures (tested): the official code flattens the whole model into one vector per task; here quantiles and
minmax are per tensor, like every stage of the pipeline. The upper clip index mirrors the lower one (k-th
largest, k = floor(d * clip)), so tensors with fewer than 1/clip entries are not clipped; the official
`int(d*(1-clip)) - 1` always clips the largest entry. A constant row minmaxes to 0, not 0/0 = NaN.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def minmax(x: Tensor) -> Tensor:
    """Scale each row of x (N, d) to [0, 1]; a constant row maps to 0."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def clip_quantiles(x: Tensor, clip: float) -> Tensor:
    """Clamp each row of x (N, d) between its k-th smallest and k-th largest entry, k = floor(d * clip)."""
    d = x.shape[1]
    k = min(int(d * clip), (d - 1) // 2)
    ranked = x.sort(dim=1).values
    return torch.clamp(x, min=ranked[:, k : k + 1], max=ranked[:, d - 1 - k : d - k])


def keep_top(scores: Tensor, ratio: float) -> Tensor:
    """Drop and rescale: entries above each row's (1 - ratio) quantile, minmaxed to (0, 1]; the rest 0.

    As in the official minmax, the threshold entry itself scores 0, so ceil(ratio * d) - 1 entries survive.
    """
    d = scores.shape[1]
    k = d - math.ceil(ratio * d - 1e-9)  # = the official int(d * (1 - ratio)), without its float rounding
    if k >= d:
        return torch.zeros_like(scores)
    threshold = scores.sort(dim=1).values[:, k : k + 1]
    return minmax(scores.clamp(min=threshold))


def pcb_balance(taus: Tensor, ratio: float, clip: float) -> tuple[Tensor, Tensor]:
    """(clipped task vectors, PCB scores s_i), both shaped like `taus` (N, ...); merged: sum s*tau / sum s."""
    if not 0.0 <= ratio <= 1.0 or not 0.0 <= clip < 0.5:
        raise ValueError(f"PCB needs 0 <= ratio (density) <= 1 and 0 <= clip < 0.5, got {ratio} and {clip}")
    n = taus.shape[0]
    tau = taus.float().reshape(n, -1)  # (N, d)
    a = clip_quantiles(tau.abs(), clip)
    intra = torch.exp(n * minmax(a) ** 2)
    inter = torch.tanh(tau * tau.sum(0))  # official code: inter-balancing on the unclipped task vectors
    scores = keep_top(intra * inter, ratio)
    return (tau.sign() * a).reshape(taus.shape), scores.reshape(taus.shape)
