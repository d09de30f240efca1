"""Small helpers shared by the tests."""

import torch
from torch import nn


def perturb(module: nn.Module, std: float = 0.1, seed: int = 123) -> None:
    """Add noise to every trainable parameter (as training would), so the deltas are no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


class Holder(nn.Module):
    """A one-layer model, so a bare layer can be targeted by the name 'layer'."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
