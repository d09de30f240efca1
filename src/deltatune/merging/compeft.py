"""ComPEFT: a fine-tuning delta as a sparse ternary tensor (mask, signs and one scale).

ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization
(Yadav et al. 2023, arXiv:2311.13171). Keep the k = round(density * numel) largest |tau| and give every
survivor one magnitude:
    tau_hat = alpha * std(tau) * sign(tau) * m,    m = top-k mask of |tau|,
with std the (Bessel-corrected) standard deviation of the dense tau and alpha tuned on validation data.
Checked against the official code (github.com/prateeky2806/ComPEFT, src/bert_eval.py and
src/qlora/ties_utils.py: `alpha = replace_factor * tv.std()`, then `alpha * topk_tv.sign()`).
Departures: the official code flattens the whole task vector into one vector (one top-k, one std); here
each tensor gets its own k and std (one more float32 per tensor), so checkpoints stream tensor by tensor.
For LoRA the paper compresses the factors A and B; `compress_delta` compresses each layer's dW = s B A
(d_out x d_in), which adds straight to the weights but is larger than the factors at low rank.

Storage: a bit-packed mask over all entries, one sign bit per survivor and a float32 scale,
numel + k + 32 bits against 16 numel bits for the dense fp16 delta.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.engine import io, peft_format
from deltatune.engine.atomic import atomic_path, atomic_write_text
from deltatune.engine.io import sha256
from deltatune.engine.kinds import kind_of
from deltatune.engine.layer import DeltaLayer
from deltatune.merging.adapters import prepare_out, read_adapter_deltas

WEIGHTS_NAME, CONFIG_NAME = "compeft.safetensors", "compeft_config.json"
FORMAT = "deltatune.compeft/1"


def _pack(bits: Tensor) -> Tensor:
    """Bool tensor -> uint8, 8 flags a byte (little-endian bit order)."""
    return torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))


def _unpack(packed: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


@dataclass(frozen=True)
class CompressedDelta:
    """tau_hat = scale * sign * mask, stored packed."""

    shape: tuple[int, ...]
    mask: Tensor  # uint8 (ceil(numel / 8),): bit i is set when flat entry i survives
    signs: Tensor  # uint8 (ceil(k / 8),): bit j is set when the j-th survivor (flat order) is negative
    scale: float  # alpha * std(tau), a float32 value

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        """Number of survivors k."""
        return int(_unpack(self.mask, self.numel).sum())

    @property
    def nbytes(self) -> int:
        return self.mask.numel() + self.signs.numel() + 4  # + the float32 scale

    def decompress(self) -> Tensor:
        """The float32 tensor tau_hat."""
        keep = _unpack(self.mask, self.numel)
        negative = _unpack(self.signs, int(keep.sum()))
        out = torch.zeros(self.numel)
        out[keep] = torch.where(negative, -self.scale, self.scale)
        return out.reshape(self.shape)


def _check_options(density: float, alpha: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density is the fraction of entries kept, in [0, 1]; got {density}")
    if not alpha > 0:
        raise ValueError(f"alpha scales std(delta) and must be > 0, got {alpha}")


def compeft(delta: Tensor, density: float, alpha: float = 1.0) -> CompressedDelta:
    """ComPEFT one tensor: the round(density * numel) largest |entries| become sign * alpha * std(delta).

    Entries equal to zero never survive (their sign is 0, as in the official code's sign()).
    """
    _check_options(density, alpha)
    x = delta.detach().float().cpu().flatten()
    k = round(density * x.numel())
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.topk(x.abs(), k, sorted=False).indices] = True
    keep &= x != 0
    std = float(x.std()) if x.numel() > 1 else 0.0  # one entry has no spread
    scale = float(np.float32(alpha * std))
    return CompressedDelta(tuple(delta.shape), _pack(keep), _pack(x[keep] < 0), scale)


# --- files -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorReport:
    key: str
    shape: tuple[int, ...]
    kept: int
    dense_bytes: int  # the delta in fp16
    compressed_bytes: int
    rel_error: float  # ||tau - tau_hat||_F / ||tau||_F
    sq_norm: float  # ||tau||_F^2


@dataclass(frozen=True)
class CompressionReport:
    """Sizes and errors of a compress_delta run; unchanged tensors (zero delta) are not stored or counted."""

    out: Path
    source: str  # "checkpoint" or "adapter"
    density: float
    alpha: float
    tensors: tuple[TensorReport, ...]
    unchanged: tuple[str, ...]

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def compressed_bytes(self) -> int:
        return sum(t.compressed_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes if self.compressed_bytes else float("inf")

    @property
    def rel_error(self) -> float:
        """||tau - tau_hat||_F / ||tau||_F over all stored tensors together."""
        total = sum(t.sq_norm for t in self.tensors)
        return math.sqrt(sum(t.rel_error**2 * t.sq_norm for t in self.tensors) / total) if total else 0.0

    def to_markdown(self) -> str:
        lines = [f"ComPEFT (density {self.density}, alpha {self.alpha}) of a {self.source} delta -> '{self.out}': "
                 f"{self.dense_bytes:,} B dense fp16 -> {self.compressed_bytes:,} B ({self.ratio:.1f}x), "
                 f"relative error {self.rel_error:.4f}; {len(self.unchanged)} unchanged tensors not stored", "",
                 "| tensor | shape | kept | fp16 bytes | bytes | rel. error |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {t.key} | {'x'.join(map(str, t.shape))} | {t.kept:,} | {t.dense_bytes:,} | "
                  f"{t.compressed_bytes:,} | {t.rel_error:.4f} |" for t in self.tensors]
        return "\n".join(lines)


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single or sharded checkpoints)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in '{folder}'; save it with save_pretrained "
                                "(safetensors is its default)")
    index = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            index.update(dict.fromkeys(h.keys(), f))
    return index


def _checkpoint_deltas(base: Path, finetuned: Path) -> Iterator[tuple[str, Tensor]]:
    """tau = theta_ft - theta_base for every float tensor, read one tensor at a time."""
    ft_index, base_index = _checkpoint_files(finetuned), _checkpoint_files(base)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in {*ft_index.values(), *base_index.values()}}
        missing = sorted(ft_index.keys() - base_index.keys())
        mismatched = [k for k in ft_index if k in base_index and handles[ft_index[k]].get_slice(k).get_shape()
                      != handles[base_index[k]].get_slice(k).get_shape()]
        if missing or mismatched:
            raise ValueError(f"'{finetuned}' does not fine-tune '{base}': tensors missing from the base "
                             f"{missing[:5]}, shapes differ for {mismatched[:5]}; pass the checkpoint it started from")
        for key, f in ft_index.items():
            theta = handles[f].get_tensor(key)
            if theta.is_floating_point():
                yield key, theta.float() - handles[base_index[key]].get_tensor(key).float()


def _adapter_deltas(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Per adapted layer: '<path>.weight' -> dW (d_out x d_in matrix view) and '<path>.bias' -> its change."""
    for path, f in read_adapter_deltas(folder).layers.items():
        yield f"{path}.weight", f.delta()
        if f.bias is not None:
            yield f"{path}.bias", f.bias.float()


def _is_adapter(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (io.CONFIG_NAME, peft_format.CONFIG_NAME))


def compress_delta(base: str | Path | None, finetuned: str | Path, out: str | Path, density: float = 0.1,
                   alpha: float = 1.0, overwrite: bool = False) -> CompressionReport:
    """ComPEFT-compress a fine-tuning delta into `out`/compeft.safetensors (+ compeft_config.json).

    Args:
        base: the HF checkpoint folder `finetuned` started from (needed for checkpoints; adapters ignore it).
        finetuned: an HF safetensors checkpoint folder (tau = theta_ft - theta_base per float tensor) or a
            deltatune / PEFT LoRA folder (per layer dW = s B A and any bias change).
        density: fraction of each tensor's entries kept; alpha: survivors get alpha * std(tau).
    """
    finetuned = Path(finetuned)
    if not finetuned.is_dir():
        raise FileNotFoundError(f"'{finetuned}' is not a folder; pass a checkpoint or adapter folder")
    source = "adapter" if _is_adapter(finetuned) else "checkpoint"
    if source == "checkpoint" and base is None:
        raise ValueError(f"'{finetuned}' is a checkpoint: pass the base checkpoint it was fine-tuned from")
    _check_options(density, alpha)
    out = prepare_out(out, overwrite, ())  # check before the work; clear only right before writing
    deltas = _adapter_deltas(finetuned) if source == "adapter" else _checkpoint_deltas(Path(base), finetuned)
    stored: dict[str, Tensor] = {}
    rows, unchanged, shapes = [], [], {}
    for key, tau in deltas:
        if not tau.any():
            unchanged.append(key)
            continue
        c = compeft(tau, density, alpha)
        stored.update({f"mask/{key}": c.mask, f"sign/{key}": c.signs, f"scale/{key}": torch.tensor([c.scale])})
        shapes[key] = list(c.shape)
        sq = float(tau.square().sum())
        err = float((tau - c.decompress()).square().sum())
        rows.append(TensorReport(key, c.shape, c.count, 2 * tau.numel(), c.nbytes, math.sqrt(err / sq), sq))
    prepare_out(out, overwrite, (CONFIG_NAME, WEIGHTS_NAME))
    weights = out / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(stored, str(tmp), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "density": density, "alpha": alpha, "source": source, "finetuned": str(finetuned),
            "base": None if base is None else str(base), "tensors": shapes, "weights_sha256": sha256(weights)}
    atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")  # last: marks a complete write
    return CompressionReport(out, source, density, alpha, tuple(rows), tuple(unchanged))


def read_compressed(path: str | Path) -> tuple[dict[str, Any], dict[str, CompressedDelta]]:
    """(config, key -> CompressedDelta) of a compress_delta folder, checked against its checksum."""
    path = Path(path)
    cfg, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no ComPEFT delta at '{path}': {CONFIG_NAME} or {WEIGHTS_NAME} is missing")
    meta = json.loads(cfg.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{cfg}' is not a {FORMAT} config (format={meta.get('format')!r})")
    if sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"corrupt '{weights}': checksum differs from the one saved; compress the delta again")
    try:
        t = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt safetensors file '{weights}': {err}") from None
    return meta, {key: CompressedDelta(tuple(shape), t[f"mask/{key}"], t[f"sign/{key}"], float(t[f"scale/{key}"]))
                  for key, shape in meta["tensors"].items()}


def _identity(d: Tensor) -> Tensor:
    return d


def _layer_destination(model: nn.Module, key: str) -> tuple[Tensor | None, Callable[[Tensor], Tensor],
                                                             Callable[[Tensor], Tensor]]:
    """Adapter deltas: '<layer path>.weight' is the d_out x d_in matrix of the layer; '.bias' its bias."""
    path, name = key.rsplit(".", 1)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None, _identity, _identity
    module = module.base_layer if isinstance(module, DeltaLayer) else module
    kind = kind_of(module)
    if name != "weight" or kind is None:
        return getattr(module, name, None), _identity, _identity
    w = module.weight
    return w, kind.to_matrix, lambda d: kind.to_weight(d, w)


def _destination(target: nn.Module | dict[str, Tensor], state: dict[str, Tensor], key: str,
                 shape: tuple[int, ...], by_layer: bool) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The tensor a stored delta adds to, and how to lay the delta out like it; raises before any change."""
    if by_layer and isinstance(target, nn.Module):
        t, view, layout = _layer_destination(target, key)
    else:
        t, view, layout = state.get(key), _identity, _identity
    if t is None or tuple(view(t).shape) != tuple(shape):
        found = "nothing" if t is None else f"shape {tuple(view(t).shape)}"
        raise ValueError(f"'{key}' is a {tuple(shape)} delta but the target has {found} there; apply it to the "
                         "model (or state dict) it was compressed for")
    return t, layout


@torch.no_grad()
def apply_compressed_delta(target: nn.Module | dict[str, Tensor], path: str | Path, scale: float = 1.0
                           ) -> nn.Module | dict[str, Tensor]:
    """Add scale * tau_hat to a model's weights (in place) or to a state dict (its entries replaced).

    Checkpoint deltas are keyed by state-dict names; adapter deltas by '<layer path>.weight' / '.bias',
    and their d_out x d_in matrices are laid out by each layer's kind (Linear, Conv, Embedding, Conv1D),
    which only a model knows: adapter deltas need an nn.Module target. Every key and shape is checked
    before the first change.
    """
    meta, deltas = read_compressed(path)
    is_model, by_layer = isinstance(target, nn.Module), meta["source"] == "adapter"
    if by_layer and not is_model and any(k.endswith(".weight") for k in deltas):
        raise ValueError("adapter deltas are d_out x d_in matrices whose layout depends on the layer kind; "
                         "pass the model (nn.Module) instead of a state dict")
    state = target.state_dict(keep_vars=True) if is_model else target
    places = {key: _destination(target, state, key, c.shape, by_layer) for key, c in deltas.items()}
    for key, c in deltas.items():
        t, layout = places[key]
        d = layout(scale * c.decompress())
        if is_model:
            t.add_(d.to(t.dtype))
        else:
            target[key] = (t.float() + d).to(t.dtype)
    return target
