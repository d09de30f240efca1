"""The engine's contract with an additive method: the method gives `Delta.change` (Δh) and nothing else.

The engine then supplies the input dropout (from the config's `dropout`), the casts (the delta's dtype in, the
base's out), the add, token masks and mixed-adapter batches; a `serial` delta gets the layer's output instead of
its input. Checked through a small test-only method that records what its `change` was given.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_rows_match_each_adapter, perturb
from pydantic import Field
from test_all_methods import METHODS, build
from torch import nn

import deltatune as dt
from deltatune.engine import registry
from deltatune.engine.layer import Delta, DeltaLayer
from deltatune.methods.lowrank.lora import adapter_dtype


class MixConfig(dt.DeltaConfig):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class Mix(Delta):
    """Δh = M h with M (d, d) in the adapter dtype (fp32 on a bf16 base); remembers the h it was given."""

    def __init__(self, config, layer, initialize=True, shared=None):
        super().__init__(config, layer, initialize, shared)
        d = layer.matrix().shape[0]
        self.M = nn.Parameter(torch.randn(d, d, dtype=adapter_dtype(layer)) * 0.1)
        self.seen: list[torch.Tensor] = []

    def change(self, layer: DeltaLayer, h: torch.Tensor) -> torch.Tensor:
        self.seen.append(h.detach())
        return h @ self.M.t()  # fails on a bf16 h: the engine must cast it to M's dtype


class SerialMix(Mix):
    serial = True


@pytest.fixture
def methods():
    for name, cls in (("test_mix", Mix), ("test_serial_mix", SerialMix)):
        config = type(f"{cls.__name__}Config", (MixConfig,), {})
        registry.register(name, config=config, family="test", formula="d^2", paper="-", summary="test only")(cls)
    yield {name: registry.get_method(name).config for name in ("test_mix", "test_serial_mix")}
    for name in ("test_mix", "test_serial_mix"):
        registry._METHODS.pop(name)


def bf16_linear() -> tuple[nn.Module, torch.Tensor]:
    """A bf16 model of one Linear (path '0') and an input (batch 3, tokens 4)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16), torch.randn(3, 4, 8).to(torch.bfloat16)


def test_change_gets_the_engines_dropout_and_casts(methods):
    base, x = bf16_linear()
    expected_base = base(x).detach()
    dm = dt.inject(base, methods["test_mix"](targets=["0"], dropout=0.5))
    delta = dm.model[0].deltas["default"]
    assert isinstance(delta.dropout, nn.Dropout) and delta.dropout.p == 0.5
    dm.train()
    torch.manual_seed(7)
    y = dm(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True).float()  # the same draw, in the base dtype, then cast up
    assert delta.dropout_p == 0.5 and delta.seen[-1].dtype == torch.float32
    assert torch.equal(delta.seen[-1], dropped)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected_base + (dropped @ delta.M.t()).to(torch.bfloat16))
    dm.eval()
    dm(x)
    assert delta.dropout_p == 0.0 and torch.equal(delta.seen[-1], x.float())  # no dropout in eval


def test_no_dropout_field_or_zero_gives_identity(methods):
    base, _ = bf16_linear()
    dm = dt.inject(base, methods["test_mix"](targets=["0"]))
    delta = dm.model[0].deltas["default"]
    dm.train()
    assert isinstance(delta.dropout, nn.Identity) and delta.dropout_p == 0.0
    assert not [k for k in dm.state_dict() if "dropout" in k]  # nothing saved for it


def test_token_masks_and_mixed_batches_reach_a_change_only_delta(methods):
    base, x = bf16_linear()
    dm = dt.inject(base, methods["test_mix"](targets=["0"]), name="a")
    dm.add_adapter("b", methods["test_mix"](targets=["0"]))
    dm.eval()
    with dm.disabled():
        plain = dm(x)
    dm.set_active("a")
    adapted = dm(x)
    assert not torch.equal(adapted, plain)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    masked = dm(x, token_mask=mask)
    keep = mask.bool()[..., None]
    assert torch.equal(masked, torch.where(keep, adapted, plain))
    assert_rows_match_each_adapter(dm, x, ["a", dt.BASE, "b"], atol=1e-2)  # bf16 outputs


def test_a_serial_delta_changes_the_layers_output(methods):
    base, x = bf16_linear()
    out = base(x).detach()
    dm = dt.inject(base, methods["test_serial_mix"](targets=["0"]))
    dm.eval()
    delta = dm.model[0].deltas["default"]
    y = dm(x)
    assert torch.equal(delta.seen[-1], out.float())
    assert torch.equal(y, out + (out.float() @ delta.M.t()).to(torch.bfloat16))


WITH_DROPOUT = [m for m in METHODS if "dropout" in dt.get_method(m).config.model_fields]


@pytest.mark.parametrize("method", WITH_DROPOUT)
def test_every_methods_dropout_option_acts_in_training_only(method):
    """A method's `dropout` reaches its forward (MoS, VB-LoRA and LoRA-Mini once ignored it) and only in training."""
    outputs = {}
    for p in (0.0, 0.5):
        model, cfg, x = build(method)
        dm = dt.inject(model, type(cfg)(**{**cfg.model_dump(), "dropout": p}))
        perturb(dm, seed=5)
        dm.train()
        torch.manual_seed(7)
        train = dm(x).detach()
        dm.eval()
        outputs[p] = train, dm(x).detach()
    assert not torch.equal(outputs[0.5][0], outputs[0.0][0]), f"{method}: dropout=0.5 changed nothing in training"
    assert_close(outputs[0.5][1], outputs[0.0][1], rtol=0, atol=0, msg=f"{method}: dropout acts in eval")
