"""Structured pruning of encoders: whole attention heads and FFN neurons, removed by slicing the weights.

A head h owns rows [h*d_h, (h+1)*d_h) of the query, key and value projections and the same columns of
the attention output projection; an FFN neuron j owns row j of the up projection and column j of the
down projection. Removing a unit deletes those rows and columns: the layers keep their class and
module (only their Parameters and in/out_features change), and the pruned model computes exactly
what the original computes with the unit's output columns zeroed.

Importance of a unit (both ranked within each layer; the same number is removed from every layer):
- "magnitude": the L2 norm of every weight removed with it (its producer rows and consumer columns);
  needs no data.
- "gradient": Michel, Levy & Neubig 2019, *Are Sixteen Heads Really Better than One?*,
  https://arxiv.org/abs/1905.10650, Eq. (2): I_h = E_x | A_h(x)^T dL(x)/dA_h(x) |, the loss change when
  a gate on head h's output is closed, to first order. Computed with a gate of ones per example on the
  consumer's input, so dL/dgate = A_h^T dL/dA_h summed over tokens. The same Taylor score ranks FFN
  neurons (Molchanov et al. 2017, https://arxiv.org/abs/1611.06440). Needs labelled batches (a loss).

Hugging Face configs hold one head count for all layers and compute the head size from it, so a
head-pruned model does not load with `from_pretrained`; `load_pruned` rebuilds it from the saved
weight shapes (it also restores LowRankLinear factors). Pruning only FFN neurons, the same count in
every layer, also updates `config.intermediate_size`, so that model reloads with `from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from deltatune.compression.layers import find_blocks
from deltatune.compression.lowrank import apply_ranks, saved_ranks

Importance = Literal["magnitude", "gradient"]


@dataclass(frozen=True)
class EncoderLayout:
    """Where a BERT-style block keeps its attention and FFN linears (paths relative to the block)."""

    attention: str  # the module with query/key/value and num_attention_heads / attention_head_size
    qkv: tuple[str, str, str]  # relative to `attention`
    attn_out: str
    ffn_up: str
    ffn_down: str


BERT_LAYOUT = EncoderLayout("attention.self", ("query", "key", "value"), "attention.output.dense",
                            "intermediate.dense", "output.dense")
LAYOUTS = {name: BERT_LAYOUT for name in ("bert", "roberta", "xlm-roberta", "camembert", "electra")}


def layout_of(model: nn.Module) -> EncoderLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"structured pruning supports encoders of type {', '.join(LAYOUTS)}; "
                         f"this model is {model_type!r} (use unstructured pruning or layer removal instead)")
    return LAYOUTS[model_type]


@dataclass(frozen=True)
class Units:
    """Units removed together: `size` rows of each producer and the matching input columns of `consumer`."""

    producers: tuple[nn.Linear, ...]
    consumer: nn.Linear
    size: int  # features per unit: the head size for heads, 1 for FFN neurons

    @property
    def count(self) -> int:
        return self.consumer.in_features // self.size


def _linear(block: nn.Module, path: str) -> nn.Linear:
    module = block.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"structured pruning slices nn.Linear layers, but '{path}' is a {type(module).__name__}; "
                         "prune heads and FFN neurons before a low-rank factorisation")
    return module


def head_units(model: nn.Module) -> list[Units]:
    """The attention heads of every layer, in layer order."""
    layout = layout_of(model)
    _, blocks = find_blocks(model)
    units = []
    for block in blocks:
        attention = block.get_submodule(layout.attention)
        producers = tuple(_linear(attention, name) for name in layout.qkv)
        units.append(Units(producers, _linear(block, layout.attn_out), attention.attention_head_size))
    return units


def channel_units(model: nn.Module) -> list[Units]:
    """The FFN neurons of every layer, in layer order."""
    layout = layout_of(model)
    _, blocks = find_blocks(model)
    return [Units((_linear(block, layout.ffn_up),), _linear(block, layout.ffn_down), 1) for block in blocks]


def magnitude_importance(units: Units) -> Tensor:
    """(count,) L2 norm of all the weights each unit owns."""
    squares = units.consumer.weight.detach().float().pow(2).sum(0)  # (features,)
    for producer in units.producers:
        squares = squares + producer.weight.detach().float().pow(2).sum(1)
    return squares.view(units.count, units.size).sum(1).sqrt()


def gradient_importance(model: nn.Module, all_units: list[Units], batches: Iterable[dict[str, Tensor]]
                        ) -> list[Tensor]:
    """(count,) per layer: sum over examples of |dL/dgate| for a gate on each unit's output (Michel et al.)."""
    scores = [torch.zeros(u.count) for u in all_units]
    gates: list[Tensor | None] = [None] * len(all_units)

    def gate_hook(i: int, units: Units):
        def pre(module, args):
            x = args[0]  # (B, T, features)
            gates[i] = torch.ones(x.shape[0], 1, units.count, dtype=x.dtype, device=x.device, requires_grad=True)
            return (x * gates[i].repeat_interleave(units.size, dim=-1), *args[1:])

        return pre

    handles = [u.consumer.register_forward_pre_hook(gate_hook(i, u)) for i, u in enumerate(all_units)]
    was_training = model.training
    model.eval()  # no dropout: the score is of the deterministic model
    try:
        device = next(model.parameters()).device
        seen = 0
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("gradient importance needs labelled batches (a 'labels' key) for the loss; "
                                 "use importance='magnitude' to rank by weights alone")
            with torch.enable_grad():
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                grads = torch.autograd.grad(loss, gates)
            for score, grad in zip(scores, grads):
                score += grad.detach().abs().sum((0, 1)).float().cpu()  # |per-example gate gradient|
            seen += 1
        if not seen:
            raise ValueError("gradient importance needs at least one calibration batch")
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return scores


def _feature_index(units: Units, keep: list[int]) -> Tensor:
    """Indices of the features of the kept units."""
    return torch.cat([torch.arange(u * units.size, (u + 1) * units.size) for u in keep])


def _slice(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Keep only `rows` (outputs) or `cols` (inputs) of `linear`, in place, with new Parameters."""
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight[:, cols]
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if rows is not None and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def _remove_units(units: Units, removed: Iterable[int]) -> list[int]:
    """Slice the units `removed` out of their layers; returns the kept unit indices."""
    removed = set(removed)
    if bad := sorted(u for u in removed if not 0 <= u < units.count):
        raise ValueError(f"units {bad} out of range 0..{units.count - 1}")
    keep = [u for u in range(units.count) if u not in removed]
    if not keep:
        raise ValueError("cannot remove every unit of a layer; keep at least one")
    index = _feature_index(units, keep)
    for producer in units.producers:
        _slice(producer, rows=index)
    _slice(units.consumer, cols=index)
    return keep


def _check_layers(removed: dict[int, list[int]], n_layers: int) -> None:
    if bad := sorted(i for i in removed if not 0 <= i < n_layers):
        raise ValueError(f"layer indices {bad} out of range: the model has layers 0..{n_layers - 1}")


def remove_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Delete attention heads {layer: [head, ...]} in place (head numbers as they are now)."""
    all_units = head_units(model)
    _check_layers(heads, len(all_units))
    layout = layout_of(model)
    _, blocks = find_blocks(model)
    for layer, removed in heads.items():
        keep = _remove_units(all_units[layer], removed)
        attention = blocks[layer].get_submodule(layout.attention)
        attention.num_attention_heads = len(keep)  # the forward reshapes by head size; these are for readers
        attention.all_head_size = len(keep) * attention.attention_head_size


def remove_channels(model: nn.Module, channels: dict[int, list[int]]) -> None:
    """Delete FFN neurons {layer: [neuron, ...]} in place; a uniform width updates config.intermediate_size."""
    all_units = channel_units(model)
    _check_layers(channels, len(all_units))
    for layer, removed in channels.items():
        _remove_units(all_units[layer], removed)
    widths = {u.count for u in channel_units(model)}
    if len(widths) == 1 and hasattr(model.config, "intermediate_size"):
        model.config.intermediate_size = widths.pop()


def _lowest(scores: list[Tensor], fraction: float, what: str) -> dict[int, list[int]]:
    """{layer: the round(fraction * count) lowest-scoring units}."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction of {what} to remove must lie in (0, 1), got {fraction}")
    chosen = {}
    for layer, score in enumerate(scores):
        n = round(fraction * len(score))
        if not 1 <= n < len(score):
            raise ValueError(f"fraction {fraction} removes {n} of the {len(score)} {what} in layer {layer}; "
                             f"choose a fraction between {1 / len(score):.3g} and {1 - 1 / len(score):.3g}")
        chosen[layer] = sorted(torch.argsort(score, stable=True)[:n].tolist())
    return chosen


def _scores(model: nn.Module, all_units: list[Units], importance: Importance, batches) -> list[Tensor]:
    if importance == "magnitude":
        return [magnitude_importance(u) for u in all_units]
    if importance == "gradient":
        if batches is None:
            raise ValueError("importance='gradient' needs calibration batches with labels")
        return gradient_importance(model, all_units, batches)
    raise ValueError(f"importance must be 'magnitude' or 'gradient', got {importance!r}")


def prune_heads(model: nn.Module, fraction: float, *, importance: Importance = "magnitude",
                batches: Iterable[dict[str, Tensor]] | None = None) -> dict[int, list[int]]:
    """Remove the `fraction` least important heads of every layer in place; returns {layer: removed heads}."""
    units = head_units(model)
    removed = _lowest(_scores(model, units, importance, batches), fraction, "heads")
    remove_heads(model, removed)
    return removed


def prune_channels(model: nn.Module, fraction: float, *, importance: Importance = "magnitude",
                   batches: Iterable[dict[str, Tensor]] | None = None) -> dict[int, list[int]]:
    """Remove the `fraction` least important FFN neurons of every layer in place; returns {layer: removed}."""
    units = channel_units(model)
    removed = _lowest(_scores(model, units, importance, batches), fraction, "FFN neurons")
    remove_channels(model, removed)
    return removed


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def _shrink_to(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Remove the last heads / neurons of each layer until the encoder matches the saved shapes."""
    names = {module: name for name, module in model.named_modules()}
    for kind, remove in (("heads", remove_heads), ("channels", remove_channels)):
        all_units = head_units(model) if kind == "heads" else channel_units(model)
        extra = {}
        for layer, units in enumerate(all_units):
            name = names[units.producers[0]]
            saved_rows = shapes.get(f"{name}.weight", shapes.get(f"{name}.US"))[0]  # dense or factorised
            if saved_rows < units.count * units.size:
                extra[layer] = list(range(saved_rows // units.size, units.count))
        if extra:
            remove(model, extra)


def load_pruned(path: str | Path) -> nn.Module:
    """Load a model saved after `prune_heads` / `prune_channels` / `factorize` (any Hugging Face model).

    Builds the architecture from config.json, reshapes it to the saved weights (fewer heads or FFN
    neurons per layer, LowRankLinear factors), then loads the safetensors weights strictly. Float32, eval mode.
    """
    folder = Path(path)
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"{folder / 'config.json'} names no transformers architecture ({architecture!r})")
    model = model_class(config).float()
    shapes = _saved_shapes(folder)
    if getattr(config, "model_type", None) in LAYOUTS:
        _shrink_to(model, shapes)  # first, while every layer is still an nn.Linear
    apply_ranks(model, saved_ranks(shapes))
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    unexpected = set(unexpected) - {name for name, _ in model.named_buffers()}  # old checkpoints save position_ids
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: saved weights do not fit {architecture}: missing "
                         f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    return model.eval()


def structure_summary(model: nn.Module) -> dict[str, list[int]]:
    """Heads and FFN neurons left in each layer of a BERT-style encoder."""
    return {"heads": [u.count for u in head_units(model)], "ffn_neurons": [u.count for u in channel_units(model)]}
