"""torch.compile traces adapted layers in one graph (fullgraph=True fails on any graph break)."""

import pytest
import torch
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
    torch.testing.assert_close(compiled(x), dm(x))
    mixed = ["default", "other", "__base__", "default"]
    with dm._routed(mixed):
        torch.testing.assert_close(compiled(x), dm(x, adapter_names=mixed))
