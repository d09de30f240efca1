"""Activation deltas: a change to a module's output activations (bottleneck adapters), written once.

A method supplies only f, its change from the adapter's input (`ActivationDelta.change`); the engine
decides where f reads and where its result goes (the *site*), applies the engine's dropout to f's
output, composes several adapters (engine/composition.py) and runs mixed-adapter batches.

Sites, in the unified view of PEFT (He et al., arXiv 2110.04366), h being the module's output:
- serial, on any module:   h <- h + f(h)
- parallel, on any module: h <- h + f(x), x the module's input (same width as h)
- a residual sublayer, whose forward ends in N(h + r) (BERT's SelfOutput/Output: h = dropout(dense(x)),
  r = input_tensor, N = LayerNorm): the adapter runs between h and N with AdapterHub's options
  (`original_ln_before/after`, `residual_before_ln`), so Houlsby and Pfeiffer adapters are exact there.
  The engine reads h with a forward hook on the branch submodule and replaces N's output with a hook on N.

Modules that return tuples or ModelOutputs (decoder layers) are changed in their hidden-state element
(the first); the rest passes through, so `generate()` and the KV cache work unchanged.

AdapterDrop (Rücklé et al., arXiv:2010.11918) is written here once for every activation method: an adapter
is looked up as absent in the blocks it drops (`skip_layers`, and in training the lowest n blocks, n drawn
per step), so those blocks run as the base model does. The block is the first integer in the module's path
(encoder.layer.3.output -> 3), AdapterHub's layer_idx. AdapterHub 1.3 sets skip_layers for the whole active
setup (`set_active_adapters(setup, skip_layers=...)`) and draws the training skips in a Trainer callback
(notebooks/Adapter_Drop_Training.ipynb: skip_layers = range(randint(0, 11)) each step); here both are
options of each adapter, and the draw is a function of (drop_seed, step), so a resumed run replays it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from .composition import Average, BatchSplit, Block, Fuse, Parallel, Split, Stack
from .registry import DeltaConfig

if TYPE_CHECKING:
    from .layer import DeltaLayer

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


class ActivationConfig(DeltaConfig):
    """Where an activation delta acts: the options every activation method shares."""

    placement: Literal["serial", "parallel"] = Field(
        "serial", description="'serial': f reads the module's output h (h + f(h)); 'parallel': f reads the "
        "module's input, or a residual sublayer's residual r (h + f(x))")
    site: Union[Literal["auto", "module"], dict[str, Any]] = Field(
        "auto", description="'auto': a residual sublayer ending in N(h + r) (BERT-style *Output: dense, dropout, "
        "LayerNorm, forward(hidden_states, input_tensor)) places the adapter between h and N; any other module "
        "uses its output. 'module': always the module's output. A dict {'branch', 'norm', 'residual'} names the "
        "submodule giving h, the norm N and the forward argument r of any other residual sublayer")
    original_ln_before: bool = Field(False, description="residual site: the adapter reads N(h + r), not h")
    original_ln_after: bool = Field(True, description="residual site: the output is N(adapter output + r)")
    residual_before_ln: Union[bool, Literal["post_add"]] = Field(
        True, description="residual site: the adapter's own residual is h before the norm (True), after it "
        "(False) or h + r before the norm ('post_add')")
    hidden_size: int | None = Field(None, ge=1, description="the width of h; None: read from the module")
    skip_layers: list[int] = Field(
        [], description="AdapterDrop: blocks (the first integer in the module path) that run without this adapter, "
        "in training and inference")
    drop_lowest: int = Field(
        0, ge=0, description="AdapterDrop in training: each step the adapter is also left out of the blocks below "
        "n, n drawn uniformly from 0..drop_lowest (0: off; 10 for 12 blocks is AdapterHub's robust setting)")
    drop_seed: int = Field(0, ge=0, description="seed of the per-step draw of n: n is a function of (seed, step)")


def block_index(path: str) -> int:
    """The block a module belongs to: the first integer in its dotted path (encoder.layer.3.output -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    if match is None:
        raise ValueError(f"AdapterDrop (skip_layers / drop_lowest) reads the block from the module path, and "
                         f"'{path}' holds no integer: exclude it from the targets or drop these options")
    return int(match.group(1))


def dropped_below(config: ActivationConfig, step: int) -> int:
    """AdapterDrop's n at training step `step`: uniform on 0..drop_lowest, the same in every layer and on resume."""
    g = torch.Generator().manual_seed(config.drop_seed * 1_000_003 + step)
    return int(torch.randint(0, config.drop_lowest + 1, (1,), generator=g))


@dataclass(frozen=True)
class ResidualSite:
    """A sublayer whose forward ends in norm(branch output + residual argument)."""

    branch: str  # submodule whose output is h
    norm: str  # submodule N applied to h + r
    residual: int | str  # the forward's argument r: its position after the first input, or its name

    def residual_of(self, args: tuple, kwargs: dict) -> Tensor:
        if isinstance(self.residual, str):
            if self.residual in kwargs:
                return kwargs[self.residual]
            raise ValueError(f"this call passes no '{self.residual}' (the residual sublayer's residual argument)")
        return args[self.residual]


def find_site(module: nn.Module, spec: Any) -> ResidualSite | None:
    """The residual site of `module` that `spec` (ActivationConfig.site) asks for, or None (the module's output)."""
    if spec == "module":
        return None
    if isinstance(spec, dict):
        unknown = set(spec) - {"branch", "norm", "residual"}
        if unknown or not {"branch", "norm", "residual"} <= set(spec):
            raise ValueError(f"site={spec!r} must give exactly 'branch', 'norm' and 'residual'")
        for key in ("branch", "norm"):
            try:
                module.get_submodule(spec[key])
            except AttributeError:
                children = ", ".join(n for n, _ in module.named_children())
                raise ValueError(f"site {key}={spec[key]!r} is no submodule of {type(module).__name__} "
                                 f"(children: {children})") from None
        return ResidualSite(spec["branch"], spec["norm"], spec["residual"])
    children = dict(module.named_children())
    params = list(inspect.signature(module.forward).parameters)
    if (isinstance(children.get("dense"), nn.Linear) and isinstance(children.get("dropout"), nn.Dropout)
            and isinstance(children.get("LayerNorm"), nn.LayerNorm) and params[:2] == ["hidden_states", "input_tensor"]):
        return ResidualSite("dropout", "LayerNorm", 0)  # args after the first input: input_tensor is args[0]
    return None


def widths(module: nn.Module, site: ResidualSite | None, config: ActivationConfig) -> tuple[int, int]:
    """(width of what f reads, width of h) for a delta at this module."""
    if config.hidden_size is not None:
        return config.hidden_size, config.hidden_size
    if site is not None:
        norm = module.get_submodule(site.norm)
        d = int(norm.normalized_shape[-1]) if isinstance(norm, nn.LayerNorm) else int(norm.num_features)
        return d, d
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the hidden size of {type(module).__name__} (no nn.Linear inside): "
                         "set hidden_size=")
    d_out = linears[-1].out_features
    d_in = linears[0].in_features if config.placement == "parallel" else d_out
    return d_in, d_out


class ActivationDelta(nn.Module):
    """Mixin for a Delta that changes activations; subclasses give `change(layer, h_in) -> f(h_in)`.
    The engine's dropout (Delta.dropout, from the config's `dropout`) acts on f's output, as in AdapterHub."""

    any_module = True
    mergeable = False
    activation = True

    def __init__(self, config: Any, layer: DeltaLayer, *args: Any, **kwargs: Any):
        super().__init__(config, layer, *args, **kwargs)
        drops = bool(getattr(config, "skip_layers", None) or getattr(config, "drop_lowest", 0))
        self.block = block_index(layer.path) if drops else None  # AdapterDrop's layer index
        self.drop_below = 0  # AdapterDrop's n for this training step (set by on_step)

    @property
    def parallel(self) -> bool:
        return self.config.placement == "parallel"

    @property
    def skipped(self) -> bool:
        """AdapterDrop: this block runs without the adapter (always in skip_layers, in training below n).
        Not named `dropped`: that is Delta's input dropout, a method every weight delta has."""
        if self.block is None:
            return False
        return self.block in self.config.skip_layers or (self.training and self.block < self.drop_below)

    def on_step(self, step: int) -> None:
        if getattr(self.config, "drop_lowest", 0):
            self.drop_below = dropped_below(self.config, step)


# --- the state an activation site composes over -------------------------------------------------
@dataclass
class State:
    """One layer's activations while a setup is applied (AdapterHub's BottleneckState, plus x)."""

    h: Tensor  # the hidden state so far
    x: Tensor | None = None  # what parallel adapters (and weight deltas) read
    r: Tensor | None = None  # a residual site's residual
    res: Tensor | None = None  # the adapter's own residual
    up: Tensor | None = None  # the last adapter's change f, for Fuse
    last: str | None = None  # the last adapter applied (its options finish the site)

    def take(self, index: Tensor | slice, dim: int = 0) -> State:
        def cut(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if isinstance(index, slice):
                return t[(slice(None),) * dim + (index,)]
            return t.index_select(dim, index)
        return State(cut(self.h), cut(self.x), cut(self.r), cut(self.res), cut(self.up), self.last)


def _cat(states: Sequence[State], dim: int) -> State:
    def join(ts: list[Tensor | None]) -> Tensor | None:
        return None if any(t is None for t in ts) else torch.cat(ts, dim)
    last = next((s.last for s in reversed(states) if s.last is not None), None)
    return State(*(join([getattr(s, f.name) for s in states]) for f in dataclasses.fields(State)[:5]), last)


class Composer:
    """Applies a setup (a composition block) to one layer's State; written once for every method.

    Weight deltas are applied through their forward (out + ΔW x); activation deltas through the site
    rules below, which follow AdapterHub's bottleneck layer so that its adapters are reproduced exactly.
    """

    def __init__(self, layer: DeltaLayer, site: ResidualSite | None, norm: Callable[[Tensor], Tensor] | None):
        self.layer, self.site, self.norm = layer, site, norm

    def delta(self, name: str) -> nn.Module | None:
        """The adapter's delta here, or None: not at this layer, merged, or dropped here (AdapterDrop)."""
        d = self.layer.deltas[name] if name in self.layer.deltas and name not in self.layer.merged else None
        return None if d is None or getattr(d, "skipped", False) else d

    # AdapterHub's pre_forward: what the adapter reads and its own residual
    def pre(self, name: str, s: State) -> State:
        d = self.delta(name)
        if d is None or not getattr(d, "activation", False) or d.parallel:  # a parallel adapter reads r or x
            return s
        c, h, res = d.config, s.h, s.res
        if self.site is None:  # a plain module: the model's own residual and norms come after it
            return dataclasses.replace(s, res=h)
        if c.residual_before_ln is True:
            res = h
        if c.original_ln_before:
            h = h + s.r
            if c.residual_before_ln == "post_add":
                res = h
            h = self.norm(h)
        if c.residual_before_ln is False:
            res = h
        return dataclasses.replace(s, h=h, res=res)

    def single(self, name: str, s: State) -> State:
        d = self.delta(name)
        if d is None:
            return s
        if not getattr(d, "activation", False):  # a weight delta: its own forward gives out + its change
            if s.x is None:
                raise ValueError(f"adapter '{name}' ({d.method}) is a weight delta; it cannot sit at this "
                                 "activation site")
            if s.last is not None and not (d.additive or d.composes):
                raise RuntimeError(f"cannot stack '{name}' ({d.method}) after '{s.last}' unmerged: it rescales or "
                                   "replaces the whole layer output; merge the others first or use it alone")
            return dataclasses.replace(s, h=d(self.layer, s.x, s.h), last=name)
        if d.parallel:  # h + s f(r): from the residual site's r, or the module's input
            src = s.r if s.r is not None else s.x
            if src is None:
                raise ValueError(f"parallel adapter '{name}' needs the module's input, and this module takes no "
                                 "float tensor first: use placement='serial'")
            up = d.change(self.layer, src)
            return dataclasses.replace(s, h=s.h + d.dropout(up).to(s.h.dtype), up=up, last=name)
        up = d.change(self.layer, s.h)
        res = s.h if s.res is None else s.res  # no pre here (its block's first adapter is not at this layer)
        return dataclasses.replace(s, h=res + d.dropout(up).to(s.h.dtype), up=up, last=name)

    def post(self, s: State) -> Tensor:
        """AdapterHub's post_forward, by the options of the last adapter applied."""
        d = self.delta(s.last) if s.last is not None else None
        if self.site is None:  # a plain module: the model's own residual and norm follow
            return s.h
        if d is None or not getattr(d, "activation", False) or d.config.original_ln_after:
            return self.norm(s.h + s.r)
        return s.h

    # --- blocks ------------------------------------------------------------------------------
    def run(self, setup: Block | str, s: State) -> State:
        if isinstance(setup, str):
            return self.single(setup, self.pre(setup, s))
        if isinstance(setup, Stack):
            for child in setup:
                s = self.run(child, s)
            return s
        if isinstance(setup, Fuse):
            return self.fuse(setup, s)
        s = self.pre(self.first_here(setup), s)
        if isinstance(setup, Average):
            outs = [self.child(c, s) for c in setup]
            h = sum(w * o.h for w, o in zip(setup.weights, outs))
            return dataclasses.replace(outs[0], h=h, last=outs[-1].last)
        if isinstance(setup, (BatchSplit, Parallel)):
            sizes = setup.batch_sizes if isinstance(setup, BatchSplit) else self._equal_rows(setup, s)
            return self._split(setup, s, sizes, dim=0)
        if isinstance(setup, Split):
            return self._split(setup, s, setup.splits, dim=1)
        raise TypeError(f"unknown composition block {setup!r}")

    def first_here(self, block: Block, last: bool = False) -> str:
        """The block's first (or last) adapter that this layer holds: its options prepare the block's input."""
        names = block.names()[::-1] if last else block.names()
        return next((n for n in names if self.delta(n) is not None), names[0])

    def child(self, c: Block | str, s: State) -> State:
        """A block's child on a state its block has already prepared (no second pre)."""
        return self.single(c, s) if isinstance(c, str) else self.run(c, s)

    def _equal_rows(self, block: Parallel, s: State) -> list[int]:
        n = s.h.shape[0]
        if n % len(block):
            raise ValueError(f"{block!r} needs a batch repeated {len(block)} times; this layer got {n} rows "
                             "(run the model through its DeltaModel, which repeats the inputs)")
        return [n // len(block)] * len(block)

    def _split(self, block: Block, s: State, sizes: list[int], dim: int) -> State:
        if sum(sizes) != s.h.shape[dim]:
            what = "rows" if dim == 0 else "tokens"
            raise ValueError(f"{block!r} splits {sum(sizes)} {what} but this layer's input has {s.h.shape[dim]}")
        parts, start = [], 0
        for child, n in zip(block, sizes):
            parts.append(self.child(child, s.take(slice(start, start + n), dim)))
            start += n
        return _cat(parts, dim)

    def fuse(self, block: Fuse, s: State) -> State:
        fusion = self.delta(block.name)
        if fusion is None:
            raise ValueError(f"{block!r} needs the fusion adapter '{block.name}': "
                             f"dm.add_fusion({', '.join(map(repr, block.children))})")
        if all(self.delta(n) is None for n in block.names()):  # every fused adapter dropped here (AdapterDrop)
            return s
        if any(getattr(self.delta(n), "parallel", False) for n in block.names()):
            raise ValueError(f"{block!r}: AdapterFusion fuses serial adapters; a child here is parallel")
        query_src = s.h
        s = self.pre(self.first_here(block, last=True), s)
        query = query_src if fusion.config.query_before_ln else s.h
        outs = [self.child(c, s) for c in block]
        if any(o.up is None for o in outs):
            raise ValueError(f"{block!r}: Fuse combines bottleneck adapters' outputs; a child here has none")
        h = fusion.fuse(query, torch.stack([o.up for o in outs], dim=-2), s.res)
        return dataclasses.replace(s, h=h, up=None, last=block.last())


def hidden_of(out: Any) -> Tensor:
    """The hidden-state element of a module's output (a tensor, a tuple's first, a ModelOutput's first)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict) and out:  # transformers' ModelOutput is an OrderedDict
        first = next(iter(out.values()))
        if isinstance(first, Tensor):
            return first
    raise TypeError(f"cannot find the hidden states in a {type(out).__name__} output; target a module that "
                    "returns a tensor, or a tuple/ModelOutput whose first element is the hidden states")


def with_hidden(out: Any, h: Tensor) -> Any:
    """`out` with its hidden-state element replaced by `h`."""
    if isinstance(out, Tensor):
        return h
    if isinstance(out, tuple):
        return (h, *out[1:])
    if isinstance(out, list):
        return [h, *out[1:]]
    key = next(iter(out))
    new = out.__class__(**{**out, key: h}) if hasattr(out, "to_tuple") else {**out, key: h}
    return new
