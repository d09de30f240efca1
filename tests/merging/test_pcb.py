"""PCB-Merging: a hand-worked case, a transcription of the official formula, identities and the pieces."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.merging.pcb import clip_quantiles, keep_top, minmax, pcb_balance
from deltatune.merging.task_arithmetic import get_merge_method


def official_pcb(taus: torch.Tensor, ratio: float, clip: float) -> torch.Tensor:
    """The merged task vector as the official PCB_merge writes it, on a flat (N, d) stack, without our helpers."""
    n, d = taus.shape

    def norm(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - lo) / (hi - lo)

    def clamp(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
        s = x.sort(1).values
        return torch.clamp(x, s[:, int(d * min_ratio)][:, None], s[:, int(d * (1 - max_ratio) - 1)][:, None])

    mags = clamp(taus.abs(), clip, clip)
    score = torch.exp(n * norm(mags) ** 2) * torch.tanh(taus * taus.sum(0))
    scale = norm(clamp(score, 1 - ratio, 0))
    return (taus.sign() * mags * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


def test_hand_worked_example() -> None:
    taus = torch.tensor([[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, -0.5, 0.0]])
    # task 1: minmax|tau| = [.2, .6, 0, 1], sum tau = [2, -1, 0, 3]: s = [e^.08 tanh 2, e^.72 tanh 2, 0, e^2 tanh 9]
    #   threshold = 3rd smallest = e^.72 tanh 2, so only entry 3 survives, scaled to 1
    # task 2: minmax|tau| = [1, 1, .5, 0]: s = [e^2 tanh 2, -e^2 tanh 1, 0, 0]; threshold 0: only entry 0 survives
    base = torch.full((4,), 10.0)
    method = get_merge_method("pcb", density=0.5, pcb_clip=0.0)
    out = method.merge_tensor(base, list(base + taus), [1.0, 1.0])
    assert torch.allclose(out, base + torch.tensor([1.0, 0, 0, 3]))
    _, scores = pcb_balance(taus, ratio=0.5, clip=0.0)
    assert torch.equal(scores, torch.tensor([[0.0, 0, 0, 1], [1, 0, 0, 0]]))
    half = get_merge_method("pcb", density=0.5, pcb_clip=0.0, lambda_=0.5)
    out = half.merge_tensor(base, list(base + taus), [1.0, 1.0])
    assert torch.allclose(out, base + torch.tensor([0.5, 0, 0, 1.5]))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_matches_the_official_formula(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    taus = torch.randn(n, 16, generator=g) * 0.5  # d=16, clip 1/8 and ratio 1/2: exact float indices
    base = torch.randn(16, generator=g)
    out = get_merge_method("pcb", density=0.5, pcb_clip=0.125).merge_tensor(base, list(base + taus), [1.0] * n)
    torch.testing.assert_close(out, base + official_pcb(taus, ratio=0.5, clip=0.125))
    # a matrix is scored as its flattened entries
    matrix = get_merge_method("pcb", density=0.5, pcb_clip=0.125).merge_tensor(
        base.reshape(4, 4), [t.reshape(4, 4) for t in base + taus], [1.0] * n)
    torch.testing.assert_close(matrix.flatten(), out)


def test_identical_models() -> None:
    g = torch.Generator().manual_seed(0)
    base, ft = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    method = get_merge_method("pcb", density=1.0, pcb_clip=0.0)
    assert torch.equal(method.merge_tensor(base, [base, base], [1.0, 1.0]), base)  # no task vector, no change
    # copies of one fine-tune agree everywhere; only the threshold entry (the smallest |tau|) scores 0
    out = method.merge_tensor(base, [ft] * 3, [1.0] * 3)
    smallest = (ft - base).abs().argmin()
    expected = ft.flatten().clone()
    expected[smallest] = base.flatten()[smallest]
    torch.testing.assert_close(out.flatten(), expected)


def test_weights_scale_the_scores() -> None:
    taus = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    balanced, scores = pcb_balance(taus, ratio=1.0, clip=0.0)
    w = torch.tensor([[2.0], [1.0]])
    expected = (w * scores * balanced).sum(0) / (w * scores).sum(0).where((w * scores).sum(0) > 0, torch.ones(3))
    out = get_merge_method("pcb", density=1.0, pcb_clip=0.0).merge_tensor(torch.zeros(3), list(taus), [2.0, 1.0])
    torch.testing.assert_close(out, expected)


def test_pieces() -> None:
    x = torch.arange(1.0, 9.0)[None]
    assert torch.equal(clip_quantiles(x, 0.125), torch.tensor([[2.0, 2, 3, 4, 5, 6, 7, 7]]))
    assert torch.equal(clip_quantiles(x, 0.01), x)  # fewer than 1/clip entries: nothing clipped
    assert torch.equal(minmax(torch.tensor([[3.0, 3.0], [1.0, 5.0]])), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    scores = torch.randn(2, 100, generator=torch.Generator().manual_seed(1))
    kept = keep_top(scores, 0.1)
    assert ((kept > 0).sum(1) == 9).all()  # ceil(0.1 * 100) - 1: the threshold entry scores 0
    assert torch.equal(kept.max(1).values, torch.ones(2)) and (kept >= 0).all()
    assert torch.equal(keep_top(scores, 0.0), torch.zeros_like(scores))
    assert math.isclose(float(kept[0, scores[0].argmax()]), 1.0)


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="sparsify='none'"):
        get_merge_method("pcb", sparsify="magnitude")
    with pytest.raises(ValueError):
        get_merge_method("pcb", pcb_clip=0.5)
    with pytest.raises(ValueError, match="ratio"):
        pcb_balance(torch.ones(2, 3), ratio=1.5, clip=0.0)
