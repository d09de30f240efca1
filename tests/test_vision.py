"""Deltas on a real CNN whose convolutions are Conv2d subclasses with extra constructor arguments."""

import pytest
import torch
from helpers import assert_close

import deltatune as dt
from deltatune import assets


@pytest.fixture(scope="module")
def efficientnet():
    return assets.efficientnet_lite0()


def pointwise_or_stem(path, module):
    return isinstance(module, torch.nn.Conv2d) and module.groups == 1 and ("project_conv" in path or "stem" in path)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_efficientnet_conv_subclass_is_wrapped_not_rebuilt(efficientnet, method):
    torch.manual_seed(0)
    net = efficientnet
    stem = net._conv_stem
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y0 = net(x)
    dm = dt.inject(net, dt.make_config(method, r=4, targets=pointwise_or_stem))
    try:
        assert dm.model._conv_stem.base_layer is stem  # the user's layer object, kept as it is
        with torch.no_grad():
            assert torch.equal(dm(x), y0)
            for p in dm.parameters():
                if p.requires_grad and p.dim() == 2 and p.shape[1] == 4:  # lora_B (d_out, r)
                    p.normal_(std=0.02)
            y = dm(x)
            assert (y - y0).abs().max() > 1e-3
            dm.merge()
            assert_close(dm(x), y, rtol=1e-4, atol=1e-4)
            dm.unmerge()
            assert_close(dm(x), y, rtol=1e-5, atol=1e-5)
        # The stem's static same-padding runs for the adapter too: ΔW's output has the base's spatial size.
        layer = dm.model._conv_stem
        out = layer.deltas["default"].lora_out(layer, x)
        assert out.shape == stem(x).shape
        dm(x).sum().backward()
        assert all(p.grad is None for n, p in stem.named_parameters())
        assert layer.deltas["default"].lora_B.grad.abs().sum() > 0
    finally:
        dm.delete_adapter("default")
    assert net._conv_stem is stem
