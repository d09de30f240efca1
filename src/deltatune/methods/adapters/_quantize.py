"""The low-bit adapter quantiser of Jie et al., ICCV 2023 (arXiv:2307.16867), from their official code.

*Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy*, code
JieShibo/PETL-ViT binary_adapter/utils.py (QLinear, l.15-90; notes in /work/notes/lowbit_spec.md):

    n = (W - mean(W)) / (std(W) + 1e-5)           per tensor, std unbiased
    W_q = q_b(n) · std(W) + mean(W)               q_b: nearest of 2^b fixed levels for N(0, 1)
    backward: q_b is the identity (straight-through); mean and std stay differentiable

The levels are the fixed point of a Lloyd iteration for N(0, 1) in which each level is its bin's median and
each threshold the midpoint of two levels (500 iterations from zeros, float64, as the official code). At 1 bit
they are ±Phi^-1(0.75) = ±0.6745, so W_q = mean + 0.6745 · std · sign(W - mean). Stored form (pack/unpack):
each weight's level index, 8 // b per byte, first index in the lowest bits, plus mean and std as float32.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor
from torch.special import ndtr, ndtri

BITS = (1, 2, 4, 8)  # the official --bit choices (main.py l.58; 32 there means no quantiser)
EPS = 1e-5


@cache
def codebook(bits: int) -> tuple[Tensor, Tensor]:
    """(levels (2^b,), thresholds (2^b - 1,)) in float32, as utils.py QLinear.quantize computes them."""
    v = torch.zeros(2 ** bits, dtype=torch.float64)
    for _ in range(500):
        t = (v[1:] + v[:-1]) / 2  # thresholds from the previous levels, as the official loop orders them
        p = torch.cat([v.new_zeros(1), ndtr(t), v.new_ones(1)])
        v = ndtri((p[1:] + p[:-1]) / 2)  # the median of N(0, 1) on each bin
    return v.float(), t.float()


def quantise(w: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n, index of n's level (int64, w's shape), mean, std) of one tensor w."""
    mean, std = w.mean(), w.std()
    n = (w - mean) / (std + EPS)
    _, thresholds = codebook(bits)
    return n, torch.bucketize(n.detach(), thresholds.to(n.device, n.dtype)), mean, std


def fake_quantise(w: Tensor, bits: int) -> Tensor:
    """W_q, with the straight-through gradient of the official code (mean and std not detached)."""
    n, index, mean, std = quantise(w, bits)
    levels = codebook(bits)[0].to(w.device, w.dtype)
    # levels[index] + (n - n) is levels[index] exactly (the official q.data + n - n.data rounds), so the
    # unpacked weights equal these bit for bit; the gradient w.r.t. n is the identity
    return (levels[index] + (n - n.detach())) * std + mean


def pack(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(codes: uint8 (ceil(numel / (8 // b)),), mean_std: float32 (2,)) of w, as utils.py dump stores them."""
    _, index, mean, std = quantise(w.detach(), bits)
    per_byte = 8 // bits
    flat = index.flatten()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per_byte)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, device=flat.device) * bits
    codes = (flat << shifts).sum(dim=1).to(torch.uint8)
    return codes.cpu(), torch.stack([mean, std]).float().cpu()


def unpack(codes: Tensor, mean_std: Tensor, bits: int, shape: torch.Size, dtype: torch.dtype = torch.float32,
           ) -> Tensor:
    """The weights `pack` stored: levels[index] · std + mean, shaped `shape`."""
    per_byte, numel = 8 // bits, shape.numel()
    if codes.dtype != torch.uint8 or codes.numel() != -(-numel // per_byte):
        raise ValueError(f"packed codes do not fit a {tuple(shape)} weight at {bits} bits: expected "
                         f"{-(-numel // per_byte)} uint8 bytes, got {codes.numel()} {codes.dtype}; export again")
    shifts = torch.arange(per_byte, device=codes.device) * bits
    index = ((codes.long().unsqueeze(1) >> shifts) & (2 ** bits - 1)).flatten()[:numel]
    mean, std = mean_std.to(dtype)
    return codebook(bits)[0].to(codes.device, dtype)[index].view(shape) * std + mean
