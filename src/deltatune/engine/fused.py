"""Fast paths for low-rank deltas on linear layers, written once for every method that is s · B A.

A method opts in by returning its factors from `Delta.low_rank()`. Three paths then use them:

* `lowrank_linear`: the base linear and all its low-rank terms in one autograd node. Forward adds
  s · (x Aᵀ) Bᵀ into the base output in place (no y, no scaled copy, no sum buffer); backward writes
  the input gradient once (g W, then each s (g B) A added in place). It saves one input for all the
  terms that read it, the thin h = x Aᵀ, and for dropout a one-byte keep mask (never the dropped copy,
  which backward rebuilds from x and the mask).
* the same arithmetic without autograd when no gradient is needed (inference).
* `mixed_lowrank`: a batch whose rows use different adapters, as two batched matmuls over per-row
  factors (a gather of thin matrices), so its cost does not grow with the number of adapters.

On a bf16/fp16 base the adapters are fp32 (methods/lowrank/lora.py `adapter_dtype`). The paths then cast
the thin factors to the base dtype once per forward and run every product in it, as torch.autocast runs an
fp32 nn.Linear: the matmul kernels accumulate in fp32, the output is rounded to the base dtype (as it is
anyway when added to the base output), and the factors' gradients, rounded once to the base dtype, reach
the fp32 master weights as fp32. PEFT casts x up to fp32 for its LoRA branch instead (a 4-byte copy of each
adapted layer's input, and fp32 matmuls, for a sum then rounded to bf16); the two have not been benchmarked
against each other yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


class LowRank(NamedTuple):
    """ΔW = scale · B A, with dropout p on the delta's input (p = 0 in eval mode)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scale: float
    dropout: float = 0.0

    def fuses_with(self, x: Tensor) -> bool:
        """True when the fused paths take this term on input x: factors of x's dtype, or fp32 factors on a
        half-precision x (the fp32 adapters of a bf16/fp16 base), which they cast to x's dtype once per forward."""
        return self.A.dtype == x.dtype or (self.A.dtype == torch.float32 and x.dtype in HALF)


def _keep_mask(x: Tensor, p: float) -> Tensor:
    """A bool mask keeping each entry with probability 1 - p (to 1/65536), from the global generator.

    Two 16-bit draws per 32-bit random number compared with a threshold: about 2.5x faster on CPU than
    bernoulli_, which draws a double per entry, and dropout's mask costs more than LoRA's matmuls.
    """
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_(-2**31, 2**31 - 1)
    return (bits.view(torch.int16)[:n] < round((1.0 - p) * 65536) - 32768).view(x.shape)


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, specs: tuple[tuple[float, float], ...],
                *factors: Tensor) -> Tensor:
        # fp32 factors on a half-precision base run in the base dtype, as torch.autocast runs an fp32 Linear:
        # cast once here (they are thin) and saved cast; backward returns their gradients in their own dtype.
        ctx.factor_dtypes = tuple(f.dtype for f in factors)
        factors = tuple(f.to(x.dtype) for f in factors)
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        out = F.linear(x2, weight, bias)
        # x serves the base weight's and the A factors' gradients (B's needs only h): frozen A's (LoRA-FA) free it
        need_x = ctx.needs_input_grad[1] or any(ctx.needs_input_grad[4::2])
        hs, masks = [], []
        for i, (scale, p) in enumerate(specs):
            A, B = factors[2 * i], factors[2 * i + 1]
            if p > 0:
                mask = _keep_mask(x2, p)
                h = (x2 * mask) @ A.t()
                h.mul_(1.0 / (1.0 - p))
            else:
                mask, h = None, x2 @ A.t()
            out.addmm_(h, B.t(), alpha=scale)
            hs.append(h)
            masks.append(mask)
        ctx.specs, ctx.has_bias = specs, bias is not None
        ctx.save_for_backward(x2 if need_x else None, weight, *hs, *masks, *factors)
        ctx.x_shape = x.shape
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, weight, *rest = ctx.saved_tensors
        n = len(ctx.specs)
        hs, masks, factors = rest[:n], rest[n:2 * n], rest[2 * n:]
        g2 = g.reshape(-1, g.shape[-1])
        need = ctx.needs_input_grad
        grad_x = g2 @ weight if need[0] else None
        grad_w = g2.t() @ x2 if need[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and need[2] else None
        grads: list[Tensor | None] = []
        for i, (scale, p) in enumerate(ctx.specs):
            A, B = factors[2 * i], factors[2 * i + 1]
            mask = masks[i]
            gB = (g2 @ B).mul_(scale)  # (N, r): the gradient reaching h, times s
            grad_A = grad_B = None
            if need[4 + 2 * i]:
                xd = x2 if mask is None else (x2 * mask).mul_(1.0 / (1.0 - p))
                grad_A = gB.t() @ xd
            if need[5 + 2 * i]:
                grad_B = (g2.t() @ hs[i]).mul_(scale)
            if grad_x is not None:
                if mask is None:
                    grad_x.addmm_(gB, A)
                else:
                    grad_x.add_((gB @ A).mul_(mask), alpha=1.0 / (1.0 - p))
            grads += [grad_A, grad_B]
        grads = [g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.factor_dtypes)]
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_b, None, *grads


def lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, terms: Sequence[LowRank]) -> Tensor:
    """F.linear(x, weight, bias) + Σ scale · dropout(x) Aᵀ Bᵀ over `terms`, in one pass."""
    factors = [t for term in terms for t in (term.A, term.B)]
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)
                                        or any(f.requires_grad for f in factors))
    if grad:
        specs = tuple((float(t.scale), float(t.dropout)) for t in terms)
        return _LowRankLinear.apply(x, weight, bias, specs, *factors)
    out = F.linear(x, weight, bias)
    flat, x2 = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
    for t in terms:
        src = x2 if t.dropout == 0 else x2 * _keep_mask(x2, t.dropout) / (1.0 - t.dropout)
        flat.addmm_(src @ t.A.to(x.dtype).t(), t.B.to(x.dtype).t(), alpha=t.scale)
    return out


def mixed_lowrank(x: Tensor, out: Tensor, index: Tensor, terms: Sequence[LowRank]) -> Tensor:
    """out + s_i B_i A_i x for each row, adapter i = index[row]; index == len(terms) means no delta.

    Ranks may differ: factors are zero-padded to the largest one. The factors are gathered per row
    (batch x r x d, thin), then applied by two batched matmuls.
    """
    r = max(t.A.shape[0] for t in terms)
    none_A = terms[0].A.new_zeros(r, terms[0].A.shape[1])  # the slot of rows without a delta here
    none_B = terms[0].B.new_zeros(terms[0].B.shape[0], r)
    # Stacked out of place, so gradients reach every adapter's factors (mixed-batch training works).
    # Cast to x's dtype once, after stacking (fp32 factors on a half-precision base; autograd casts back).
    A = torch.stack([F.pad(t.A, (0, 0, 0, r - t.A.shape[0])) for t in terms] + [none_A]).to(x.dtype)
    B = torch.stack([F.pad(t.B * t.scale, (0, r - t.B.shape[1])) for t in terms] + [none_B]).to(x.dtype)
    rows = x.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])
    h = torch.bmm(x3, A[index].transpose(1, 2))  # (batch, tokens, r)
    y = torch.bmm(h, B[index].transpose(1, 2)).view(out.shape)
    if not torch.is_grad_enabled():
        return out.add_(y)
    return out + y
