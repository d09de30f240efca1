"""Small helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

import deltatune as dt


def perturb(module: nn.Module, std: float = 0.1, seed: int = 123) -> None:
    """Add noise to every trainable parameter (as training would), so the deltas are no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# float32 products of d terms round differently with every BLAS kernel (AVX2 vs AVX-512, OpenBLAS vs MKL):
# errors grow with the magnitudes summed, so tolerances are relative to the values compared plus a small
# absolute floor for entries near zero.
RTOL, ATOL = 1e-4, 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL,
                 scale: float | None = None, msg: str = "") -> None:
    """|actual - expected| <= atol + rtol * s elementwise, s = scale or max|expected| (the magnitude compared).

    Scaling by the largest magnitude, not each entry, is what accumulated rounding in a matmul or a
    merged weight needs: an entry near zero carries the error of the large terms that summed to it.
    """
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{msg} shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    s = e.abs().max().item() if scale is None and e.numel() else (scale or 0.0)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    bound = atol + rtol * s
    assert err <= bound, f"{msg} max |diff| {err:.3g} > {bound:.3g} (atol {atol:g} + rtol {rtol:g} x scale {s:.3g})"


class Holder(nn.Module):
    """A one-layer model, so a bare layer can be targeted by the name 'layer'."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def train_losses(dm, batch: dict, steps: int = 5, lr: float = 1e-2, eval_mode: bool = False,
                 **forward_kwargs) -> list[float]:
    """Run `steps` AdamW steps on one batch as the trainer does and return each step's task loss.

    Trains the requires_grad parameters; calls dm.on_train_step(step) before each forward and minimises
    loss + dm.regularization_loss(). dm.train() by default; eval_mode=True turns dropout off (gradients
    still flow). forward_kwargs (e.g. labels=...) go to every forward.
    """
    from deltatune.training.optimizers import remap_state

    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=lr)
    dm.train(not eval_mode)
    losses = []
    for step in range(steps):
        dm.on_train_step(step)
        remap_state(opt, dm.take_stale_state())  # entries a delta moved (SpIEL), as the trainer does
        loss = dm(**batch, **forward_kwargs).loss
        opt.zero_grad()
        (loss + dm.regularization_loss()).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _output_with(dm, name: str, x: torch.Tensor) -> torch.Tensor:
    """dm(x) with only adapter `name` active, or with every adapter off for dt.BASE."""
    if name == dt.BASE:
        with dm.disabled():
            return dm(x).detach()
    dm.set_active(name)
    return dm(x).detach()


def assert_rows_match_each_adapter(dm, x: torch.Tensor, names: list[str], atol: float = 1e-5,
                                   rows_alone: bool = False, base: torch.Tensor | None = None
                                   ) -> dict[str, torch.Tensor]:
    """Row i of dm(x, adapter_names=names) must match adapter names[i] run alone: within atol + 10 atol x its
    magnitude (assert_close).

    The reference runs on the whole batch (row i taken), or on row i by itself with rows_alone=True.
    `base`, if given, is the expected whole-batch output for dt.BASE rows instead of dm.disabled().
    Returns the whole-batch outputs per name (empty with rows_alone).
    """
    mixed = dm(x, adapter_names=names).detach()
    alone: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        if n == dt.BASE and base is not None:
            ref = base[i:i + 1]
        elif rows_alone:
            ref = _output_with(dm, n, x[i:i + 1])
        else:
            if n not in alone:
                alone[n] = _output_with(dm, n, x)
            ref = alone[n][i:i + 1]
        assert_close(mixed[i:i + 1], ref, rtol=10 * atol, atol=atol, msg=f"row {i} ({n})")
    return alone


def assert_round_trip(dm, fresh: nn.Module, x: torch.Tensor, tmp_path, name: str | None = None,
                      atol: float = 0.0):
    """dm.save(tmp_path, name), then dt.load(fresh, tmp_path) must reproduce that adapter's output on x
    (exactly by default, else within atol + 10 atol x its magnitude). Returns the loaded model."""
    if name is not None:
        dm.set_active(name)
    expected = dm(x).detach()
    dm.save(tmp_path, name)
    loaded = dt.load(fresh, tmp_path)
    got = loaded(x)
    if atol == 0:
        assert torch.equal(got, expected), max_diff(got, expected)
    else:
        assert_close(got, expected, rtol=10 * atol, atol=atol)
    return loaded



class TwoLinears(nn.Module):
    """Two seeded linears of different shapes, 8 -> 6 -> 10 (shared bases are sized for the largest and sliced)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))
