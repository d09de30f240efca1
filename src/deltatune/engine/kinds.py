"""Layer kinds: how a base layer's weight reads as a d_out x d_in matrix, and how to apply another weight.

Every weight-delta method works on the matrix view `M` (d_out x d_in, conv kernels flattened into
d_in). A kind translates between that view and the layer's own weight layout, and applies a
substitute weight through the *layer's own forward* (``torch.func.functional_call``), so user
subclasses with custom padding or extra constructor arguments work without being rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .quantized import FOUR_BIT, INT8, QuantOps, bnb_class


@dataclass(frozen=True)
class LayerKind:
    name: str
    to_matrix: Callable[[Tensor], Tensor]  # weight -> (d_out, d_in) view
    to_weight: Callable[[Tensor, Tensor], Tensor]  # (matrix (k, d_in), like weight) -> layout with k outputs
    channel_dim: int  # dimension of the output features in the layer's output
    stock: tuple[str, ...]  # qualified names of the stock forwards that `op` reproduces
    # the stock forward with another weight, no bias; None: the forward only ever reads the weight itself
    # (MultiheadAttention), so deltas run it with a substitute weight W0 + ΔW
    op: Callable[[nn.Module, Tensor, Tensor], Tensor] | None
    weight: str = "weight"  # the parameter that is the layer's weight, and its bias
    bias: str = "bias"
    parts: tuple[str, ...] = ()  # submodules whose weights the forward reads without calling them: adapted with it
    # a quantized layer (bitsandbytes): `weight` holds packed bytes, W0 is read through quantized.dequantize
    quantized: QuantOps | None = None

    # Kinds are singletons compared with `is` (kind is LINEAR): a deep-copied model must keep them, or its
    # layers would silently leave the fused paths (and conv-only branches would misread them).
    def __copy__(self) -> LayerKind:
        return self

    def __deepcopy__(self, memo: dict) -> LayerKind:
        return self


def _conv_op(conv: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    if conv.padding_mode != "zeros":
        return functional_call(conv, {"weight": w, "bias": None}, (x,))
    op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    return op(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _embedding_op(emb: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    return F.embedding(x, w, emb.padding_idx, None, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)


LINEAR = LayerKind("linear", lambda w: w, lambda m, like: m, -1, ("Linear.forward",),
                   lambda mod, x, w: F.linear(x, w))
CONV = LayerKind("conv", lambda w: w.flatten(1), lambda m, like: m.reshape(m.shape[0], *like.shape[1:]), 1,
                 ("Conv1d.forward", "Conv2d.forward", "Conv3d.forward"), _conv_op)
# nn.Embedding is a lookup into a (num, dim) table: as a linear map from one-hot ids it is (dim x num).
EMBEDDING = LayerKind("embedding", lambda w: w.t(), lambda m, like: m.t(), -1, ("Embedding.forward",),
                      _embedding_op)
# GPT-2's Conv1D stores its weight as (d_in, d_out); its forward hard-codes d_out, so it always takes `op`.
CONV1D = LayerKind("conv1d_transposed", lambda w: w.t(), lambda m, like: m.t(), -1, ("Conv1D.forward",),
                   lambda mod, x, w: x @ w)

# bitsandbytes layers (nn.Linear subclasses whose weight is packed): their own forward computes W0 x, a delta's
# substitute weight goes through F.linear, and DeltaLayer.weight dequantises W0 for the methods that read it.
QLINEAR4 = LayerKind("linear_4bit", lambda w: w, lambda m, like: m, -1, ("Linear4bit.forward",),
                     lambda mod, x, w: F.linear(x, w), quantized=FOUR_BIT)
QLINEAR8 = LayerKind("linear_int8", lambda w: w, lambda m, like: m, -1, ("Linear8bitLt.forward",),
                     lambda mod, x, w: F.linear(x, w), quantized=INT8)
_QUANTIZED = {"Linear4bit": QLINEAR4, "Linear8bitLt": QLINEAR8}  # by quantized.bnb_class
# layers whose forward is x W^T over the last dim (token-major): what routing and activation-space forms need
LINEAR_KINDS = (LINEAR, CONV1D, QLINEAR4, QLINEAR8)


# nn.MultiheadAttention reads in_proj_weight (q, k, v stacked: 3E x E) and out_proj.weight inside
# F.multi_head_attention_forward and never calls out_proj: a delta on each, run through the whole module.
MHA = LayerKind("multihead_attention", lambda w: w, lambda m, like: m, -1, (), None, "in_proj_weight", "in_proj_bias",
                ("out_proj",))


def _is_hf_conv1d(module: nn.Module) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a layer that weight deltas can target, or None."""
    if (quantized := bnb_class(module)) is not None:  # before nn.Linear, which they subclass
        return _QUANTIZED[quantized]
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if _is_hf_conv1d(module):
        return CONV1D
    return None


def float_kind_of(module: nn.Module, path: str, what: str) -> LayerKind | None:
    """kind_of, for code that reads and writes `module.weight` itself (pruning, LASER): a quantized layer's
    weight is packed bytes, so it is refused."""
    kind = kind_of(module)
    if kind is not None and kind.quantized is not None:
        raise ValueError(f"cannot {what} '{path}': it is a quantized {type(module).__name__} ({kind.quantized.scheme}) "
                         "whose weight is packed; do it on the float model and quantize after (deltatune.quantize), "
                         "or deltatune.dequantize(model) first")
    return kind


def matrix_shape(module: nn.Module) -> torch.Size:
    """(d_out, d_in) of a layer's matrix view; a quantized layer's from its features (its weight is packed)."""
    kind = kind_of(module)
    if kind.quantized is not None:
        return torch.Size((module.out_features, module.in_features))
    return kind.to_matrix(module.weight).shape


SUPPORTED = ("nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, transformers Conv1D (and their subclasses), "
             "bitsandbytes Linear4bit / Linear8bitLt, "
             "nn.MultiheadAttention (its in_proj and out_proj)")


def target_kind(module: nn.Module) -> LayerKind | None:
    """kind_of, plus the layers that deltas adapt only through a substitute weight (MultiheadAttention).

    Kept apart from kind_of, whose callers (compression, merging) read `module.weight` directly.
    """
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        return MHA
    return kind_of(module)


def bypassed(parent: nn.Module, child: str) -> str | None:
    """Why `parent`'s forward reads the weights of its submodule `child` without calling it, or None.

    A delta or trainable copy there would change nothing in the forward (and merging would change
    weights the parent does use), so such modules are never wrapped.
    """
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj, so a delta "
                "there does nothing; target the MultiheadAttention itself (adapts its in_proj and out_proj) or "
                "train it whole (train_modules), or build attention from separate nn.Linear layers")
    return None


def has_fused_fast_path(module: nn.Module) -> bool:
    """Whether `module` may run a fused kernel that reads its submodules' weights and calls none of them
    (nn.TransformerEncoderLayer in eval mode); it runs the plain path when a submodule carries a hook."""
    return isinstance(module, nn.TransformerEncoderLayer)


def weight_of(module: nn.Module) -> Tensor | None:
    """The tensor that identifies a layer's base weights: its kind's weight, else its first parameter."""
    kind = target_kind(module)
    if kind is not None:
        return module.get_parameter(kind.weight)
    return next(module.parameters(), None)


def is_stock(module: nn.Module, kind: LayerKind | None) -> bool:
    """Whether `module` runs its kind's stock forward, which `kind.op` reproduces directly."""
    return kind is not None and (kind is CONV1D or type(module).forward.__qualname__ in kind.stock)


def apply_weight(module: nn.Module, kind: LayerKind, x: Tensor, weight: Tensor) -> Tensor:
    """The part of `module`'s forward that is linear in its weight, with `weight` in place of it.

    Stock forwards take the direct op. A subclass with its own forward (e.g. EfficientNet's
    same-padding convs) runs that forward with the substitute weight, so its extra logic is kept;
    the forward at weight 0 is subtracted, so terms that do not depend on the weight (a shift, a
    buffer) are not counted twice: the result is what merging the weight would add.
    """
    if is_stock(module, kind):
        return kind.op(module, x, weight)
    params = {"weight": weight}
    if getattr(module, "bias", None) is not None:
        params["bias"] = weight.new_zeros(kind.to_matrix(weight).shape[0])
    linear = functional_call(module, params, (x,))
    return linear - functional_call(module, {**params, "weight": torch.zeros_like(weight)}, (x,))


def mix_channels(kind: LayerKind, h: Tensor, B: Tensor) -> Tensor:
    """Apply a (d_out x k) matrix to the k feature channels of `h` (a 1x1 conv for conv layers)."""
    if kind.channel_dim == -1:
        return F.linear(h, B)
    n_spatial = h.dim() - 2
    op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n_spatial]
    return op(h, B.reshape(*B.shape, *([1] * n_spatial)))


def kaiming_uniform_(t: Tensor) -> Tensor:
    """nn.Linear's default init (kaiming uniform, a=sqrt(5)) on a (rows, fan_in) matrix."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def per_channel(kind: LayerKind, v: Tensor, out: Tensor) -> Tensor:
    """A (d_out,) vector shaped to broadcast over `out`'s feature channels."""
    shape = [1] * out.dim()
    shape[kind.channel_dim] = -1
    return v.view(shape)
