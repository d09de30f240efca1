"""Packed files of low-bit adapters (BottleneckConfig.bits): what Jie et al.'s official code stores.

A plain save keeps the full-precision weights that training updates. save_packed stores, for each quantised
down/up weight, '<path>.<down|up>.codes' (uint8, 8 // b level indices a byte, i.e. b/8 bytes a weight) and
'.mean_std' (float32 (2,), 8 bytes a tensor); the adapter's other tensors (LayerNorm, learned scale) as they
are. load_packed, into a model injected with the same config, puts in the dequantised weights and turns
their quantiser off, as the official load does (binary_adapter/utils.py l.53-62): quantising them again
would change them, since their own mean and std differ from the stored ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...engine.io import read_tensors
from ...engine.model import DeltaModel
from ._quantize import pack, unpack
from .bottleneck import Bottleneck

PARTS = ("down", "up")


def quantised_deltas(dm: DeltaModel, name: str) -> Iterator[tuple[str, Bottleneck]]:
    """(layer path, delta) of each low-bit bottleneck of adapter `name`; an error if it has none."""
    found = [(path, delta) for path in dm.adapters[name].all_paths
             if isinstance(delta := dm.model.get_submodule(path).deltas[name], Bottleneck) and delta.bits]
    if not found:
        raise ValueError(f"adapter '{name}' has no low-bit bottleneck adapter to pack: inject it with bits=1 "
                         "(or 2, 4, 8)")
    yield from found


def export_packed(dm: DeltaModel, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s tensors with each quantised weight as its packed codes and (mean, std)."""
    state = {k: v.detach().contiguous().cpu() for k, v in dm.adapter_state_dict(name).items()}
    for path, delta in quantised_deltas(dm, name):
        if not bool(state.pop(f"{path}.fake_quant")):
            raise ValueError(f"adapter '{name}' was loaded from a packed file (its weights are dequantised): "
                             "keep that file rather than packing it again")
        for part in PARTS:
            w = state.pop(f"{path}.{part}.weight")
            state[f"{path}.{part}.codes"], state[f"{path}.{part}.mean_std"] = pack(w, delta.bits)
    return state


def load_packed_state(dm: DeltaModel, packed: dict[str, Tensor], name: str = "default") -> None:
    """Put the weights `export_packed` stored into adapter `name` (same config) and stop re-quantising them."""
    state = dict(packed)
    for path, delta in quantised_deltas(dm, name):
        for part in PARTS:
            keys = f"{path}.{part}.codes", f"{path}.{part}.mean_std"
            if any(k not in state for k in keys):
                raise ValueError(f"the packed adapter has no '{keys[0]}': it was exported from another config; "
                                 f"inject adapter '{name}' with the config it was trained with")
            w = getattr(delta, part).weight
            state[f"{path}.{part}.weight"] = unpack(state.pop(keys[0]), state.pop(keys[1]), delta.bits, w.shape)
        state[f"{path}.fake_quant"] = torch.zeros((), dtype=torch.bool)
    dm.load_adapter_state_dict(state, name)


def save_packed(dm: DeltaModel, file: Any, name: str = "default") -> Path:
    """Write export_packed(dm, name) to one safetensors file."""
    save_file(export_packed(dm, name), str(file), metadata={"format": "deltatune-lowbit"})
    return Path(file)


def load_packed(dm: DeltaModel, file: Any, name: str = "default") -> None:
    """Read a save_packed file (checked as adapter weights are) into adapter `name`."""
    load_packed_state(dm, read_tensors(Path(file)), name)
