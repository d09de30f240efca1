"""torch.compile traces adapted layers in one graph (fullgraph=True fails on any graph break)."""

import pytest
import torch
from helpers import assert_close
from torch import nn

import deltatune as dt


@pytest.mark.parametrize("config", [dt.LoRAConfig(r=2, dropout=0.1, targets=["0", "2"]),
                                    dt.DoRAConfig(r=2, targets=["0", "2"])], ids=["lora", "dora"])
def test_compiled_adapted_model_has_no_graph_breaks(config):
    torch.manual_seed(0)
    dm = dt.inject(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), config)
    dm.add_adapter("other", dt.LoRAConfig(r=3, targets=["0"]))
    for p in dm.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    dm.eval()
    x = torch.randn(4, 16)
    compiled = torch.compile(dm.model, backend="eager", fullgraph=True)
    assert_close(compiled(x), dm(x))
    mixed = ["default", "other", "__base__", "default"]
    with dm._routed(mixed):
        assert_close(compiled(x), dm(x, adapter_names=mixed))


def test_compiled_training_step_through_the_fused_lowrank_node_matches_eager():
    """Forward and backward of the engine's fused LoRA autograd node traced whole (aot_eager, fullgraph)."""
    torch.manual_seed(0)
    dm = dt.inject(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)), dt.LoRAConfig(r=2, targets=["0", "2"]))
    dm.add_adapter("other", dt.LoRAConfig(r=3, targets=["0"]))
    dm.set_active(["default", "other"])
    for p in dm.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    x = torch.randn(8, 16)
    params = [p for p in dm.parameters() if p.requires_grad]
    dm.model(x).square().sum().backward()
    eager = [p.grad.clone() for p in params]
    dm.zero_grad()
    compiled = torch.compile(dm.model, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    for p, g in zip(params, eager):
        assert_close(p.grad, g)
