"""Selection deltas: a trainable update of chosen entries of a module's existing parameters, ΔW = M ⊙ V.

The third kind of delta (the unified view's "selection"): BitFit's biases, LayerNorm tuning's norm weights,
trainable tokens' embedding rows, and the sparse methods (random subsets, FISH, SpIEL, SHiRA, SaRA, PaCA's
columns) are all this one class with a different rule for which entries to take. Per selected parameter the delta
holds `values` (the update of the chosen entries) and, unless every entry is chosen, `index` (their flat positions
in the parameter's own layout, sorted). Only those are saved, so a checkpoint holds k values and k indices.

Targets are parameters, not only modules: `"*.bias"`, `"re:.*LayerNorm\\.weight"`, `"embed_tokens.weight"`,
`"bias"` (every parameter named so), a module name (all its own parameters), a module type, or a predicate
`(parameter_name, parameter) -> bool`. The delta goes on each module that owns a chosen parameter.

How it runs, written once here:
- a weight layer's weight and bias (Linear, Conv, Embedding, GPT-2 Conv1D, bitsandbytes layers) take the additive
  path, out + Δ(x): gather/index_add for a sparse Linear (never forms ΔW), the touched rows for an Embedding, the
  dense ΔW otherwise. It stacks with LoRA on the same layer, runs in mixed batches and on quantized bases.
- any other module (LayerNorm, RMSNorm, a custom one) reruns its own forward with p + Δp (functional_call).
- merge adds the update into the chosen entries and keeps their old values, so unmerge restores them bit for bit.
- a tied parameter (an lm_head sharing the input embedding's tensor) is one parameter under several modules: the
  update goes on each owner (else a merge, into the one tensor, would change the others' outputs), held once by
  the first owner's delta; the others read it (`Ties`) and merge nothing.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from .layer import Delta, DeltaLayer
from .registry import DeltaConfig, did_you_mean


class SelectionConfig(DeltaConfig):
    """A selection method's config: `targets` / `exclude` name parameters (or modules: all their own parameters)."""

    targets: Any = Field(
        default=None,
        description="parameters to update: names matched as a dotted-path suffix ('bias', 'query.weight'), "
        "globs ('*.bias'), 're:<regex>' (full match on the parameter's name), module names or types (all their "
        "own parameters) or a predicate (name, parameter) -> bool; None = the method's default",
    )

    def default_parameter_targets(self) -> Any:
        """The method's targets when none are given (BitFit: every bias)."""
        return None

    def no_match_hint(self) -> str:
        """What to do instead when a target matches no parameter of the model (BitFit on a bias-free model)."""
        return ""


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --- parameter-level targeting -------------------------------------------------------------------
def parameter_matcher(spec: Any) -> Callable[[str, str, nn.Module, nn.Parameter], bool]:
    """A test (module path, parameter name in it, module, parameter) -> bool for one target spec."""
    def full(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    if isinstance(spec, str) and spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return lambda path, n, m, p: pattern.fullmatch(full(path, n)) is not None or (
            pattern.fullmatch(path) is not None)
    if isinstance(spec, str) and any(c in spec for c in "*?["):
        return lambda path, n, m, p: fnmatch.fnmatchcase(full(path, n), spec) or fnmatch.fnmatchcase(path, spec)
    if isinstance(spec, str):
        def by_name(path: str, n: str, m: nn.Module, p: nn.Parameter) -> bool:
            f = full(path, n)
            return f == spec or f.endswith("." + spec) or path == spec or path.endswith("." + spec)
        return by_name
    if isinstance(spec, type):
        return lambda path, n, m, p: isinstance(m, spec)
    if callable(spec):
        return lambda path, n, m, p: bool(spec(full(path, n), p))
    raise TypeError(f"cannot target parameters with {spec!r}: use a name, a glob ('*.bias'), 're:<regex>', "
                    "a module type or a predicate (name, parameter) -> bool")


def _own_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(module path, module, parameter name, parameter) of the user's model, wrapped layers seen as they wrap."""
    from .targeting import named_layers

    for path, module in [("", model), *named_layers(model)]:
        for name, p in module.named_parameters(recurse=False):
            yield path, module, name, p


def resolve_parameters(model: nn.Module, targets: Any, exclude: Any = None, hint: str = "") -> dict[str, list[str]]:
    """module path -> names of its own parameters chosen by `targets` minus `exclude`, plus every other owner of a
    chosen tensor (tied weights); a clear error for a miss (`hint`: the method's advice, appended)."""
    specs = targets if isinstance(targets, (list, tuple, set)) else [targets]
    excluded = [parameter_matcher(s) for s in (exclude if isinstance(exclude, (list, tuple, set)) else [exclude])
                ] if exclude is not None else []
    entries = list(_own_parameters(model))
    chosen: dict[str, list[str]] = {}
    for spec in specs:
        match = parameter_matcher(spec)
        hits = [(path, n) for path, m, n, p in entries if match(path, n, m, p)]
        if not hits:
            names = [f"{path}.{n}" if path else n for path, _, n, _ in entries]
            leaves = sorted({".".join(x.rsplit(".", 2)[-2:]) for x in names})
            close = did_you_mean(str(spec).lstrip("*."), leaves) if isinstance(spec, str) else ""
            raise ValueError(f"target {spec!r} matches no parameter of the model{close} (parameters look like "
                             f"{', '.join(names[:3])}; use '*.bias', 're:<regex>' or a module name)"
                             + (f". {hint}" if hint else ""))
        for path, n in hits:
            if not path:
                raise ValueError(f"target {spec!r} selects '{n}', a parameter of the model's root module; "
                                 "selection deltas go on the module that owns the parameter: wrap it in a submodule")
            module = _base(model.get_submodule(path))
            if any(ex(path, n, module, module.get_parameter(n)) for ex in excluded):
                continue
            if n not in chosen.setdefault(path, []):
                chosen[path].append(n)
    if not chosen:
        raise ValueError(f"targets {targets!r} minus exclude {exclude!r} leave no parameter to update")
    picked = {id(p) for path, _, n, p in entries if n in chosen.get(path, ())}
    for path, _, n, p in entries:  # the other owners of a tied tensor, after its first (the one holding values)
        if id(p) in picked and path and n not in chosen.get(path, ()):
            chosen.setdefault(path, []).append(n)
    return chosen


class Ties(nn.Module):
    """An adapter's tied parameters: (path, name) of each later owner -> that of the first, and the first owners'
    deltas as they are built (plain attributes: no tensors of its own, so nothing is saved or counted here)."""

    def __init__(self, first: dict[tuple[str, str], tuple[str, str]]):
        super().__init__()
        self.first = first
        self.deltas: dict[tuple[str, str], SelectionDelta] = {}


def chosen_names(config: SelectionConfig, layer: DeltaLayer) -> list[str]:
    """The names of the layer's own parameters that the config's targets minus exclude choose."""
    module = layer.base_layer
    targets = config.targets if config.targets is not None else config.default_parameter_targets()
    matchers = [parameter_matcher(s) for s in (targets if isinstance(targets, (list, tuple, set)) else [targets])]
    excluded = [parameter_matcher(s) for s in (
        config.exclude if isinstance(config.exclude, (list, tuple, set)) else [config.exclude])
    ] if config.exclude is not None else []
    return [n for n, p in module.named_parameters(recurse=False) if any(m(layer.path, n, module, p) for m in matchers)
            and not any(ex(layer.path, n, module, p) for ex in excluded)]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, DeltaLayer) else module


# --- the delta -----------------------------------------------------------------------------------
class SelectionDelta(Delta):
    """An update of chosen entries of the wrapped module's own parameters. A method overrides `select`.

    `self.names`: the chosen parameters (their names in the module); `self.values[key]` and the buffer
    `index_<key>` per name (key = name with dots as '__'). Subclasses may change the chosen entries while
    training (SpIEL, SaRA) with `set_selection`.
    """

    any_module = True
    parameter_level = True  # DeltaModel resolves the config's targets with resolve_parameters

    def __init__(self, config: SelectionConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, shared=shared)
        ties = shared.first if isinstance(shared, Ties) else {}
        self.names = [n for n in chosen_names(config, layer) if self.keeps(layer, n)]
        tied = set(ties) | set(ties.values())  # a first owner holds the values even where no target named it
        self.names += [n for n in dict(layer.base_layer.named_parameters(recurse=False))
                       if (layer.path, n) in tied and n not in self.names]
        if not self.names:
            targets = config.targets if config.targets is not None else config.default_parameter_targets()
            raise ValueError(f"{self.method}: no parameter of '{layer.path}' is selected by targets {targets!r}")
        # a tied parameter's later owners read the first owner's values and index (built before them)
        self.__dict__["_alias"] = {n: (shared.deltas[ties[(layer.path, n)]], ties[(layer.path, n)][1])
                                   for n in self.names if (layer.path, n) in ties}
        kind = layer.kind
        self.__dict__["_kind"] = kind  # bias_delta() is asked without the layer; a kind is a constant singleton
        self.__dict__["_layer"] = layer  # not a submodule: the layer holds this delta
        self._set_path(layer)
        self.values = nn.ParameterDict()
        for n in self.names:
            if n in self._alias:
                continue
            if isinstance(shared, Ties):
                shared.deltas[(layer.path, n)] = self
            p = self._base_param(layer, n)
            index = self.select(layer, n, p) if initialize else None
            if index is not None:
                index = torch.unique(index.reshape(-1).to(torch.long, copy=False).to(p.device))  # sorted, no repeats
                if index.numel() and (index[0] < 0 or index[-1] >= p.numel()):
                    raise ValueError(f"{self.method}: selected entries of '{layer.path}.{n}' fall outside its "
                                     f"{p.numel()} entries")
            shape = p.shape if index is None else (index.numel(),)
            self.values[_key(n)] = nn.Parameter(torch.zeros(shape, dtype=_master_dtype(p.dtype), device=p.device))
            self.register_buffer(f"index_{_key(n)}", index)
            if initialize:
                self.init_values(layer, n, p)

    @classmethod
    def build_shared(cls, config: SelectionConfig, layers: Any) -> nn.Module | None:
        """`Ties` when a chosen tensor has several owners among the adapter's layers (tied weights), else None."""
        owners: dict[int, list[tuple[str, str]]] = defaultdict(list)
        chosen: set[int] = set()
        for layer in layers:
            mine = chosen_names(config, layer)
            for n, p in layer.base_layer.named_parameters(recurse=False):
                owners[id(p)].append((layer.path, n))
                chosen |= {id(p)} if n in mine else set()
        first = {o: group[0] for t, group in owners.items() if t in chosen for o in group[1:]}
        return Ties(first) if first else None

    # --- what a method says ------------------------------------------------------------------
    def keeps(self, layer: DeltaLayer, name: str) -> bool:
        """Whether this method updates parameter `name` of a targeted module (PaCA: only a linear's weight, so a
        module target such as 'query' leaves its bias alone)."""
        return True

    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        """Flat indices (in `param`'s own layout) of the entries to update, or None for all of them."""
        return None

    def init_values(self, layer: DeltaLayer, name: str, param: Tensor) -> None:
        """The update's initial values (zero: the model starts as the base). Called once per parameter."""

    # --- views -------------------------------------------------------------------------------
    def index(self, name: str) -> Tensor | None:
        if name in self._alias:
            delta, first = self._alias[name]
            return delta.index(first)
        return getattr(self, f"index_{_key(name)}", None)

    def value(self, name: str) -> Tensor:
        if name in self._alias:
            delta, first = self._alias[name]
            return delta.value(first)
        return self.values[_key(name)]

    @staticmethod
    def _base_param(layer: DeltaLayer, name: str) -> Tensor:
        """The base parameter as floats (a quantized weight dequantised; during a merge, the copy it rewrites)."""
        if layer.kind is not None and name == layer.kind.weight:
            return layer.weight
        return layer.base_layer.get_parameter(name)

    @staticmethod
    def _shape(layer: DeltaLayer, name: str) -> torch.Size:
        """The parameter's float shape, read without dequantising a quantized weight."""
        if layer.quantized and name == layer.kind.weight:
            return torch.Size((layer.base_layer.out_features, layer.base_layer.in_features))
        return layer.base_layer.get_parameter(name).shape

    def dense(self, layer: DeltaLayer, name: str) -> Tensor:
        """The update of parameter `name` in its own layout (zeros off the selection)."""
        v, idx, shape = self.value(name), self.index(name), self._shape(layer, name)
        if idx is None:
            return v.reshape(shape)
        return torch.zeros(shape.numel(), dtype=v.dtype, device=v.device).index_put((idx,), v).reshape(shape)

    def set_selection(self, name: str, index: Tensor, values: Tensor | None = None) -> None:
        """Choose other entries of `name` (same count): the values' data change in place, so an optimizer keeps
        the tensor (its state for moved entries is the caller's to reset)."""
        old = self.index(name)
        if old is None or index.numel() != old.numel():
            raise ValueError(f"set_selection keeps the number of entries ({None if old is None else old.numel()}); "
                             f"got {index.numel()}")
        order = torch.argsort(index)
        old.copy_(index[order])
        with torch.no_grad():
            v = self.value(name)
            v.copy_(torch.zeros_like(v) if values is None else values.to(v)[order])

    def delta_count(self) -> int:
        return sum(v.numel() for v in self.values.values())

    # --- forward -----------------------------------------------------------------------------
    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        kind = layer.kind
        if kind.weight in self.names:
            return kind.to_matrix(self.dense(layer, kind.weight))
        d_out, d_in = kind.to_matrix(torch.empty(self._shape(layer, kind.weight), device="meta")).shape
        return torch.zeros(d_out, d_in, dtype=next(iter(self.values.values())).dtype,
                           device=next(iter(self.values.values())).device)

    def bias_delta(self) -> Tensor | None:
        kind = self.__dict__["_kind"]
        if kind is None or kind.bias not in self.names:
            return None
        return self.dense(self.__dict__["_layer"], kind.bias).reshape(-1)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        kind = layer.kind
        y = None
        if kind.weight in self.names:
            idx = self.index(kind.weight)
            if idx is not None and kind.name in ("linear", "linear_4bit", "linear_int8") and layer.stock:
                y = self._sparse_linear(layer, x, idx)
            elif idx is not None and kind.name == "embedding" and layer.stock:
                y = self._sparse_embedding(layer, x, idx)
            else:
                y = layer.apply_matrix(x, self.delta_weight(layer))
        if (b := self.bias_delta()) is not None:
            if y is None:
                shape = [1] * x.dim()
                shape[kind.channel_dim] = -1
                return b.reshape(shape) if kind.name != "embedding" else b
            y = y + layer.per_channel(b, y)
        return y

    def _sparse_linear(self, layer: DeltaLayer, x: Tensor, idx: Tensor) -> Tensor:
        """x ΔWᵀ for k chosen entries without forming ΔW: y[..., row] += x[..., col] · v (k products per token)."""
        d_out, d_in = layer.out_features, layer.in_features
        v = self.value(layer.kind.weight)
        if idx.numel() * 4 > d_out * d_in:  # dense enough that the matmul is the cheaper form
            return layer.apply_matrix(x, self.delta_weight(layer))
        rows, cols = idx // d_in, idx % d_in
        terms = x[..., cols] * v
        return torch.zeros(*x.shape[:-1], d_out, dtype=terms.dtype, device=x.device).index_add(-1, rows, terms)

    def _sparse_embedding(self, layer: DeltaLayer, ids: Tensor, idx: Tensor) -> Tensor:
        """ΔE[ids] from the touched rows only (a vocabulary-sized ΔE is never formed)."""
        num, dim = layer.base_layer.weight.shape
        v = self.value(layer.kind.weight)
        rows = idx // dim
        touched, slot = torch.unique(rows, return_inverse=True)
        compact = torch.zeros(touched.numel() + 1, dim, dtype=v.dtype, device=v.device)  # last row: untouched ids
        compact = compact.index_put((slot, idx % dim), v)
        where = torch.full((num,), touched.numel(), dtype=torch.long, device=ids.device)
        where[touched] = torch.arange(touched.numel(), device=ids.device)
        return compact[where[ids]]

    def forward(self, layer: DeltaLayer, x: Any, out: Any, *args: Any, **kwargs: Any) -> Any:
        if self.additive:
            return super().forward(layer, x, out)
        module = layer.base_layer
        values = {n: (p + self.dense(layer, n).to(p.dtype)) for n, p in
                  ((n, module.get_parameter(n)) for n in self.names)}
        return functional_call(module, values, (x, *args), kwargs)

    # --- merge: exact, the chosen entries' old values are the undo state -------------------------
    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> dict[str, Tensor]:
        undo = {}
        for n in self.names:
            if n in self._alias:
                continue  # the first owner merges the one tensor
            p, idx, v = self._base_param(layer, n), self.index(n), self.value(n)
            flat = p.view(-1)
            if idx is None:
                undo[n] = flat.clone()
                flat += v.reshape(-1).to(p.dtype)
            else:
                undo[n] = flat[idx].clone()
                flat.index_put_((idx,), flat[idx] + v.to(p.dtype))
        return undo

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, undo: dict[str, Tensor]) -> None:
        for n in self.names:
            if n in self._alias:
                continue
            flat, idx = self._base_param(layer, n).view(-1), self.index(n)
            if idx is None:
                flat.copy_(undo[n])
            else:
                flat.index_put_((idx,), undo[n])

    # --- loading: the file says how many entries each parameter has ----------------------------
    def fit_state(self, state: dict[str, Tensor]) -> None:  # noqa: D401
        """Take the saved state's parameters and entry counts (a saved adapter names its modules; which of their
        parameters it updates, and how many entries of each, the file says: data-chosen counts vary per layer)."""
        saved = [n for n in self.names if f"values.{_key(n)}" in state]
        if not saved:
            return  # nothing of this layer in the file (or only tied aliases): the state check names what is missing
        for n in set(self.names) - set(saved) - set(self._alias):
            del self.values[_key(n)]
            delattr(self, f"index_{_key(n)}")
        self.names = saved + [n for n in self.names if n in self._alias]
        self._set_path(self.__dict__["_layer"])
        for n in saved:
            k = _key(n)
            v, idx = state[f"values.{k}"], state.get(f"index_{k}")
            if v.shape != self.values[k].shape:
                self.values[k] = nn.Parameter(torch.zeros(v.shape, dtype=self.values[k].dtype,
                                                          device=self.values[k].device))
            if idx is not None:
                self.register_buffer(f"index_{k}", torch.zeros(idx.shape, dtype=torch.long,
                                                               device=self.values[k].device))

    def _set_path(self, layer: DeltaLayer) -> None:
        """The additive path for a stock weight layer's weight/bias (out + Δ(x), through its kind's op); else the
        module reruns with p + Δp (a subclass with its own forward may use its bias in any way)."""
        kind = layer.kind
        self.additive = bool(kind is not None and kind.op is not None and layer.stock
                             and set(self.names) <= {kind.weight, kind.bias})
        self.uses_base_output = self.additive
        self.needs_inputs = not self.additive


# --- data-chosen selections (FISH, diff pruning's projection) -------------------------------------
def global_top_k(scores: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """The k entries with the largest scores over all the named tensors together: name -> flat indices.

    Names are taken in sorted order and ties go to the earlier position of that concatenation, so every
    caller (one per layer) computes the same split."""
    names = sorted(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    if not 0 < k <= flat.numel():
        raise ValueError(f"cannot keep {k} of {flat.numel()} entries: choose between 1 and {flat.numel()}")
    # a stable sort: equal scores keep their order, so the choice among ties is deterministic
    order = torch.sort(-flat, stable=True).indices[:k]
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = order[(order >= start) & (order < start + size)] - start
        start += size
    return out
