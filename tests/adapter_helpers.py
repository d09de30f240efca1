"""Shared by the activation-adapter tests: MiniLM, random adapter weights, and the definitions written by hand."""

from __future__ import annotations

import torch
from transformers import AutoModel


def fresh(path):
    torch.manual_seed(0)
    return AutoModel.from_pretrained(path).eval()


def randomise(dm, std=0.05, seed=1):
    """Adapters start at the identity (up = 0); random weights make every term of the definition count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and p.numel() == 1 else 0.0))


def adapter_f(delta, h):
    """s · up(act(down(h))) from the delta's own parameters."""
    return delta.up(delta.act(delta.down(h))) * delta.scale


def by_hand(model, dm, name):
    """The adapted BertOutput/BertSelfOutput forwards, written from the definitions on the model's submodules."""
    cfg = dm.adapters[name].config

    def sublayer(mod, delta):
        def forward(hidden_states, input_tensor):
            h = mod.dropout(mod.dense(hidden_states))
            r, N = input_tensor, mod.LayerNorm
            if cfg.placement == "parallel":  # He et al.: h + s f(r), then the block's own residual and norm
                return N(h + adapter_f(delta, r) + r)
            if cfg.original_ln_before:  # Pfeiffer: the adapter reads N(h + r), its residual is h
                return N(h + adapter_f(delta, N(h + r)) + r)
            return N(h + adapter_f(delta, h) + r)  # Houlsby
        return forward

    for path in dm.adapters[name].paths:
        layer = dm.model.get_submodule(path)
        model.get_submodule(path).forward = sublayer(model.get_submodule(path), layer.deltas[name])
    return model


def outputs_alone(dm, names, batch):
    """last_hidden_state with each adapter active alone, and with none."""
    out = {}
    for n in names:
        dm.set_active(n)
        out[n] = dm(**batch).last_hidden_state
    with dm.disabled():
        out["__base__"] = dm(**batch).last_hidden_state
    return out
