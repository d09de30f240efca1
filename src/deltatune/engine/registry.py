"""Method registry and the config base class every method config derives from."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def closest(word: str, choices: Any) -> str | None:
    """The choice most like `word`, or None; a shared prefix counts (difflib rates 'r' far from 'rank')."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    prefixes = [c for c in choices if word.startswith(c)]
    if prefixes and (not close or close[0].startswith(word)):  # 'rank' is r spelt out, not rank_pattern cut short
        return max(prefixes, key=len)
    return close[0] if close else None


def did_you_mean(word: str, choices: Any, prefix: str = "") -> str:
    """"; did you mean 'x'?" for the closest choice, or ''."""
    match = closest(word, choices)
    return f"; did you mean '{prefix}{match}'?" if match else ""


class DeltaConfig(BaseModel):
    """Fields shared by every method: where the delta goes."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    targets: Any = Field(
        default=None,
        description="modules to adapt: names (matched as a dotted-path suffix), 're:<regex>' (full match), "
        "module types or a predicate (path, module) -> bool; None = the architecture's default",
    )
    exclude: Any = Field(default=None, description="modules to leave alone, same forms as targets")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise ValueError(f"unknown option '{key}' for {cls.__name__}{did_you_mean(key, cls.model_fields)}")
        return data


class UnionConfig(DeltaConfig):
    """An adapter made of several methods' deltas under one name (AdapterHub's ConfigUnion; the MAM adapter):
    the engine builds each part as if it were the adapter and keeps them as one (one name, one save, one switch).
    Parts must touch different modules; `targets`/`exclude` are the layer parts' own."""

    def parts(self) -> list[DeltaConfig]:
        raise NotImplementedError

    def with_prompt(self, prompt: DeltaConfig) -> UnionConfig:
        """This config with its prompt part's config replaced by `prompt` (what fold_prompt() left)."""
        raise NotImplementedError(f"{type(self).__name__} cannot record a folded prompt part")


class UnionParts:
    """The delta class a UnionConfig registers with: it is never built itself, only its parts are."""

    mergeable = False
    model_level = False


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its config, its delta module and what `deltatune methods` shows."""

    name: str
    config: type[DeltaConfig]
    delta: type
    family: str
    formula: str  # trainable parameters of one d_out x d_in layer
    paper: str
    summary: str


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, config: type[DeltaConfig], family: str, formula: str, paper: str, summary: str
             ) -> Callable[[type], type]:
    """Class decorator: register a Delta subclass under `name`."""

    def wrap(delta_cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = MethodSpec(name, config, delta_cls, family, formula, paper, summary)
        delta_cls.method = name
        config.method = name
        return delta_cls

    return wrap


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'{did_you_mean(name, _METHODS)} "
                         f"(known: {', '.join(sorted(_METHODS))})") from None


def method_of(config: DeltaConfig) -> MethodSpec:
    for spec in _METHODS.values():
        if type(config) is spec.config:
            return spec
    raise TypeError(f"{type(config).__name__} is not the config of a registered method")


def list_methods() -> list[MethodSpec]:
    return sorted(_METHODS.values(), key=lambda s: (s.family, s.name))


def make_config(name: str, **options: Any) -> DeltaConfig:
    """Build and validate the config of method `name` from plain options (a recipe, the CLI)."""
    return get_method(name).config(**options)
