"""DeltaLayer wraps one existing module and routes its forward through the active deltas.

Written once for every method: enable/disable, several named adapters, exact merge/unmerge and
mixed-adapter batches. A method only supplies a `Delta` (its parameters and math).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .activation import Composer, ResidualSite, State, find_site, hidden_of, with_hidden
from .composition import Block, Stack
from .fused import LowRank, lowrank_linear, mixed_lowrank
from .kinds import LINEAR, LayerKind, apply_weight, is_stock, mix_channels, per_channel
from .quantized import RoundingError, rounding_error

BASE = "__base__"  # the adapter name that means "no adapter" in a mixed batch


class Delta(nn.Module):
    """One adapter's change to one layer.

    Weight deltas implement `delta_weight` (ΔW as a d_out x d_in matrix); the defaults then give
    an additive forward and merge. An additive method with an activation-space form that never
    materialises ΔW implements `change` (Δh); the engine's `forward` owns the rest, once: the input
    dropout, the casts to the delta's dtype and back, and the add (token masks and mixed batches
    are DeltaLayer's). Non-additive methods (DoRA, IA3, OFT) override `forward`, and `merge`/`unmerge`.
    """

    method: str = ""
    mergeable = True
    additive = True  # False: the delta rescales or replaces the whole layer, so it cannot be stacked
    composes = False  # True: not additive, yet stacks exactly on the deltas before it (IA3, OFT); has fold(layer, W)
    uses_base_output = True  # False: forward ignores `out` (replacement deltas), so the base is not run
    any_module = False  # True: targets may be any module (SSF on LayerNorm), not only weight layers
    needs_inputs = False  # True: forward also gets the layer call's other arguments (a delta that reruns the layer)
    serial = False  # True: the change is a function of the layer's output (a serial adapter), not of its input
    whole_batch = False  # True: mixed batches run it on the whole call and keep its rows (the call's other
    # arguments span the batch: an attention's mask, rotary tables and KV cache)

    def __init__(self, config: Any, layer: DeltaLayer, initialize: bool = True, shared: nn.Module | None = None):
        super().__init__()
        self.config = config
        p = getattr(config, "dropout", None)  # every method's input dropout, built here once
        self.dropout = nn.Dropout(p) if isinstance(p, float) and p > 0 else nn.Identity()
        # Adapter-wide tensors (VeRA's random bases, VB-LoRA's bank) live once in the DeltaModel; a plain
        # attribute, not a submodule, so they are neither saved nor counted once per layer.
        self.__dict__["shared"] = shared

    @classmethod
    def build_shared(cls, config: Any, layers: Sequence[DeltaLayer]) -> nn.Module | None:
        """Tensors shared by every layer of one adapter (given all its target layers), or None.

        Called once per adapter before its deltas are built; each delta then gets it as `shared`.
        Persistent parameters and buffers are saved once with the adapter ('__shared__.<name>');
        non-persistent buffers (bases regenerated from a seed) are not saved.
        """
        return None

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        """An extra training-loss term this delta asks for, already weighted (SORSA, qGOFT), or None."""
        return None

    def on_step(self, step: int) -> None:
        """Called before each training step's forward by DeltaModel.on_train_step (DyLoRA, LaMDA)."""

    @classmethod
    def after_update(cls, deltas: Sequence[Delta], shared: nn.Module | None, step: int,
                     total_steps: int | None) -> None:
        """Called once per trained adapter after the optimizer step of training step `step` (0-based), before the
        gradients are zeroed, with all the adapter's deltas in model order (AdaLoRA's budget, IncreLoRA's ranks).

        Gradients and the updated weights are both there (PEFT's update_and_allocate runs at this point);
        `total_steps` is the trainer's step count, for schedules. State it keeps must be buffers, so a
        checkpoint holds it and a resumed run continues exactly."""

    def mark_stale(self, param: Tensor, source: Tensor | None = None) -> None:
        """Say that `param`'s optimizer state no longer fits it (SpIEL moved entries, HFT resumes a parameter).

        `source` (flat, one entry per element): element i's state is old element source[i]'s, -1 = fresh;
        None = all of it fresh. The trainer applies it after on_step (training/optimizers.py `remap_state`)."""
        self.__dict__.setdefault("_stale", []).append((param, source))

    def take_stale(self) -> list[tuple[Tensor, Tensor | None]]:
        """The (parameter, source) pairs marked since the last call."""
        return self.__dict__.pop("_stale", [])

    def extra_repr(self) -> str:
        options = self.config.model_dump(exclude={"targets", "exclude"}, exclude_defaults=True)
        return ", ".join(f"{k}={v}" for k, v in options.items())

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no weight delta")

    @property
    def dropout_p(self) -> float:
        """The dropout rate this forward applies to the delta's input (0 in eval mode), for LowRank."""
        return self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    def low_rank(self) -> LowRank | None:
        """(A, B, scale, dropout_p) when this delta's forward is exactly out + scale · B A dropout(x).

        Returning them lets the engine run its fused paths on linear layers (engine/fused.py): one
        autograd node for the layer and all its low-rank terms, and mixed-adapter batches by batched
        matmuls. None (the default) keeps the method's own forward.
        """
        return None

    def bias_delta(self) -> Tensor | None:
        """A change to the layer's bias, merged with the weight delta (None: no change)."""
        return None

    def weight_deltas(self, layer: DeltaLayer) -> dict[str, Tensor]:
        """ΔW (and Δb) in the layout of the layer's own parameters, keyed by their names in it."""
        deltas = {layer.kind.weight: layer.kind.to_weight(self.delta_weight(layer), layer.weight)}
        if (b := self.bias_delta()) is not None:
            deltas[layer.kind.bias] = b
        return deltas

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor) -> Tensor:
        src = out if self.serial else x
        return out + self.change(layer, self.dropped(src)).to(out.dtype)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        """Δh, the additive change in the layer's output space, from the delta's input `x` (the layer's input,
        or its output when `serial`) after the engine's dropout, in the delta's dtype (`dropped`)."""
        y = layer.apply_matrix(x, self.delta_weight(layer))
        if (b := self.bias_delta()) is not None:
            y = y + layer.per_channel(b, y)
        return y

    def dropped(self, x: Tensor) -> Tensor:
        """x after the engine's dropout, cast to the delta's own dtype (fp32 adapters on a half-precision base):
        that of its first float parameter, else of its shared tensors. Integer inputs (an embedding's ids) pass."""
        return self.dropout(x).to(self._float_dtype() or x.dtype) if x.is_floating_point() else x

    def _float_dtype(self) -> torch.dtype | None:
        for t in self._parameters.values():  # the common case, a dict lookup (this runs on every forward)
            if t is not None and t.is_floating_point():
                return t.dtype
        shared = () if self.shared is None else (self.shared.parameters(), self.shared.buffers())
        tensors = itertools.chain(self.parameters(), self.buffers(), *shared)
        return next((t.dtype for t in tensors if t.is_floating_point()), None)

    def merge(self, layer: DeltaLayer) -> Any:
        """Fold this delta into the base weight; return what `unmerge` needs to undo it exactly."""
        self._add_to_base(layer, sign=1.0)

    def unmerge(self, layer: DeltaLayer, undo: Any) -> None:
        self._add_to_base(layer, sign=-1.0)

    def _add_to_base(self, layer: DeltaLayer, sign: float) -> None:
        w = layer.weight
        w += sign * layer.kind.to_weight(self.delta_weight(layer).to(w.dtype), w)
        if (b := self.bias_delta()) is not None:
            bias = layer.bias_parameter
            bias += sign * b.to(bias.dtype)


class Parts(Delta):
    """One adapter on a layer whose forward reads several weights itself (MultiheadAttention: in_proj and
    out_proj): the method's delta on the layer, plus one on each such submodule (PEFT adapts both too).

    Each submodule's delta sees it through a DeltaLayer of its own that is not in the model (`views`),
    so the method needs nothing special; the layer runs its forward with every W0 + ΔW substituted.
    """

    def __init__(self, main: Delta, parts: dict[str, tuple[DeltaLayer, Delta]]):
        nn.Module.__init__(self)
        self.main = main
        self.parts = nn.ModuleDict({child: delta for child, (_, delta) in parts.items()})
        self.__dict__["views"] = {child: view for child, (view, _) in parts.items()}  # not submodules: not saved
        self.__dict__["shared"] = main.shared
        self.config, self.method = main.config, main.method
        self.mergeable = main.mergeable

    def members(self, layer: DeltaLayer | None) -> Iterator[tuple[str, DeltaLayer, Delta]]:
        """(parameter-name prefix, the layer it adapts, delta) of every part."""
        yield "", layer, self.main
        for child, delta in self.parts.items():
            yield f"{child}.", self.views[child], delta

    def weight_deltas(self, layer: DeltaLayer) -> dict[str, Tensor]:
        return {prefix + k: dw for prefix, view, d in self.members(layer) for k, dw in d.weight_deltas(view).items()}

    def merge(self, layer: DeltaLayer) -> Any:
        return [d.merge(view) for _, view, d in self.members(layer)]

    def unmerge(self, layer: DeltaLayer, undo: Any) -> None:
        for (_, view, d), u in reversed(list(zip(self.members(layer), undo))):
            d.unmerge(view, u)

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        terms = [t for _, view, d in self.members(layer) if (t := d.regularizer(view)) is not None]
        return sum(terms) if terms else None

    def on_step(self, step: int) -> None:
        for _, _, d in self.members(None):
            d.on_step(step)

    def extra_repr(self) -> str:
        return self.main.extra_repr()


class QuantizedUndo(NamedTuple):
    """The undo state of a merge into a quantized layer: the method's own, and the packed weight it replaced."""

    method: Any
    packed: Any


class Routing:
    """Which adapter each row of a mixed batch uses, grouped once per forward."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.groups: dict[str, Tensor] = {}
        for i, name in enumerate(self.names):
            self.groups.setdefault(name, []).append(i)
        self.groups = {k: torch.tensor(v) for k, v in self.groups.items()}
        self._on: dict[tuple[str, torch.device], Tensor] = {}

    def rows(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._on:
            self._on[key] = self.groups[name].to(device)
        return self._on[key]

    def index(self, names: Sequence[str], device: torch.device) -> Tensor:
        """Per row, the position of its adapter in `names`, or len(names) for rows of any other."""
        key = (tuple(names), device)
        if key not in self._on:
            slot = {n: i for i, n in enumerate(names)}
            self._on[key] = torch.tensor([slot.get(n, len(names)) for n in self.names], device=device)
        return self._on[key]


def _put_rows(full: Any, part: Any, rows: Tensor) -> Any:
    """`full` with its batch rows `rows` replaced by `part`: the batch dim is the one where their sizes differ."""
    if not isinstance(full, Tensor):
        return full
    dims = [d for d in range(full.dim()) if full.shape[d] != part.shape[d]]
    if not dims:  # the group holds every row of the batch
        return part.to(full.dtype)
    if len(dims) > 1:
        raise ValueError(f"cannot tell the batch dim of a layer output {tuple(full.shape)} from its rows' "
                         f"{tuple(part.shape)}")
    return full.index_copy(dims[0], rows, part.to(full.dtype))


class DeltaLayer(nn.Module):
    """An existing module (kept as `base_layer`, never rebuilt) plus named deltas."""

    def __init__(self, base_layer: nn.Module, kind: LayerKind | None):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.path = ""  # where the model holds it, set by DeltaModel (name-based options, e.g. IA3's feedforward)
        self.deltas = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.enabled = True
        self.route: Routing | None = None  # set by DeltaModel for one mixed-adapter forward
        self.token_mask: Tensor | None = None  # set by DeltaModel: deltas apply only where it is set
        self._merged: dict[str, Any] = {}  # adapter name -> undo state, in merge order
        self.setup: Block | None = None  # set by DeltaModel when the active setup is more than a plain stack
        self.site: ResidualSite | None = None  # where activation deltas act inside a residual sublayer
        self._site_hooks: list[Any] = []
        self.activations = False  # holds activation deltas: forwards go through the Composer (install/remove_site)
        self._call: dict[str, Any] | None = None  # one residual-site forward in flight: setup, route, r, branch
        self._first_arg = next(iter(inspect.signature(base_layer.forward).parameters), None)
        self._float_weight: Tensor | None = None  # a quantized W0 dequantised while a merge rewrites it
        self.rounding: dict[str, RoundingError] = {}  # adapter -> what requantising its merge lost (quantized bases)

    # --- views the methods use -------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base weight. A quantized layer's W0 is dequantised on each read (a fresh float tensor, so methods
        read it only to build or merge a delta); during a merge, the float copy the merge rewrites."""
        if self.kind is None:
            return self.base_layer.weight
        if self.kind.quantized is not None:
            return self._float_weight if self._float_weight is not None else self.kind.quantized.dequantize(
                self.base_layer)
        return self.base_layer.get_parameter(self.kind.weight)

    @property
    def quantized(self) -> bool:
        return self.kind is not None and self.kind.quantized is not None

    @property
    def takes_substitute_weight(self) -> bool:
        """Whether the layer's own forward can run with a float W0 + ΔW in place of its weight (functional_call);
        a quantized layer's kernel reads its packed bytes."""
        return not self.quantized

    @property
    def bias_parameter(self) -> Tensor | None:
        return getattr(self.base_layer, self.kind.bias if self.kind else "bias", None)

    def matrix(self) -> Tensor:
        """The base weight as a d_out x d_in matrix (a view)."""
        return self.kind.to_matrix(self.weight)

    @property
    def stock(self) -> bool:
        """True when the wrapped layer's forward is the stock one for its kind (then out = W x + b)."""
        return is_stock(self.base_layer, self.kind)

    def apply_matrix(self, x: Tensor, m: Tensor) -> Tensor:
        """(k x d_in matrix) applied to x through the layer's own op, giving k output channels."""
        like = self.base_layer.get_parameter(self.kind.weight)  # only its layout: a quantized W0 is not dequantised
        return apply_weight(self.base_layer, self.kind, x, self.kind.to_weight(m, like))

    def mix(self, h: Tensor, B: Tensor) -> Tensor:
        return mix_channels(self.kind, h, B)

    def per_channel(self, v: Tensor, out: Tensor) -> Tensor:
        """A (d_out,) vector shaped to broadcast over the output channels of `out`."""
        return per_channel(self.kind, v, out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # in_features, bias, padding... as the wrapped layer has them

    # --- forward ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if not args:  # called by keyword (HF decoder layers pass hidden_states=...): the first one is the input
            args = (kwargs.pop(self._first_arg),) if self._first_arg in kwargs else (None,)
        x, args = args[0], args[1:]
        route = self.route  # a plain attribute, not a context variable: torch.compile traces it
        if not self.enabled:
            self._require_unmerged("run with adapters disabled")
            return self.base_layer(x, *args, **kwargs)
        if isinstance(x, Tensor) and x.is_nested:
            raise ValueError(f"'{self.path}' got a nested tensor (nn.TransformerEncoder's eval fast path with a "
                             "src_key_padding_mask makes them); build the encoder with enable_nested_tensor=False")
        if self.kind is not None and self.kind.op is None:
            return self._forward_reweighted(x, route, *args, **kwargs)
        if self.setup is not None or self.activations:
            return self._forward_composed(x, route, *args, **kwargs)
        if route is not None:
            return self._forward_mixed(x, route, *args, **kwargs)
        pending = [self.deltas[n] for n in self.active if n not in self._merged]
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        if len(pending) > 1 and not all(d.additive or d.composes for d in pending):
            raise RuntimeError(f"cannot stack unmerged adapters {[d.method for d in pending]} on one "
                               f"'{type(self.base_layer).__name__}': a non-additive delta (DoRA, full) rescales or "
                               "replaces the whole layer; merge the others first or activate it alone")
        mask = self.token_mask
        if mask is None and not args and not kwargs and self.kind is LINEAR and self.stock:
            terms = [d.low_rank() if d.additive else None for d in pending]
            if all(t is not None and t.fuses_with(x) for t in terms):
                return lowrank_linear(x, self.base_layer.weight, self.base_layer.bias, terms)
        base = self.base_layer(x, *args, **kwargs) if pending[0].uses_base_output or mask is not None else None
        out = base
        for delta in pending:
            out = delta(self, x, out, *args, **kwargs) if delta.needs_inputs else delta(self, x, out)
        return out if mask is None else self._masked(base, out, mask)

    # --- activation deltas and composition blocks (engine/activation.py) ----------------------
    def activation_site(self, spec: Any) -> ResidualSite | None:
        """The residual site an activation delta with ActivationConfig.site `spec` uses here (no side effects)."""
        site = find_site(self.base_layer, spec)
        taken = [n for n, d in self.deltas.items() if getattr(d, "activation", False)]
        if taken and site != self.site:
            raise ValueError(f"'{self.path}' already holds activation adapters {taken} at site {self.site}; "
                             f"site={spec!r} would put this one at {site}: give it the same site option")
        return site

    def install_site(self, site: ResidualSite | None) -> None:
        """Mark this layer as holding activation deltas, and hook its residual site's branch and norm (once); the
        hooks act only inside this layer's forward."""
        self.activations = True
        if self._site_hooks or site is None:  # hooked by an earlier adapter (activation_site checked they agree)
            return
        self.site = site
        self._site_hooks = [
            self.base_layer.get_submodule(site.branch).register_forward_hook(self._branch_hook),
            self.base_layer.get_submodule(site.norm).register_forward_hook(self._norm_hook)]

    def remove_site(self) -> None:
        """Undo install_site: the last activation delta left this layer."""
        for handle in self._site_hooks:
            handle.remove()
        self._site_hooks, self.site, self.activations = [], None, False

    def _branch_hook(self, module: nn.Module, args: Any, out: Tensor) -> None:
        if self._call is not None:
            self._call["branch"] = out

    def _norm_hook(self, module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        call = self._call
        if call is None or call.get("branch") is None:
            return None
        norm = module.forward  # the norm's own forward: calling the module would run this hook again
        state = State(h=call["branch"], x=call["branch"], r=call["r"])
        return self._composed(Composer(self, self.site, norm), call["setup"], call["route"], state, out)

    def _forward_composed(self, x: Any, route: Routing | None, *args: Any, **kwargs: Any) -> Any:
        """The module's forward with its active setup applied (activation deltas, composition blocks)."""
        if route is not None or self.setup is not None:  # rows or blocks cannot share a merged weight
            self._require_unmerged("run a composition block or a mixed batch")
        setup = self.setup if self.setup is not None else Stack(*self.active) if self.active else None
        if setup is None and route is None:
            return self.base_layer(x, *args, **kwargs)
        if self.site is not None:
            self._call = {"setup": setup, "route": route, "r": self.site.residual_of(args, kwargs), "branch": None}
            try:
                return self.base_layer(x, *args, **kwargs)
            finally:
                self._call = None
        out = self.base_layer(x, *args, **kwargs)
        h = hidden_of(out)
        state = State(h=h, x=x if isinstance(x, Tensor) and x.is_floating_point() else None)
        return with_hidden(out, self._composed(Composer(self, None, None), setup, route, state, h))

    def _composed(self, composer: Composer, setup: Block | None, route: Routing | None, state: State,
                  plain: Tensor) -> Tensor:
        """The setup (or each row's adapter) applied to `state`; `plain` is the module's own output, kept where
        the token mask is unset and for rows routed to no adapter here."""
        if route is None:
            h = composer.post(composer.run(setup, state))
        else:
            if state.h.shape[0] != len(route.names):
                raise ValueError(f"adapter_names has {len(route.names)} entries but the batch has "
                                 f"{state.h.shape[0]} rows")
            h = plain
            for name in route.groups:
                if name == BASE or name not in self.deltas:
                    continue
                rows = route.rows(name, state.h.device)
                part = state.take(rows)
                h = h.index_copy(0, rows, composer.post(composer.run(Stack(name), part)).to(h.dtype))
        if self.token_mask is not None:
            h = self._masked(plain, h, self.token_mask)
        return h

    def _forward_reweighted(self, x: Tensor, route: Routing | None, *args: Any, **kwargs: Any) -> Any:
        """A layer whose forward reads its weight itself (MultiheadAttention): run it with W0 + ΔW.

        Only additive weight deltas (ΔW) qualify, or one replacement delta (a trainable copy) alone.
        """
        pending = [self.deltas[n] for n in self.active if n not in self._merged]
        name = type(self.base_layer).__name__
        if route is not None and any(n in self.deltas for n in route.groups):
            raise ValueError(f"mixed-adapter batches cannot route rows through '{name}' ({self.path}): its forward "
                             "takes one weight for the whole batch; run each adapter's rows as their own batch")
        if route is not None or not pending:
            return self.base_layer(x, *args, **kwargs)
        if self.token_mask is not None:
            raise ValueError(f"token_mask cannot reach '{name}' ({self.path}): its weight mixes every token; "
                             "exclude it from the targets")
        if len(pending) == 1 and not pending[0].additive:
            return pending[0](self, x, None, *args, **kwargs)
        if not all(d.additive for d in pending):
            raise RuntimeError(f"cannot stack unmerged adapters {[d.method for d in pending]} on '{name}'; "
                               "merge the others first or activate it alone")
        params: dict[str, Tensor] = {}
        for d in pending:
            for k, dw in d.weight_deltas(self).items():
                w = params.get(k, self.base_layer.get_parameter(k))
                params[k] = w + dw.to(w.dtype)
        return functional_call(self.base_layer, params, (x, *args), kwargs)

    def _masked(self, base: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        """The adapted output where `mask` (batch, tokens) is set, the base output elsewhere."""
        if not isinstance(out, Tensor):
            raise ValueError(f"token_mask needs a layer with one output tensor; '{type(self.base_layer).__name__}' "
                             f"returns {type(out).__name__}: exclude it from the targets")
        if self.kind is not None and self.kind.channel_dim != -1:
            raise ValueError(f"token_mask needs token-major outputs (linear, embedding); "
                             f"'{type(self.base_layer).__name__}' puts channels in dim {self.kind.channel_dim}")
        if tuple(mask.shape) != tuple(out.shape[:-1]):
            raise ValueError(f"token_mask has shape {tuple(mask.shape)} but this layer's output has tokens "
                             f"{tuple(out.shape[:-1])}; pass a (batch, sequence) mask")
        return torch.where(mask.unsqueeze(-1).bool(), out, base)

    def _forward_mixed(self, x: Tensor, route: Routing, *args: Any, **kwargs: Any) -> Tensor:
        self._require_unmerged("route a mixed-adapter batch")
        if x.shape[0] != len(route.names):
            hint = "" if getattr(self.base_layer, "batch_first", True) else (
                f"; '{type(self.base_layer).__name__}' ({self.path}) takes (sequence, batch, ...): build it with "
                "batch_first=True for mixed batches")
            raise ValueError(f"adapter_names has {len(route.names)} entries but the batch has {x.shape[0]} rows{hint}")
        out = self.base_layer(x, *args, **kwargs)
        mask = self.token_mask
        names = [n for n in route.groups if n != BASE and n in self.deltas]  # other rows see the base layer
        if not names:
            return out
        if any(self.deltas[n].whole_batch for n in names):
            return self._mixed_whole_batch(x, route, names, out, *args, **kwargs)
        if not isinstance(out, Tensor):  # several outputs (a GRU's)
            return self._mixed_outputs(x, route, names, out, *args, **kwargs)
        if mask is None and self.kind is LINEAR and self.stock:  # a custom forward is not x Aᵀ
            terms = [self.deltas[n].low_rank() if self.deltas[n].additive else None for n in names]
            if all(t is not None and t.dropout == 0 and t.fuses_with(x) for t in terms):
                return mixed_lowrank(x, out, route.index(names, x.device), terms)
        # Rows are written in place, each group's cost in its own rows, where nothing saved `out` for
        # backward: a stock layer's output (not a bitsandbytes kernel's, a custom Function's view), or any output
        # when no gradient is recorded.
        in_place = (self.stock and not self.quantized) or not torch.is_grad_enabled()
        for name in names:
            rows = route.rows(name, x.device)
            delta = self.deltas[name]
            y = delta(self, x[rows], out[rows], *args, **kwargs) if delta.needs_inputs else delta(self, x[rows], out[rows])
            y = y.to(out.dtype)
            if mask is not None:
                y = self._masked(out[rows], y, mask[rows])
            out = out.index_copy_(0, rows, y) if in_place else out.index_copy(0, rows, y)
        return out

    def _mixed_outputs(self, x: Tensor, route: Routing, names: list[str], out: Any, *args: Any, **kwargs: Any
                       ) -> Any:
        """A mixed batch through a layer with several outputs (a GRU's (output, h_n)): each adapter's rows
        run by themselves, and every output tensor takes them along its batch dim, wherever that is."""
        if self.token_mask is not None:
            self._masked(out, out, self.token_mask)  # raises: the mask has no single output to apply to
        for name in names:
            delta, rows = self.deltas[name], route.rows(name, x.device)
            base = self.base_layer(x[rows], *args, **kwargs) if delta.uses_base_output else None
            y = delta(self, x[rows], base, *args, **kwargs) if delta.needs_inputs else delta(self, x[rows], base)
            out = pytree.tree_map(lambda full, part, rows=rows: _put_rows(full, part, rows), out, y)
        return out

    def _mixed_whole_batch(self, x: Tensor, route: Routing, names: list[str], out: Any, *args: Any, **kwargs: Any
                           ) -> Any:
        """A mixed batch through deltas that need the whole call (whole_batch): each adapter's delta runs on every
        row with the base output, and its own rows (dim 0 of each output tensor) are kept."""
        if self.token_mask is not None:
            self._masked(out, out, self.token_mask)  # raises unless the layer has one output tensor
        result = out
        for name in names:
            delta, rows = self.deltas[name], route.rows(name, x.device)
            y = delta(self, x, out, *args, **kwargs) if delta.needs_inputs else delta(self, x, out)
            if self.token_mask is not None:
                y = self._masked(out, y, self.token_mask)
            result = pytree.tree_map(lambda full, new, rows=rows: full.index_copy(0, rows, new[rows].to(full.dtype))
                                     if isinstance(full, Tensor) and full.shape[:1] == x.shape[:1] else full,
                                     result, y)
        return result

    # --- merge -----------------------------------------------------------------------------
    def _require_unmerged(self, what: str) -> None:
        if self._merged:
            raise RuntimeError(f"cannot {what} while adapters {list(self._merged)} are merged into "
                               f"'{type(self.base_layer).__name__}'; call unmerge() first")

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool = False) -> None:
        """Fold adapter `name` into the base; safe_merge: first on a copy, see check_merge."""
        if name in self._merged:
            return
        delta = self.deltas[name]
        if not delta.mergeable:
            raise ValueError(f"adapter '{name}' ({delta.method}) changes activations and cannot be merged into "
                             "weights; keep it unmerged, or merge only the weight adapters: dm.merge([...names])")
        if safe_merge:
            self.check_merge([name])
        self._merged[name] = self._merge_quantized(name, delta) if self.quantized else delta.merge(self)

    @contextlib.contextmanager
    def _dequantized(self) -> Iterator[Tensor]:
        """Within the block `weight` (and `matrix()`) is one float copy of the quantized W0 that merges rewrite."""
        self._float_weight = self.kind.quantized.dequantize(self.base_layer)
        try:
            yield self._float_weight
        finally:
            self._float_weight = None

    def _merge_quantized(self, name: str, delta: Delta) -> QuantizedUndo:
        """Dequantise W0, merge as on a float layer, requantise; keep the packed weight it replaces for unmerge."""
        ops = self.kind.quantized
        packed = ops.snapshot(self.base_layer)
        with self._dequantized() as W:
            before = W.clone()
            undo = delta.merge(self)
            ops.requantize(self.base_layer, W)
            self.rounding[name] = rounding_error(W, ops.dequantize(self.base_layer), before)
        return QuantizedUndo(undo, packed)

    def _unmerge_one(self, name: str) -> None:
        undo = self._merged.pop(name)
        if not isinstance(undo, QuantizedUndo):
            self.deltas[name].unmerge(self, undo)
            return
        with self._dequantized():  # the method undoes what it changed besides W0 (a bias); its W0 is dropped
            self.deltas[name].unmerge(self, undo.method)
        self.kind.quantized.restore(self.base_layer, undo.packed)  # the exact bytes from before the merge
        self.rounding.pop(name, None)

    @torch.no_grad()
    def check_merge(self, names: Sequence[str]) -> None:
        """Merge `names` in order into a copy of this layer; raise, changing nothing, if that puts NaN or inf
        into a base parameter that had none (whatever the method's merge rule)."""
        trial = copy.deepcopy(self)
        finite = {k: bool(torch.isfinite(p).all()) for k, p in self._float_parameters()}
        for name in names:
            trial.merge(name)
            for k, p in trial._float_parameters():
                if finite[k] and not torch.isfinite(p).all():
                    raise ValueError(f"merging adapter '{name}' ({trial.deltas[name].method}) into '{self.path}' "
                                     f"would put NaN/inf into its {k}; nothing was merged: check that adapter's "
                                     "weights (or merge without safe_merge to do it anyway)")

    def _float_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """The base layer's parameters, a quantized weight dequantised (its packed bytes cannot hold NaN)."""
        for k, p in self.base_layer.named_parameters():
            yield k, (self.weight if self.quantized and k == self.kind.weight else p)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        """Undo merges newest first, so that non-commuting merges (DoRA) come back exactly."""
        order = list(self._merged)
        if name is not None and name not in order:
            return
        redo = [] if name is None else order[order.index(name) + 1:]
        for n in reversed(order if name is None else order[order.index(name):]):
            self._unmerge_one(n)
        for n in redo:
            self.merge(n)

    @property
    def merged(self) -> tuple[str, ...]:
        return tuple(self._merged)

    def extra_repr(self) -> str:
        return f"kind={self.kind.name if self.kind else 'module'}, active={list(self.active)}, merged={self.merged}"
