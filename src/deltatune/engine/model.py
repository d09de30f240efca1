"""DeltaModel: named adapters on any nn.Module, with everything method-independent written once."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .activation import find_site
from .composition import Block, Stack, parse
from .kinds import LINEAR, has_fused_fast_path, matrix_shape, target_kind, weight_of
from .layer import BASE, Delta, DeltaLayer, Parts, Routing
from .prompt import (
    PROMPT,
    PromptDelta,
    PromptSite,
    assemble,
    embedding_hook,
    method_loss,
    prepared_inputs,
    prompt_site,
    read_only_cache,
)
from .prompt import generate as prompt_generate
from .quantized import RoundingError, dequantize, dequantized_linear, logical_numel, pin_4bit_format
from .registry import DeltaConfig, UnionConfig, did_you_mean, get_method, method_of
from .selection import resolve_parameters
from .targeting import delta_layers, get_parent, resolve

SHARED = "__shared__"  # state-dict prefix of an adapter's tensors shared by all its layers


@dataclass
class Adapter:
    """What the model knows about one named adapter."""

    name: str
    config: DeltaConfig
    paths: list[str]  # layers holding the method's delta
    train_modules: list[str] = field(default_factory=list)  # layers holding a trainable copy
    fingerprints: dict[str, str] = field(default_factory=dict)  # path -> base weight fingerprint

    @property
    def method(self) -> str:
        return method_of(self.config).name

    @property
    def all_paths(self) -> list[str]:
        return self.paths + self.train_modules


def fingerprint(weight: Tensor) -> str:
    """Shape plus 256 evenly spaced values at bf16 precision: tells models apart, ignores fp32/bf16 copies."""
    flat = weight.detach().reshape(-1)
    # float32 linspace rounds the last index up past the end from 2^24 entries on; clamping keeps every
    # fingerprint already saved for smaller tensors unchanged
    idx = torch.linspace(0, flat.numel() - 1, steps=min(256, flat.numel())).long().clamp_(max=flat.numel() - 1)
    sample = flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes()
    return hashlib.sha1(str(tuple(weight.shape)).encode() + sample).hexdigest()[:16]


def _keep_plain_path(module: nn.Module, args: Any) -> None:
    """A no-op hook: its presence makes the enclosing module skip a fast path that would bypass this layer."""


def _part(spec: Any, config: DeltaConfig, layer: DeltaLayer, child: str, initialize: bool, extra: dict[str, Any]
          ) -> tuple[DeltaLayer, Delta]:
    """A delta on a submodule that `layer`'s forward reads without calling, through a view of its own."""
    module = layer.base_layer.get_submodule(child)
    view = DeltaLayer(module, target_kind(module))
    view.path = f"{layer.path}.{child}"
    return view, spec.delta(config, view, initialize, **extra)


def build_delta(config: DeltaConfig, layer: DeltaLayer, initialize: bool, shared: nn.Module | None = None) -> Delta:
    """The method's delta on one wrapped layer (`layer.path` set), with a delta on each submodule its forward
    reads without calling (Parts); `shared`: the adapter's build_shared tensors."""
    spec, path = method_of(config), layer.path
    if layer.kind is not None and layer.kind.op is None and not spec.delta.additive:
        raise ValueError(f"{spec.name} cannot adapt '{path}' ({type(layer.base_layer).__name__}): its forward "
                         "reads the weight itself, so only additive weight deltas (LoRA, LoHa...) reach it; "
                         "train it whole (train_modules) or pick an additive method")
    extra = {} if shared is None else {"shared": shared}
    delta = spec.delta(config, layer, initialize, **extra)
    if layer.kind is not None and layer.kind.parts:
        delta = Parts(delta, {child: _part(spec, config, layer, child, initialize, extra) for child in layer.kind.parts})
    return delta


class StateMismatch(ValueError):
    """A state dict whose keys, shapes or dtypes do not fit the adapter it is loaded into."""


@torch.no_grad()
def _copy_state(own: dict[str, Tensor], state: dict[str, Tensor], name: str) -> None:
    """Copy `state` into an adapter's tensors `own`, after checking that keys, shapes and dtypes all fit."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        parts = [f"{what} {keys[:5]}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise StateMismatch(f"adapter '{name}' state does not fit: {', '.join(parts)}")
    for key, t in own.items():
        s = state[key]
        if t.shape != s.shape:
            raise StateMismatch(f"shape mismatch for '{key}': model has {tuple(t.shape)}, state has {tuple(s.shape)}")
        # a float is cast to the adapter's dtype; an int64 or bool for a float (or the reverse) is no adapter value
        if t.is_floating_point() != s.is_floating_point() or (not t.is_floating_point() and t.dtype != s.dtype):
            raise StateMismatch(f"'{key}' is {s.dtype} in the state but the adapter holds {t.dtype}")
        if t.is_floating_point() and s.numel():  # finite values the cast would turn into inf (an inf stays one)
            top = float(s.nan_to_num(0.0, 0.0, 0.0).abs().max())
            if top > torch.finfo(t.dtype).max:
                raise StateMismatch(f"'{key}' holds values up to {top:.3g}, beyond {t.dtype}'s range")
    for key, t in own.items():
        t.copy_(state[key])


class DeltaModel(nn.Module):
    """A model with deltas injected in place. Calls go to the wrapped model's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if any(isinstance(m, DeltaLayer) for m in model.modules()):
            raise ValueError("this model already carries deltas; use the DeltaModel that inject() returned")
        for m in model.modules():  # every 4-bit layer, adapted or not: the same arithmetic on every CPU
            if getattr(m, "support_avx512bf16_for_cpu", False):
                pin_4bit_format(m)
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.active: tuple[str, ...] = ()
        self.setup: Block | None = None  # the active composition, when it is more than a plain stack of names
        self.shared = nn.ModuleDict()  # adapter name -> the tensors its layers share (Delta.build_shared)
        self.prompts = nn.ModuleDict()  # adapter name -> its model-level delta (engine/prompt.py)
        self.prompts_enabled = True  # False inside disabled()
        self._site: PromptSite | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, generate helpers, device...

    # --- forward ---------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, token_mask: Tensor | None = None,
                **kwargs: Any) -> Any:
        """The wrapped model's forward. `adapter_names`: one adapter per row ("__base__": none);
        `token_mask` (batch, sequence): the adapters change only the tokens where it is set (token-masked
        LoRA, e.g. a new modality's tokens), every other token sees the base model."""
        args, kwargs = self._repeated(args, kwargs)
        deltas = self._row_prompts(args, kwargs, adapter_names)
        if deltas is not None and token_mask is not None:
            raise ValueError("token_mask cannot be combined with a prompt adapter (its virtual tokens have no "
                             "place in the mask); deactivate the prompt adapter or drop token_mask")
        own_loss = None
        if deltas is not None:
            kwargs = self._keywords(args, kwargs)
            own_loss, kwargs = method_loss(deltas, kwargs)  # CPT: its loss, from the labels and its batch keys
            args = ()
        with self._routed(adapter_names), self._masked_tokens(token_mask), self._embedded(deltas, kwargs):
            if deltas is not None:  # the real tokens' embeddings are taken in here: routed, through `embed`
                kwargs = prepared_inputs(self.model, self.prompt_site, assemble(deltas), kwargs)
            with read_only_cache(self.model, kwargs):
                output = self.model(*args, **kwargs)
        return output if own_loss is None else own_loss(output)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        args, kwargs = self._repeated(args, kwargs)
        deltas = self._row_prompts(args, kwargs, adapter_names)
        with self._routed(adapter_names), self._embedded(deltas, self._keywords(args, kwargs)):
            if deltas is not None:
                return prompt_generate(self.model, self.prompt_site, deltas, self._keywords(args, kwargs))
            return self.model.generate(*args, **kwargs)

    # --- model-level (prompt) deltas ------------------------------------------------------
    @property
    def prompt_site(self) -> PromptSite:
        """What prompt methods need to know about the model (read once, on the first prompt adapter)."""
        if self._site is None:
            self._site = prompt_site(self.model)
        return self._site

    def _row_prompts(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None
                     ) -> list[PromptDelta | None] | None:
        """Each row's prompt delta (None: none), or None when no row has one (the batch runs as it is)."""
        if not self.prompts or not self.prompts_enabled:
            return None
        if adapter_names is not None:
            deltas = [self.prompts[n] if n in self.prompts else None for n in adapter_names]
            return deltas if any(d is not None for d in deltas) else None
        name = next((n for n in self.active if n in self.prompts), None)
        if name is None:
            return None
        first = next((t for t in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                      if isinstance(t, Tensor)), None)
        if first is None:
            raise ValueError(f"prompt adapter '{name}' needs input_ids or inputs_embeds")
        return [self.prompts[name]] * first.shape[0]

    @staticmethod
    def _keywords(args: tuple, kwargs: dict) -> dict:
        """The call's arguments as keywords: a prompt adapter rebuilds input_ids into inputs_embeds."""
        if len(args) > 1:
            raise ValueError("with a prompt adapter pass the inputs as keywords (input_ids=..., attention_mask=...)")
        return {"input_ids": args[0], **kwargs} if args else dict(kwargs)

    def _embedded(self, deltas: list[PromptDelta | None] | None, kwargs: dict) -> contextlib.AbstractContextManager:
        if deltas is None:
            return contextlib.nullcontext()
        return embedding_hook(self.model, deltas, kwargs.get("attention_mask"))

    def fold_prompt(self, name: str | None = None) -> None:
        """Replace prompt adapter `name`'s reparameterisation (prefix MLP, P-tuning encoder) by its output;
        outputs stay the same and the adapter saves (and exports) in its folded form."""
        name = name or self._only()
        if name not in self.prompts:
            raise ValueError(f"adapter '{name}' is no prompt adapter; fold_prompt() folds {list(self.prompts)}")
        self.prompts[name].fold()
        config, folded = self.adapters[name].config, self.prompts[name].config
        self.adapters[name].config = config.with_prompt(folded) if isinstance(config, UnionConfig) else folded

    def _repeated(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A Parallel setup runs the batch once per child: every batch tensor repeated along dim 0."""
        copies = self.setup.copies if self.setup is not None else 1
        if copies == 1:
            return args, kwargs
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        if first is None:
            return args, kwargs
        n = first.shape[0]

        def rep(t: Any) -> Any:
            return t.repeat(copies, *[1] * (t.dim() - 1)) if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t
        return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}

    def _masked_tokens(self, token_mask: Tensor | None) -> contextlib.AbstractContextManager:
        if token_mask is None:
            return contextlib.nullcontext()
        if token_mask.dim() != 2:
            raise ValueError(f"token_mask must be (batch, sequence); got shape {tuple(token_mask.shape)}")
        return self._layers_set("token_mask", token_mask.bool())

    def _routed(self, adapter_names: Sequence[str] | None) -> contextlib.AbstractContextManager:
        """Within the block, row i of every batch goes through adapter `adapter_names[i]` ("__base__": none)."""
        if adapter_names is None:
            return contextlib.nullcontext()
        if isinstance(adapter_names, str):  # a string is a sequence too: 'default' would route rows to 'd', 'e'...
            raise ValueError(f"adapter_names takes one adapter name per batch row, got the string {adapter_names!r}; "
                             f"pass [{adapter_names!r}] * batch_size, or set_active({adapter_names!r})")
        self._check_names([n for n in dict.fromkeys(adapter_names) if n != BASE])
        return self._layers_set("route", Routing(adapter_names))

    @contextlib.contextmanager
    def _layers_set(self, attr: str, value: Any) -> Iterator[None]:
        """Set `attr` on every DeltaLayer for the duration of the block; each gets its own value back after
        it, so that blocks nest (a disabled() inside a disabled() leaves the outer one disabled)."""
        layers = [layer for _, layer in self.layers()]
        before = [getattr(layer, attr) for layer in layers]
        for layer in layers:
            setattr(layer, attr, value)
        try:
            yield
        finally:
            for layer, old in zip(layers, before):
                setattr(layer, attr, old)

    # --- adapters --------------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[str, DeltaLayer]]:
        """(path, layer) of every wrapped layer; paths as the user's model names them (adapter.paths)."""
        yield from delta_layers(self.model)

    def add_adapter(self, name: str, config: DeltaConfig, train_modules: Any = None) -> Adapter:
        """Add adapter `name` (trainable; active if it is the first). On any error the model is unchanged."""
        return self._install(*self._build(name, config, train_modules, initialize=True))

    def add_adapter_from_state(self, name: str, config: DeltaConfig, train_modules: Any,
                               state: dict[str, Tensor]) -> Adapter:
        """Add adapter `name` holding saved tensors (a native or imported checkpoint) instead of an init."""
        adapter, built, shared = self._build(name, config, train_modules, initialize=False)
        for path, _, delta in built:  # a selection's entry counts are the file's (chosen from data, per layer)
            if hasattr(delta, "fit_state"):
                delta.fit_state({k[len(path) + 1:]: t for k, t in state.items() if k.startswith(f"{path}.")})
        own = {f"{path}.{k}": t for path, _, delta in built for k, t in delta.state_dict().items()}
        if shared is not None:
            own.update({f"{SHARED}.{k}": t for k, t in shared.state_dict().items()})
        _copy_state(own, state, name)
        return self._install(adapter, built, shared)

    def _build(self, name: str, config: DeltaConfig, train_modules: Any, initialize: bool
               ) -> tuple[Adapter, list[tuple[str, DeltaLayer, Delta]], nn.Module | None]:
        """Validate and build every delta of a new adapter without touching the model yet."""
        if not name or "." in name or name == BASE:
            raise ValueError(f"invalid adapter name {name!r}: use a non-empty name without dots")
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' exists already; delete_adapter('{name}') first or pick another name")
        if isinstance(config, UnionConfig):
            return self._build_union(name, config, train_modules, initialize)
        spec, full = method_of(config), get_method("full")
        model_level = getattr(spec.delta, "model_level", False)
        targets = config.targets
        if model_level:
            targets = None
        elif targets is None and getattr(config, "default_targets", None):  # the method's own placement per model
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in config.default_targets:
                raise ValueError(f"no targets given and {spec.name} has no default for model type {model_type!r} "
                                 f"(defaults for: {', '.join(config.default_targets)}); set targets=[...]")
            targets = config.default_targets[model_type]
        if getattr(spec.delta, "parameter_level", False):  # a selection: targets name parameters (engine/selection.py)
            targets = targets if targets is not None else config.default_parameter_targets()
            paths = list(resolve_parameters(self.model, targets, config.exclude, hint=config.no_match_hint()))
        else:
            paths = [] if model_level else resolve(self.model, targets, config.exclude,
                                                   need_kind=not spec.delta.any_module)
        head_paths = resolve(self.model, train_modules, need_kind=False) if train_modules else []
        if overlap := set(paths) & set(head_paths):
            raise ValueError(f"modules both adapted and fully trained: {sorted(overlap)}; remove them from one list")
        wrapped = {}
        for path in paths + head_paths:
            module = self.model.get_submodule(path)
            wrapped[path] = module if isinstance(module, DeltaLayer) else DeltaLayer(module, target_kind(module))
            wrapped[path].path = path
        shared = None if model_level else spec.delta.build_shared(config, [wrapped[p] for p in paths])
        built = []
        for path in paths + head_paths:
            module, layer = self.model.get_submodule(path), wrapped[path]
            if layer.merged:
                raise ValueError(f"'{path}' has merged adapters {list(layer.merged)}: unmerge() before adding '{name}'")
            if path in head_paths and any(isinstance(m, DeltaLayer) for m in layer.base_layer.modules()):
                raise ValueError(f"train module '{path}' contains adapted layers; train it in full or adapt its layers")
            delta = build_delta(config, layer, initialize, shared) if path in paths else full.delta(full.config(), layer)
            delta.train(layer.base_layer.training)  # an adapter loaded onto an eval() model must not drop out
            built.append((path, layer, delta))
        prints = {path: fingerprint(w) for path, layer, _ in built
                  if path in paths and (w := weight_of(layer.base_layer)) is not None}
        if model_level:
            prompt = spec.delta(config, self.prompt_site, initialize)
            prompt.train(self.model.training)
            prints[self._embedding_path()] = fingerprint(self.prompt_site.embedding.weight)
            built.append((PROMPT, None, prompt))
        return Adapter(name, config, paths, head_paths, prints), built, shared

    def _build_union(self, name: str, config: UnionConfig, train_modules: Any, initialize: bool
                     ) -> tuple[Adapter, list[tuple[str, DeltaLayer, Delta]], nn.Module | None]:
        """Every part of a UnionConfig built as adapter `name` (the train modules go with the first part)."""
        parts = [self._build(name, part, train_modules if i == 0 else None, initialize)
                 for i, part in enumerate(config.parts())]
        seen: dict[str, str] = {}
        for part, (adapter, _, _) in zip(config.parts(), parts):
            for path in adapter.all_paths:
                if path in seen:
                    raise ValueError(f"{method_of(config).name} puts two deltas ({seen[path]} and "
                                     f"{method_of(part).name}) on '{path}': give its parts different targets")
                seen[path] = method_of(part).name
        shared = [s for _, _, s in parts if s is not None]
        if len(shared) > 1:
            raise ValueError(f"{method_of(config).name}: at most one of its parts may share tensors across layers")
        adapter = Adapter(name, config, [p for a, _, _ in parts for p in a.paths],
                          [p for a, _, _ in parts for p in a.train_modules],
                          {k: v for a, _, _ in parts for k, v in a.fingerprints.items()})
        return adapter, [b for _, built, _ in parts for b in built], shared[0] if shared else None

    def _embedding_path(self) -> str:
        """The dotted path of the model's input embedding (its fingerprint identifies the base of a prompt)."""
        return next(p for p, m in self.model.named_modules() if m is self.prompt_site.embedding)

    def _install(self, adapter: Adapter, built: list[tuple[str, DeltaLayer, Delta]], shared: nn.Module | None
                 ) -> Adapter:
        for path, layer, delta in built:
            if path == PROMPT:  # the model-level delta: kept beside the layers, not in them
                self.prompts[adapter.name] = delta
                continue
            parent, child = get_parent(self.model, path)
            if getattr(parent, child) is not layer:
                setattr(parent, child, layer)
                names = path.split(".")
                if any(has_fused_fast_path(self.model.get_submodule(".".join(names[:i]))) for i in range(len(names))):
                    layer.register_forward_pre_hook(_keep_plain_path)
            layer.deltas[adapter.name] = delta
            if getattr(delta, "activation", False):
                layer.install_site(find_site(layer.base_layer, delta.config.site))
        if shared is not None:
            self.shared[adapter.name] = shared
        self.adapters[adapter.name] = adapter
        self.set_active(self.setup if self.setup is not None else (self.active or adapter.name))
        return adapter

    def add_fusion(self, *children: str | Block, name: str | None = None, config: DeltaConfig | None = None
                   ) -> Adapter:
        """Add an AdapterFusion over `children` (adapter names, or Stacks) at every layer holding all of them;
        then set_active(Fuse(*children)) trains it with the children frozen. Returns its Adapter (named 'a,b')."""
        from .composition import Fuse

        block = Fuse(*children, name=name)
        self._check_names(block.names())
        places = {n: set(self.adapters[n].paths) for n in block.names()}
        paths = [p for p, _ in self.layers() if all(p in where for where in places.values())]
        if not paths or any(where != set(paths) for where in places.values()):
            extra = {n: sorted(where - set(paths))[:3] for n, where in places.items() if where != set(paths)}
            raise ValueError(f"a fusion needs its adapters at the same modules; {block.names()} differ ({extra} hold "
                             "only some of them): fuse adapters added with the same targets")
        sites = {self.adapters[n].config.site if hasattr(self.adapters[n].config, "site") else None
                 for n in block.names()}
        if None in sites or len(sites) != 1:
            raise ValueError(f"Fuse combines activation adapters placed alike; {block.names()} are not")
        options = config.model_dump(exclude={"targets", "exclude"}) if config is not None else {}
        fusion = get_method("adapter_fusion").config(**{**options, "targets": paths, "site": sites.pop()})
        return self.add_adapter(block.name, fusion)

    def _check_names(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"unknown adapter '{n}'{did_you_mean(n, self.adapters)} "
                                 f"(adapters: {', '.join(self.adapters) or 'none'})")

    def set_active(self, setup: str | Sequence[str] | Block | dict) -> None:
        """Activate one adapter, several applied one after another (a list: a Stack), or any composition
        block (engine/composition.py). The active adapters train, except those under a Fuse: as in
        AdapterFusion, the fusion trains and the adapters it fuses stay frozen."""
        empty = isinstance(setup, (list, tuple)) and not setup  # no adapter active (the last one was deleted)
        block = None if empty else parse(setup)
        names = tuple(block.names()) if block is not None else ()
        fusions = _fusions(block) if block is not None else []
        self._check_names(names)
        for f in fusions:
            if f.name not in self.adapters:
                raise ValueError(f"{f!r} needs the fusion adapter '{f.name}': "
                                 f"dm.add_fusion({', '.join(map(repr, f.children))}) first")
        if len(prompts := [n for n in names if n in self.prompts]) > 1:
            raise ValueError(f"prompt adapters {prompts} cannot be active together (each prepends its own virtual "
                             "tokens); activate one, with any weight adapters: set_active(['prefix', 'lora'])")
        plain = block is None or (isinstance(block, Stack) and all(isinstance(c, str) for c in block))
        if prompts and not plain:
            raise ValueError(f"prompt adapter '{prompts[0]}' runs on the whole model, so it only stacks with other "
                             "adapters (a list), not inside composition blocks")
        frozen = {n for f in fusions for n in f.names()}
        trained = {n for n in names if n not in frozen} | {f.name for f in fusions}
        layers = list(self.layers())
        self.active = names + tuple(f.name for f in fusions)
        self.setup = None if plain else block
        for _, layer in layers:
            layer.active = tuple(n for n in self.active if n in layer.deltas)
            layer.setup = self.setup
        self.model.requires_grad_(False)  # the base stays frozen; only the active deltas train
        for _, layer in layers:
            for name, delta in layer.deltas.items():
                delta.requires_grad_(name in trained)
        for name, shared in self.shared.items():
            shared.requires_grad_(name in trained)
        for name, prompt in self.prompts.items():
            prompt.requires_grad_(name in trained)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block. Merged adapters are unmerged for it (unmerge
        restores the base weights) and merged again, in the same order, after it."""
        merged = [(layer, layer.merged) for _, layer in self.layers() if layer.merged]
        for layer, _ in merged:
            layer.unmerge()
        prompts_enabled, self.prompts_enabled = self.prompts_enabled, False
        try:
            with self._layers_set("enabled", False):
                yield
        finally:
            self.prompts_enabled = prompts_enabled
            for layer, names in merged:
                for n in names:
                    layer.merge(n)

    def delete_adapter(self, name: str) -> None:
        self._check_names([name])
        adapter = self.adapters.pop(name)
        if name in self.shared:
            del self.shared[name]
        if name in self.prompts:
            del self.prompts[name]
        for path in adapter.all_paths:
            layer = self.model.get_submodule(path)
            layer.unmerge(name)
            del layer.deltas[name]
            if not len(layer.deltas):
                self._unwrap(path)
            elif not any(getattr(d, "activation", False) for d in layer.deltas.values()):
                layer.remove_site()
        if self.setup is not None and name not in self.active:  # the composition does not use it: keep it
            self.set_active(self.setup)
            return
        active = [n for n in self.active if n != name]
        if self.setup is not None:
            warnings.warn(f"deleted adapter '{name}' of the active setup {self.setup!r}; the remaining adapters "
                          f"{active} are now stacked: call set_active() with another block", stacklevel=2)
        if not active and self.adapters and name in self.active:
            # as PEFT does: a model left with no active adapter would silently run as the base model
            active = [next(iter(self.adapters))]
            warnings.warn(f"deleted the active adapter '{name}'; activated '{active[0]}' (the first added that "
                          "remains): call set_active() to pick another", stacklevel=2)
        self.set_active(active)

    def _unwrap(self, path: str) -> None:
        parent, child = get_parent(self.model, path)
        layer = getattr(parent, child)
        layer.remove_site()
        setattr(parent, child, layer.base_layer)

    # --- merge -----------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None, safe_merge: bool = False
              ) -> dict[str, dict[str, RoundingError]]:
        """Fold adapters (default: the active ones) into the base weights; forward then skips them.

        safe_merge: merge into a copy of every layer first and raise, with the model unchanged, if any
        merged weight holds NaN or inf. Quantized layers (bitsandbytes) are dequantised, merged and requantised
        (unmerge restores their bytes exactly); what requantising lost is returned, adapter -> layer path ->
        RoundingError, and summed up in a warning. Float layers merge exactly and report nothing.
        """
        names = self._names(names)
        for name in names:
            if name in self.prompts:
                raise ValueError(f"adapter '{name}' ({self.adapters[name].method}) adds virtual tokens to the inputs "
                                 "and cannot be merged into weights; keep it unmerged, or merge only the weight "
                                 "adapters: dm.merge([...names])")
        if safe_merge:
            self._check_merge(names)
        report: dict[str, dict[str, RoundingError]] = {}
        for name in names:
            for path in self.adapters[name].all_paths:
                layer = self.model.get_submodule(path)
                layer.merge(name)
                if name in layer.rounding:
                    report.setdefault(name, {})[path] = layer.rounding[name]
        if report:
            worst = [e for per_layer in report.values() for e in per_layer.values()]
            warnings.warn(f"merged into {len(worst)} quantized layers: requantising moved the merged weights by up "
                          f"to {max(e.max_abs for e in worst):.3g} ({max(e.relative for e in worst):.2%} of their "
                          f"largest entry; up to {max(e.of_delta for e in worst):.2f} of the merged change's norm). "
                          "unmerge() restores the quantized bytes; merge_and_unload(dtype=torch.bfloat16) writes an "
                          "unrounded float model instead", stacklevel=2)
        return report

    def _check_merge(self, names: list[str]) -> None:
        per_layer: dict[str, list[str]] = {}
        for name in names:
            for path in self.adapters[name].all_paths:
                per_layer.setdefault(path, []).append(name)
        for path, layer_names in per_layer.items():
            self.model.get_submodule(path).check_merge(layer_names)

    def unmerge(self, names: str | Sequence[str] | None = None) -> None:
        """Restore the base weights (default: undo every merge)."""
        for name in reversed(self._names(names) if names is not None else list(self.adapters)):
            for path in self.adapters[name].all_paths:
                self.model.get_submodule(path).unmerge(name)

    def merge_and_unload(self, names: str | Sequence[str] | None = None, safe_merge: bool = False,
                         dtype: torch.dtype | None = None) -> nn.Module:
        """The plain model with `names` (default: active) merged in; the other adapters are dropped.
        safe_merge: as in merge(), checked before anything is dropped. dtype: every quantized (bitsandbytes)
        layer becomes a plain nn.Linear of that dtype holding its dequantised W0, and the adapters merge into
        it without requantising (None: they merge into the quantized layers, see merge())."""
        keep = self._names(names)
        if safe_merge:
            self._check_merge(keep)
        if dtype is not None:
            self._dequantize_base(dtype)
        if len(keep) < len(self.adapters):  # so that dropping the others activates nothing (and warns of nothing);
            self.set_active(keep)  # with nothing to drop, the model's requires_grad flags stay as the caller set them
        for name in [n for n in self.adapters if n not in keep]:
            self.delete_adapter(name)
        self.merge(keep)
        for path, _ in list(self.layers()):
            self._unwrap(path)
        self.adapters.clear()
        self.shared = nn.ModuleDict()
        self.prompts = nn.ModuleDict()
        self.active = ()
        return self.model

    def _dequantize_base(self, dtype: torch.dtype) -> None:
        """Replace every quantized layer by a float nn.Linear of `dtype` (merged adapters unmerged from it first)."""
        for _, layer in self.layers():
            if layer.quantized:
                merged = layer.merged
                layer.unmerge()
                layer.base_layer, layer.kind = dequantized_linear(layer.base_layer, dtype), LINEAR
                for n in merged:
                    layer.merge(n)
        dequantize(self.model, dtype)  # the quantized layers no adapter holds

    def _names(self, names: str | Sequence[str] | None) -> list[str]:
        names = list(self.active) if names is None else [names] if isinstance(names, str) else list(names)
        self._check_names(names)
        return names

    # --- state and accounting --------------------------------------------------------------
    def adapter_state_dict(self, name: str | None = None) -> dict[str, Tensor]:
        """Every tensor of one adapter (parameters and buffers), keyed '<layer path>.<tensor name>'."""
        name = name or self._only()
        self._check_names([name])
        state = {}
        for path in self.adapters[name].all_paths:
            delta = self.model.get_submodule(path).deltas[name]
            for key, t in delta.state_dict().items():
                state[f"{path}.{key}"] = t
        if name in self.shared:
            state.update({f"{SHARED}.{k}": t for k, t in self.shared[name].state_dict().items()})
        if name in self.prompts:
            state.update({f"{PROMPT}.{k}": t for k, t in self.prompts[name].state_dict().items()})
        return state

    def load_adapter_state_dict(self, state: dict[str, Tensor], name: str | None = None) -> None:
        name = name or self._only()
        _copy_state(self.adapter_state_dict(name), state, name)

    def _only(self) -> str:
        if len(self.active) == 1:
            return self.active[0]
        if len(self.adapters) == 1:
            return next(iter(self.adapters))
        raise ValueError(f"several adapters ({', '.join(self.adapters)}): name the one you mean")

    def _all_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.parameters()
        yield from self.shared.parameters()
        yield from self.prompts.parameters()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._all_parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        return sum(logical_numel(p) for p in self._all_parameters())

    # --- training hooks --------------------------------------------------------------------
    def regularization_loss(self) -> Tensor:
        """The sum of the active, unmerged deltas' extra loss terms (SORSA, qGOFT); add it to the task loss."""
        terms = [t for _, layer in self.layers() for n in layer.active if n not in layer.merged
                 if (t := layer.deltas[n].regularizer(layer)) is not None]
        terms += [t for n in self.active if n in self.prompts and (t := self.prompts[n].regularizer()) is not None]
        if not terms:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return torch.stack([t.float() for t in terms]).sum()

    def on_train_step(self, step: int) -> None:
        """Tell every delta that training step `step` begins (DyLoRA draws a rank, LaMDA freezes a factor)."""
        for _, layer in self.layers():
            for delta in layer.deltas.values():
                delta.on_step(step)
        for prompt in self.prompts.values():
            prompt.on_step(step)

    def after_update(self, step: int, total_steps: int | None = None) -> None:
        """Tell every trained adapter that the optimizer step of training step `step` is done (gradients still
        there): one Delta.after_update call per adapter, with its deltas in model order (AdaLoRA, IncreLoRA)."""
        for name in self.active:
            if name not in self.adapters or name in self.prompts:
                continue
            deltas = [d for p in self.adapters[name].paths for d in _members(self.model.get_submodule(p).deltas[name])]
            if deltas and any(p.requires_grad for d in deltas for p in d.parameters()):
                type(deltas[0]).after_update(deltas, self.shared[name] if name in self.shared else None,
                                             step, total_steps)

    def take_stale_state(self) -> list[tuple[Tensor, Tensor | None]]:
        """(parameter, source) for each parameter whose optimizer state a delta said went stale since the last call
        (Delta.mark_stale); an optimizer applies them with training.optimizers.remap_state."""
        return [s for _, layer in self.layers() for delta in layer.deltas.values() for s in delta.take_stale()]

    def parameter_table(self) -> list[dict[str, Any]]:
        """One row per (layer, adapter): method, base shape, its parameters and how many train."""
        rows = []
        for path, layer in self.layers():
            base_shape = (tuple(matrix_shape(layer.base_layer)) if layer.quantized  # not its packed bytes' shape
                          else tuple(getattr(weight_of(layer.base_layer), "shape", ())))
            for name, delta in layer.deltas.items():
                params = list(delta.parameters())
                rows.append({"layer": path, "adapter": name, "method": delta.method, "base_shape": base_shape,
                             "parameters": sum(p.numel() for p in params),
                             "trainable": sum(p.numel() for p in params if p.requires_grad)})
        for name, prompt in self.prompts.items():
            params = list(prompt.parameters())
            rows.append({"layer": PROMPT, "adapter": name, "method": prompt.method, "base_shape": (),
                         "parameters": sum(p.numel() for p in params),
                         "trainable": sum(p.numel() for p in params if p.requires_grad)})
        for name, shared in self.shared.items():
            params = list(shared.parameters())
            rows.append({"layer": SHARED, "adapter": name, "method": self.adapters[name].method, "base_shape": (),
                         "parameters": sum(p.numel() for p in params),
                         "trainable": sum(p.numel() for p in params if p.requires_grad)})
        return rows

    def print_parameters(self, per_layer: bool = False) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="deltatune parameters")
        for col in ("layer", "adapter", "method", "base shape", "parameters", "trainable"):
            table.add_column(col, justify="right" if col in ("parameters", "trainable") else "left")
        rows = self.parameter_table()
        if not per_layer:  # one line per adapter and method
            merged: dict[tuple[str, str], dict[str, Any]] = {}
            for r in rows:
                m = merged.setdefault((r["adapter"], r["method"]), {**r, "layer": 0, "parameters": 0, "trainable": 0})
                m["layer"] += 1
                m["parameters"] += r["parameters"]
                m["trainable"] += r["trainable"]
            rows = [{**m, "layer": f"{m['layer']} layers", "base_shape": ""} for m in merged.values()]
        for r in rows:
            table.add_row(str(r["layer"]), r["adapter"], r["method"], str(r["base_shape"] or ""),
                          f"{r['parameters']:,}", f"{r['trainable']:,}")
        console = Console()
        console.print(table)
        console.print(self.summary())

    def summary(self) -> str:
        t, n = self.trainable_parameters(), self.total_parameters()
        return f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"

    # --- files -----------------------------------------------------------------------------
    def save(self, path: Any, name: str | None = None) -> None:
        """Write adapter `name` as safetensors + deltatune_config.json (atomic)."""
        from .io import save_adapter

        save_adapter(self, path, name or self._only())

    def load_adapter(self, path: Any, name: str | None = None, check_base: bool = True,
                     check_integrity: bool = True) -> Adapter:
        """Load a saved adapter; check_integrity=False accepts files whose checksums differ (hand-edited)."""
        from .io import load_adapter

        return load_adapter(self, path, name, check_base, check_integrity)

    def save_adapters(self, path: Any) -> None:
        """Write every adapter (a subfolder each) and the active setup, e.g. a Fuse block, to `path`."""
        from .io import save_adapter_set

        save_adapter_set(self, path)

    def load_adapters(self, path: Any, check_base: bool = True, check_integrity: bool = True) -> None:
        """Load a folder written by save_adapters: its adapters, then its active setup."""
        from .io import load_adapter_set

        load_adapter_set(self, path, check_base, check_integrity)

    def export_peft(self, path: Any, name: str | None = None) -> None:
        """Write adapter `name` in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        from .peft_format import export_peft

        export_peft(self, path, name or self._only())

    def load_peft(self, path: Any, name: str = "default") -> Adapter:
        from .peft_format import load_peft

        return load_peft(self, path, name)

    def load_adapterhub(self, path: Any, name: str | None = None) -> Adapter:
        """Import an adapter (or AdapterFusion) folder saved by AdapterHub's `adapters` (safetensors form)."""
        from .adapterhub import import_adapterhub

        return import_adapterhub(self, path, name)

    def export_adapterhub(self, path: Any, name: str | None = None) -> None:
        """Write adapter `name` (bottleneck, Compacter or fusion) as a folder AdapterHub's load_adapter reads."""
        from .adapterhub import export_adapterhub

        export_adapterhub(self, path, name or self._only())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """transformers' name for dt.enable_gradient_checkpointing, so that it goes through the engine: calling the
        wrapped model's own would recompute without this call's adapter state (mixed rows, token masks,
        disabled()) and give wrong gradients. Always non-reentrant; a use_reentrant=True request is refused."""
        from .checkpointing import enable_gradient_checkpointing

        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("deltatune checkpoints non-reentrantly only (the reentrant form loses the adapters' "
                             "per-call state); drop use_reentrant=True")
        enable_gradient_checkpointing(self)

    activation_checkpointing_enable = gradient_checkpointing_enable  # its name from transformers 5 on

    def prepare_for_hotswap(self, target_rank: int | None = None, names: str | Sequence[str] | None = None) -> None:
        """Before torch.compile: pad LoRA/DoRA factors to `target_rank` with zeros and hold their scales as
        tensors, so that adapters of lower rank or another alpha hot-swap without recompiling (engine/hotswap.py)."""
        from .hotswap import prepare_for_hotswap

        prepare_for_hotswap(self, target_rank, names)

    def hotswap_adapter(self, source: Any, name: str = "default", check_base: bool = True,
                        check_integrity: bool = True) -> Adapter:
        """Replace adapter `name`'s weights in place with those of `source` (a deltatune or PEFT adapter folder,
        or a state dict), after checking it is the same method on the same layers: a compiled model runs it
        without recompiling."""
        from .hotswap import hotswap_adapter

        return hotswap_adapter(self, source, name, check_base, check_integrity)


def _members(delta: Delta) -> list[Delta]:
    """A delta, or each part of a Parts delta (MultiheadAttention's in_proj and out_proj)."""
    return [d for _, _, d in delta.members(None)] if isinstance(delta, Parts) else [delta]


def _fusions(block: Block) -> list[Any]:
    """Every Fuse block in a setup."""
    from .composition import Fuse

    found = [block] if isinstance(block, Fuse) else []
    for child in block:
        if isinstance(child, Block):
            found += _fusions(child)
    return found


def inject(model: nn.Module, config: DeltaConfig, name: str = "default", train_modules: Any = None) -> DeltaModel:
    """Inject adapter `name` into `model` (in place) and return the DeltaModel that manages it."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    dm.add_adapter(name, config, train_modules)
    return dm


def load(model: nn.Module, path: Any, name: str | None = None, check_base: bool = True,
         check_integrity: bool = True) -> DeltaModel:
    """Load a saved deltatune adapter onto `model`; checks shapes, checksums and the base model's identity."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    dm.load_adapter(path, name, check_base, check_integrity)
    return dm


def load_adapters(model: nn.Module, path: Any, check_base: bool = True, check_integrity: bool = True) -> DeltaModel:
    """Load a set of adapters with its composition (DeltaModel.save_adapters) onto `model`."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    dm.load_adapters(path, check_base, check_integrity)
    return dm


def load_peft(model: nn.Module, path: Any, name: str = "default") -> DeltaModel:
    """Load a PEFT LoRA/DoRA adapter directory onto `model`."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    dm.load_peft(path, name)
    return dm
