"""Choose the modules a delta goes into: by name, regex, type or predicate."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from .kinds import SUPPORTED, bypassed, target_kind
from .layer import DeltaLayer
from .registry import did_you_mean

# Sensible defaults per architecture (HF `config.model_type`), as PEFT users expect.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "mpnet": ["q", "v"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def named_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of the user's model, seeing a DeltaLayer as the layer it wraps (and its submodules under the
    layer's own path: a LoRA on q_proj inside an attention module that an adaption prompt wraps)."""
    for path, module in _walk(model, ""):
        yield path, module.base_layer if isinstance(module, DeltaLayer) else module


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    """(path, DeltaLayer) of every wrapped layer, with the user's paths (no 'base_layer' segments), outer first."""
    for path, module in _walk(model, ""):
        if isinstance(module, DeltaLayer):
            yield path, module


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        yield from _walk(child.base_layer if isinstance(child, DeltaLayer) else child, path)


def matcher(spec: Any) -> Callable[[str, nn.Module], bool]:
    if isinstance(spec, str) and spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return lambda path, m: pattern.fullmatch(path) is not None
    if isinstance(spec, str):
        return lambda path, m: path == spec or path.endswith("." + spec)
    if isinstance(spec, type):
        return lambda path, m: isinstance(m, spec)
    if callable(spec):
        return lambda path, m: bool(spec(path, m))
    raise TypeError(f"cannot target modules with {spec!r}: use a name, 're:<regex>', a module type or a predicate")


def _as_list(spec: Any) -> list[Any]:
    return list(spec) if isinstance(spec, (list, tuple, set)) else [spec]


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(f"no targets given and no default for model type {model_type!r}; "
                     "set targets=[...] (e.g. the names of the attention projections)")


def _no_match_error(spec: Any, paths: list[str]) -> ValueError:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if isinstance(spec, str) and not spec.startswith("re:"):
        close = difflib.get_close_matches(spec.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.4)
        close += difflib.get_close_matches(spec, paths, n=3, cutoff=0.6)
    else:
        close = leaves[:8]
    hint = f"; closest module names: {', '.join(dict.fromkeys(close))}" if close else ""
    return ValueError(f"target {spec!r} matches no module of the model{hint}")


def resolve(model: nn.Module, targets: Any, exclude: Any = None, *, need_kind: bool = True) -> list[str]:
    """Paths of the modules selected by `targets` minus `exclude`; a clear error for every miss."""
    specs = _as_list(default_targets(model) if targets is None else targets)
    layers = list(named_layers(model))
    paths = [p for p, _ in layers]
    excluded = [matcher(s) for s in _as_list(exclude)] if exclude is not None else []
    modules = dict(layers)

    def why_bypassed(path: str) -> str | None:
        parent, _, child = path.rpartition(".")
        return bypassed(modules[parent] if parent else model, child)

    chosen: dict[str, None] = {}
    for spec in specs:
        match = matcher(spec)
        hits = [(p, m) for p, m in layers if match(p, m)]
        if not hits:
            raise _no_match_error(spec, paths)
        for p, m in hits:
            if (why := why_bypassed(p)) is not None and not any(ex(p, m) for ex in excluded):
                raise ValueError(f"target {spec!r} selects '{p}': {why} (or exclude '{p}')")
        if need_kind:
            # A name that selects containers (e.g. "attention") means the supported layers inside them
            # (not those whose forward the container bypasses: it adapts them itself, or cannot).
            hits = [(p, m) for p, m in hits if target_kind(m) is not None] or [
                (p, m) for p, m in layers if target_kind(m) is not None and why_bypassed(p) is None
                and any(p.startswith(h + ".") for h, _ in hits)]
            if not hits:
                raise ValueError(f"target {spec!r} selects no layer a weight delta can adapt ({SUPPORTED})")
        for p, m in hits:
            if not any(ex(p, m) for ex in excluded):
                chosen[p] = None
    if not chosen:
        raise ValueError(f"targets {targets!r} minus exclude {exclude!r} leave no module to adapt")
    return list(chosen)


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path`'s last part: inside a wrapped layer, the module it wraps."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return (parent.base_layer if isinstance(parent, DeltaLayer) else parent), child


def require_layers(model: nn.Module, paths: list[str], source: str) -> None:
    """A clear error when `source` (a checkpoint) names a layer that `model` lacks."""
    layers = dict(named_layers(model))
    for p in paths:
        if p not in layers:
            raise ValueError(f"{source} was saved for a model with layer '{p}', which this model "
                             f"({type(model).__name__}) lacks{did_you_mean(p, layers)}")
