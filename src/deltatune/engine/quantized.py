"""Quantized base layers: bitsandbytes NF4/FP4 (`Linear4bit`) and LLM.int8 (`Linear8bitLt`).

Both subclass nn.Linear, but their `weight` holds packed bytes (uint8 / int8) plus quantization statistics,
so they are a layer kind of their own (kinds.QLINEAR4, kinds.QLINEAR8): the layer's own forward computes
W0 x with bitsandbytes' kernels, deltas add their part, and whatever reads W0 (DoRA's norm, OFT's weight
form, SVD inits, merging) reads it through `QuantOps.dequantize`, one layer at a time, in the layer's compute
dtype. The model is never dequantised whole.

Merging into such a layer dequantises it, lets the method merge as on a float layer, and requantises; the
packed parameter it replaced is kept as the undo state, so unmerge restores the original bytes exactly.

`quantize(model, "nf4" | "fp4" | "int8")` swaps a loaded model's stock nn.Linear layers for bitsandbytes
ones, in place, one layer at a time, as transformers' `BitsAndBytesConfig` loading does.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SCHEMES = ("nf4", "fp4", "int8")
BLOCK_4BIT = 64  # NF4/FP4 block size (transformers' and bitsandbytes' default)


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("quantized bases need bitsandbytes: pip install 'bitsandbytes>=0.50' (wheels for "
                          "Linux x86-64 / aarch64, Windows x86-64, macOS arm64)") from None
    return bitsandbytes


def bnb_class(module: nn.Module) -> str | None:
    """'Linear4bit' or 'Linear8bitLt' when `module` is (a subclass of) that bitsandbytes layer, else None.

    Read from the class hierarchy, so a model without quantized layers never imports bitsandbytes.
    """
    for c in type(module).__mro__:
        if c.__module__.startswith("bitsandbytes") and c.__name__ in ("Linear4bit", "Linear8bitLt"):
            return c.__name__
    return None


def dequantized_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype W0 is dequantised to: the layer's compute dtype, else its bias's, else the dtype the
    4-bit weight had when quantized, else float32."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None and getattr(module, "bias", None) is not None:
        dtype = module.bias.dtype
    if dtype is None:
        dtype = getattr(getattr(module.weight, "quant_state", None), "dtype", None) or torch.float32
    return dtype


# --- 4-bit (NF4 / FP4) ----------------------------------------------------------------------------------
def pin_4bit_format(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer in its packed format. On AVX512-BF16 CPUs its first eval-mode forward
    otherwise repacks it in place with bf16 block scales: lossy, and only on those CPUs, so the bytes merges
    requantise and unmerges restore would depend on the machine."""
    module.support_avx512bf16_for_cpu = False


def _quant_state(module: nn.Module) -> Any:
    state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(module).__name__} holds no quantized weight yet (bitsandbytes quantizes when the "
                         "layer moves to a device): call .to('cpu') or .to('cuda') on it first")
    return state


def _dequantize_4bit(module: nn.Module) -> Tensor:
    F = _bnb().functional
    data, state = module.weight.data, _quant_state(module)
    if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512-BF16 inference: undo on copies
        data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    # As one flat row: bitsandbytes 0.50's AVX512 CPU kernel misplaces blocks that span rows (in_features not a
    # multiple of the block size); the flat call is exact on every CPU and the blocks are the same.
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return F.dequantize_4bit(data, flat).reshape(state.shape).to(dequantized_dtype(module))


def _requantize_4bit(module: nn.Module, W: Tensor) -> None:
    bnb, old = _bnb(), module.weight
    state = _quant_state(module)
    param = bnb.nn.Params4bit(W.to(state.dtype), requires_grad=False, blocksize=state.blocksize,
                              compress_statistics=state.nested, quant_type=state.quant_type,
                              quant_storage=getattr(old, "quant_storage", torch.uint8), module=module)
    module.weight = param._quantize(W.device)


def _snapshot_4bit(module: nn.Module) -> dict[str, Any]:
    return {"weight": module.weight, "quant_state": getattr(module, "quant_state", None)}


def _restore_4bit(module: nn.Module, saved: dict[str, Any]) -> None:
    module.weight = saved["weight"]
    module.quant_state = saved["quant_state"]


# --- 8-bit (LLM.int8) -----------------------------------------------------------------------------------
def _int8_scales(module: nn.Module) -> Tensor:
    # before the first forward the row scales sit on the weight; forward moves them into module.state
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    if scb is None:
        raise ValueError(f"{type(module).__name__} holds no int8 weight yet (bitsandbytes quantizes when the layer "
                         "moves to a device): call .to('cpu') or .to('cuda') on it first")
    return scb


def _dequantize_int8(module: nn.Module) -> Tensor:
    W = module.weight.data.float() * (_int8_scales(module).float()[:, None] / 127)  # (d_out, d_in)
    return W.to(dequantized_dtype(module))


def _requantize_int8(module: nn.Module, W: Tensor) -> None:
    bnb = _bnb()
    param = bnb.nn.Int8Params(W.contiguous(), requires_grad=False, has_fp16_weights=False)
    module.weight = param._quantize(W.device)
    module.state.CB = module.state.SCB = None  # forward takes the new ones from the weight


def _snapshot_int8(module: nn.Module) -> dict[str, Any]:
    return {"weight": module.weight, "CB": module.state.CB, "SCB": module.state.SCB}


def _restore_int8(module: nn.Module, saved: dict[str, Any]) -> None:
    module.weight = saved["weight"]
    module.state.CB, module.state.SCB = saved["CB"], saved["SCB"]


@dataclass(frozen=True)
class QuantOps:
    """How the engine reads and rewrites one quantized layer kind's W0."""

    scheme: str  # for messages: 'nf4/fp4' or 'int8'
    dequantize: Callable[[nn.Module], Tensor]  # (d_out, d_in) in the layer's compute dtype, a fresh tensor
    requantize: Callable[[nn.Module, Tensor], None]  # replaces the layer's packed weight by W quantized
    snapshot: Callable[[nn.Module], Any]  # the packed weight and its statistics, to put back exactly
    restore: Callable[[nn.Module, Any], None]


FOUR_BIT = QuantOps("nf4/fp4", _dequantize_4bit, _requantize_4bit, _snapshot_4bit, _restore_4bit)
INT8 = QuantOps("int8", _dequantize_int8, _requantize_int8, _snapshot_int8, _restore_int8)
OPS = {"Linear4bit": FOUR_BIT, "Linear8bitLt": INT8}


@dataclass(frozen=True)
class RoundingError:
    """What requantising a merged weight lost: max |Q(W) - W| over the merged float W, that relative to max |W|,
    and ||Q(W) - W|| relative to ||ΔW|| (the merged change: near 1 or above, the merge kept little of it)."""

    max_abs: float
    relative: float
    of_delta: float


def rounding_error(merged: Tensor, requantized: Tensor, before: Tensor) -> RoundingError:
    err = (requantized.float() - merged.float())
    top = merged.abs().max().item() or 1.0
    change = torch.linalg.vector_norm(merged.float() - before.float()).item()
    of_delta = torch.linalg.vector_norm(err).item() / change if change else 0.0
    return RoundingError(err.abs().max().item(), err.abs().max().item() / top, of_delta)


def logical_numel(p: Tensor) -> int:
    """How many weights a parameter holds: a packed 4-bit weight stores two in each byte (or more per wider
    storage element), so its numel undercounts them; its quant_state knows the original shape."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()


# --- swapping a loaded model's layers ---------------------------------------------------------------------
def _matches(path: str, names: Sequence[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _quantized_linear(linear: nn.Linear, scheme: str, dtype: torch.dtype | None, double_quant: bool,
                      threshold: float) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized (and its bias as it is), on its device."""
    bnb, W = _bnb(), linear.weight.detach()
    has_bias = linear.bias is not None
    with torch.device("meta"):  # no second full-precision weight: the layer's tensors are set below
        if scheme == "int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                    threshold=threshold)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=dtype,
                                  compress_statistics=double_quant, quant_type=scheme)
            pin_4bit_format(q)
    if scheme == "int8":
        q.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)._quantize(W.device)
        if dtype is not None:
            q.compute_dtype = dtype  # read by dequantized_dtype(): what W0 dequantises to
    else:
        q.weight = bnb.nn.Params4bit(W, requires_grad=False, blocksize=BLOCK_4BIT, compress_statistics=double_quant,
                                     quant_type=scheme, module=q)._quantize(W.device)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().to(dtype or linear.bias.dtype), requires_grad=False)
    q.train(linear.training)
    return q


def quantize(model: nn.Module, scheme: str = "nf4", compute_dtype: torch.dtype | None = None,
             skip: Sequence[str] = ("lm_head",), double_quant: bool = False, threshold: float = 6.0) -> nn.Module:
    """Replace `model`'s stock nn.Linear layers by bitsandbytes ones, in place, one layer at a time.

    Args:
        scheme: 'nf4' or 'fp4' (bnb.nn.Linear4bit, blocks of 64) or 'int8' (bnb.nn.Linear8bitLt, LLM.int8).
        compute_dtype: the dtype the 4-bit kernels compute in (transformers' bnb_4bit_compute_dtype; None:
            the input's); also the dtype the engine dequantises W0 to for methods that read it.
        skip: layer names (a dotted path or its suffix) left in full precision; lm_head by default, as
            transformers does.
        double_quant: quantize the 4-bit block scales too (bnb_4bit_use_double_quant).
        threshold: LLM.int8's outlier threshold (llm_int8_threshold; 0 turns the outlier split off).

    The same options through transformers: `from_pretrained(path, quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4"))` gives the same layers. Peak memory above the model is one
    layer's packed copy: each float weight is freed once its layer is swapped (unless something else holds it).
    Returns the model.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if any(type(m).__name__ == "DeltaLayer" for m in model.modules()):
        raise ValueError("quantize the model before injecting adapters: it already carries deltas")
    _bnb()
    swaps, unaligned = [], []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or bnb_class(module) or _matches(path, skip):
            continue
        if type(module).forward is not nn.Linear.forward:
            raise ValueError(f"'{path}' is a {type(module).__name__} with its own forward, which a bitsandbytes "
                             f"layer would drop: pass skip=[{path!r}, ...] to keep it in full precision")
        if scheme in ("nf4", "fp4") and module.in_features % BLOCK_4BIT and module.weight.device.type == "cpu":
            unaligned.append(path)
            continue
        if module.weight.device.type == "meta":
            raise ValueError(f"'{path}' has no weights yet (meta device): load the model's weights first")
        swaps.append(path)
    if unaligned:
        # bitsandbytes 0.50's AVX512 CPU kernel dequantises such layers wrongly (blocks spanning rows are misplaced),
        # so its own forward would be wrong on those CPUs: kept in float on every CPU, for the same model everywhere
        warnings.warn(f"kept {len(unaligned)} layer(s) in full precision: their in_features is not a multiple of "
                      f"{BLOCK_4BIT}, which bitsandbytes' CPU 4-bit kernels mishandle on AVX512 machines: "
                      f"{', '.join(unaligned[:5])}{' ...' if len(unaligned) > 5 else ''}", stacklevel=2)
    for path in swaps:  # one layer at a time: its packed copy is made, then its float weight released
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _quantized_linear(getattr(owner, child), scheme, compute_dtype, double_quant,
                                                threshold))
    return model


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear holding a quantized layer's W0 dequantised (in `dtype`, default its compute dtype)."""
    ops = OPS[bnb_class(module)]
    W = ops.dequantize(module)
    dtype = dtype or W.dtype
    out, d_in = W.shape
    with torch.device("meta"):
        linear = nn.Linear(d_in, out, bias=module.bias is not None)
    linear.weight = nn.Parameter(W.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    linear.train(module.training)
    return linear


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer of `model` by a plain nn.Linear (dequantised W0), in place."""
    for path, module in list(model.named_modules()):
        if bnb_class(module) is None:
            continue
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, dequantized_linear(module, dtype))
    return model

