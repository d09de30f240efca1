"""Hot-swap: replace a loaded adapter's weights in place, so a torch.compile'd model runs another adapter
without recompiling (what PEFT's hotswap_adapter and prepare_model_for_compiled_hotswap do for its LoRA).

torch.compile guards on what a graph read from Python: a Python float such as LoRA's scale alpha / r is
baked into the graph (a new value recompiles), and so is every tensor's shape. Parameters and buffers are
graph inputs, so new values copied into the same tensors run through the same graph. Hence:

* `hotswap_adapter` copies the new adapter's tensors into the existing ones (same objects, `copy_`), after
  checking it is the same method, on the same layers, with the same options and fitting shapes;
* `prepare_for_hotswap` (call it before compiling) pads LoRA/DoRA factors with zero rows of A and zero
  columns of B up to a target rank (B A is unchanged) and turns each layer's scale into a 0-dim buffer, so
  adapters of a lower rank or another alpha then swap in by value.

The adapter's record (`dm.adapters[name].config`) always describes the tensors it holds (a padded rank
included), so `save`/`export_peft` after a swap write an adapter that loads back to the same outputs. The
deltas' own configs are left alone: compiled graphs guard on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import CONFIG_NAME, adapter_config, check_base, read_adapter
from .layer import Delta, Parts
from .peft_format import CONFIG_NAME as PEFT_CONFIG_NAME
from .peft_format import read_peft
from .registry import DeltaConfig, method_of

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

PADDABLE = ("lora", "dora")  # methods whose rank lives only in the shapes of their factors, scale alpha/r
RANK_ROWS = ("lora_A", "lora_A0")  # (r, d_in) factors (A0: PiSSA's frozen copy): padded with zero rows
RANK_COLS = ("lora_B", "lora_B0")  # (d_out, r) factors: padded with zero columns
SCALE_OPTIONS = {"r", "alpha", "rslora", "rank_pattern", "alpha_pattern"}  # checked per layer, not as options
INIT_ONLY = {"init"}  # only sets the starting values (PiSSA's extra buffers are checked as tensors)


@dataclass
class Member:
    """One low-rank delta of an adapter: where its tensors sit in the adapter's state, and the layer it adapts."""

    key: str  # state-dict prefix: '<layer path>.' ('<path>.main.' / '<path>.parts.<child>.' on MultiheadAttention)
    path: str  # the adapted layer's path (rank_pattern / alpha_pattern keys)
    delta: Delta

    @property
    def rank(self) -> int:
        return self.delta.lora_A.shape[0]

    @property
    def prepared(self) -> bool:
        return isinstance(self.delta.scale, Tensor)


def members(dm: DeltaModel, name: str) -> list[Member]:
    out = []
    for path in dm.adapters[name].paths:
        top = dm.model.get_submodule(path).deltas[name]
        if isinstance(top, Parts):
            out.append(Member(f"{path}.main.", path, top.main))
            out += [Member(f"{path}.parts.{child}.", f"{path}.{child}", d) for child, d in top.parts.items()]
        else:
            out.append(Member(f"{path}.", path, top))
    return out


def _require_unmerged(dm: DeltaModel, name: str, what: str) -> None:
    merged = [p for p in dm.adapters[name].all_paths if name in dm.model.get_submodule(p).merged]
    if merged:
        raise ValueError(f"adapter '{name}' is merged into {merged[:3]}: unmerge() before {what} (its weights "
                         "are folded into the base there, and changing them would corrupt the base on unmerge)")


# --- prepare ---------------------------------------------------------------------------------
def prepare_for_hotswap(dm: DeltaModel, target_rank: int | None = None, names: str | Sequence[str] | None = None
                        ) -> None:
    """Make adapters `names` (default: all) take any adapter of rank <= target_rank and any alpha by value.

    Pads each LoRA/DoRA layer's factors with zeros to `target_rank` (None: each keeps its rank) and makes its
    scale a tensor buffer. The outputs do not change. Call it before torch.compile and before building an
    optimizer: the padded factors are new Parameter objects. Other methods cannot be prepared (a clear error);
    they hot-swap without it when the new adapter has the same options.
    """
    names = dm._names(names) if names is not None else list(dm.adapters)
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int)
                                    or target_rank < 1):
        raise ValueError(f"target_rank must be a positive int (the largest rank to swap in), got {target_rank!r}")
    for name in names:  # check everything first, so that an error leaves the model unchanged
        method = dm.adapters[name].method
        if method not in PADDABLE:
            raise ValueError(f"prepare_for_hotswap pads the factors and scale of {'/'.join(PADDABLE)} adapters; "
                             f"'{name}' is {method}, which has no such rank and scale: hot-swap {method} adapters "
                             "with identical options without preparing (or pass names= without it)")
        _require_unmerged(dm, name, "preparing it for hot-swaps")
        for m in members(dm, name):
            if target_rank is None or target_rank == m.rank:
                continue
            if target_rank < m.rank:
                top = max(x.rank for x in members(dm, name))
                raise ValueError(f"target_rank={target_rank} is below the rank {m.rank} of adapter '{name}' at "
                                 f"'{m.path}'; use target_rank >= {top}")
            if m.delta.groups > 1:
                raise ValueError(f"cannot pad the rank of adapter '{name}' at '{m.path}': on a grouped convolution "
                                 f"(groups={m.delta.groups}) B's columns are split among the groups; exclude it "
                                 "or keep target_rank=None")
    for name in names:
        held = members(dm, name)
        for m in held:
            if target_rank is not None:
                _pad_factors(m.delta, target_rank)
            _scale_to_buffer(m.delta)
        dm.adapters[name].config = held_config(dm.adapters[name].config, held)


@torch.no_grad()
def _pad_factors(delta: Delta, rank: int) -> None:
    for key in RANK_ROWS + RANK_COLS:
        t = getattr(delta, key, None)
        if t is None:
            continue
        padded = pad_rank(t.detach(), key, rank)
        setattr(delta, key, nn.Parameter(padded, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                else padded)


def pad_rank(t: Tensor, key: str, rank: int) -> Tensor:
    """Factor `key` with zeros appended along its rank dim up to `rank` (rows of A, columns of B)."""
    extra = rank - (t.shape[0] if key in RANK_ROWS else t.shape[1])
    return F.pad(t, (0, 0, 0, extra) if key in RANK_ROWS else (0, extra))


def _scale_to_buffer(delta: Delta) -> None:
    if isinstance(delta.scale, Tensor):
        return
    scale = delta.__dict__.pop("scale")  # a plain attribute: a buffer of that name cannot be registered over it
    # a buffer follows .to(device); not persistent, so the saved state (and its format) stay as they were
    delta.register_buffer("scale", torch.tensor(scale, dtype=delta.lora_A.dtype, device=delta.lora_A.device),
                          persistent=False)


def held_config(config: DeltaConfig, held: list[Member]) -> DeltaConfig:
    """`config` with r / alpha (and per-layer patterns where layers differ) describing the ranks and scales the
    deltas now hold, so that saving and loading the adapter gives it back as it is."""
    def alpha_for(r: int, s: float) -> float:  # the config's own alpha where it gives this scale exactly
        known = [config.alpha, *config.alpha_pattern.values()]
        return next((a for a in known if config.scale_at(r, a) == s), s * (math.sqrt(r) if config.rslora else r))

    layers = [(m.path, m.rank, float(m.delta.scale)) for m in held]
    r0, s0 = layers[0][1], layers[0][2]
    alpha0 = alpha_for(r0, s0)
    ranks = {p: r for p, r, _ in layers if r != r0}
    alphas = {p: a for p, r, s in layers if (a := alpha_for(r, s)) != alpha0}
    return config.model_copy(update={"r": r0, "alpha": alpha0, "rank_pattern": ranks, "alpha_pattern": alphas})


# --- hot-swap --------------------------------------------------------------------------------
def hotswap_adapter(dm: DeltaModel, source: Any, name: str = "default", verify_base: bool = True,
                    check_integrity: bool = True) -> Adapter:
    """Copy a saved adapter (deltatune or PEFT folder, or a state dict of this adapter's keys) into adapter
    `name`'s tensors in place. Nothing changes unless every check passes."""
    dm._check_names([name])
    adapter = dm.adapters[name]
    _require_unmerged(dm, name, "hot-swapping it")
    config, train_modules, state, where, prints = _read_source(dm, source, adapter, verify_base, check_integrity)
    _check_same_adapter(adapter, config, train_modules, where)
    held = members(dm, name) if adapter.method in PADDABLE else []
    state, scales = dict(state), []
    for m in held:
        r, alpha = config.for_layer(m.path)
        scale = config.scale_at(r, alpha)
        incoming = state.get(m.key + "lora_A")
        rank = r if incoming is None else incoming.shape[0]
        if rank != m.rank and not (m.prepared and rank < m.rank):
            raise ValueError(f"'{where}' has rank {rank} at '{m.path}' where adapter '{name}' holds "
                             f"{'at most ' if m.prepared else ''}{m.rank}: call dm.prepare_for_hotswap(target_rank="
                             f"{max(rank, m.rank)}) before torch.compile (it then takes every rank up to that)")
        if not m.prepared and scale != m.delta.scale:
            raise ValueError(f"'{where}' scales '{m.path}' by {scale:g} (alpha/r) where adapter '{name}' holds "
                             f"{m.delta.scale:g} as a Python float, which a compiled graph bakes in: call "
                             "dm.prepare_for_hotswap() before torch.compile to hold it as a tensor")
        for key in RANK_ROWS + RANK_COLS:
            if m.key + key in state and m.prepared:
                state[m.key + key] = pad_rank(state[m.key + key], key, m.rank)
        scales.append((m, scale))
    _copy_into(dm, name, state, where)
    with torch.no_grad():
        for m, scale in scales:
            if m.prepared:
                m.delta.scale.fill_(scale)
    adapter.config = held_config(config, held) if held else config
    adapter.fingerprints = prints if prints is not None else adapter.fingerprints
    return adapter


def _read_source(dm: DeltaModel, source: Any, adapter: Adapter, verify_base: bool, check_integrity: bool
                 ) -> tuple[DeltaConfig, list[str], dict[str, Tensor], str, dict[str, str] | None]:
    """(config, train modules, state, what to call it in errors, base fingerprints or None) of `source`."""
    if isinstance(source, Mapping):  # a state dict in this adapter's layout (adapter_state_dict's keys)
        return adapter.config, adapter.train_modules, dict(source), "the given state dict", None
    path = Path(source)
    if (path / PEFT_CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file():
        config, heads, state = read_peft(dm, path)
        return config, heads or [], state, str(path), None
    meta, tensors = read_adapter(path, check_integrity)
    if verify_base:
        check_base(dm, meta, path)
    return adapter_config(meta, path), meta["train_modules"], tensors, str(path), meta["base_model"]["fingerprints"]


def _check_same_adapter(adapter: Adapter, config: DeltaConfig, train_modules: list[str], where: str) -> None:
    """Same method, layers, train modules and options (ranks and scales are checked per layer)."""
    method = method_of(config).name
    if method != adapter.method:
        raise ValueError(f"'{where}' is a {method} adapter but '{adapter.name}' is {adapter.method}: a hot-swap "
                         "replaces weights only; load it as another adapter (dm.load_adapter(path, name=...)) or "
                         f"swap in a {adapter.method} adapter")
    for what, have, new in (("layers", adapter.paths, list(config.targets)),
                            ("train modules", adapter.train_modules, list(train_modules))):
        missing, extra = sorted(set(have) - set(new)), sorted(set(new) - set(have))
        if missing or extra:
            diff = "; ".join(f"{k} {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in
                             (("it lacks", missing), ("it adds", extra)) if v)
            raise ValueError(f"'{where}' adapts other {what} than adapter '{adapter.name}' ({diff}): a hot-swap "
                             "cannot add or drop layers of a compiled model; load it as another adapter instead")
    free = SCALE_OPTIONS | INIT_ONLY if method in PADDABLE else set()
    skip = {"targets", "exclude"} | free
    have, new = adapter.config.model_dump(exclude=skip), config.model_dump(exclude=skip)
    differ = {k: (have[k], new[k]) for k in have if have[k] != new[k]}
    if differ:
        listed = ", ".join(f"{k}={a!r} here, {b!r} there" for k, (a, b) in differ.items())
        raise ValueError(f"'{where}' has other options than adapter '{adapter.name}' ({listed}): a hot-swap keeps "
                         "the adapter's modules and options; load it as another adapter, or swap in one saved "
                         "with the same options")


def _copy_into(dm: DeltaModel, name: str, state: dict[str, Tensor], where: str) -> None:
    from .model import StateMismatch, _copy_state

    try:
        _copy_state(dm.adapter_state_dict(name), state, name)
    except StateMismatch as err:
        raise ValueError(f"'{where}' does not fit adapter '{name}': {err}; swap in an adapter of the same method "
                         "and layers, saved from this base model") from None
