"""`deltatune merge` configs: which models to merge, how, per-tensor overrides, and where the result goes.

    deltatune merge merge.yaml                      # run it
    deltatune merge merge.yaml parameters.density=0.3 output.path=out2   # with dotted overrides

```yaml
method: ties                  # a preset of deltatune.merging.MERGE_METHODS, or linear (a weighted soup)
base_model: smollm2           # theta_0: a model folder or a built-in (minilm, smollm2)
models:
  - {path: ft1, weight: 0.5}
  - model: ft2                # mergekit's spelling works too: model, and per-model parameters
    parameters: {weight: 0.5, density: 0.7}   # this model's own weight, density, gamma, epsilon
parameters: {density: 0.5}    # fields of TaskVectorMerge, on top of the preset
overrides:                    # per tensor, the first matching pattern wins
  - {pattern: "re:.*mlp.*", parameters: {density: 0.3}}
output: {path: merged, dtype: bfloat16, max_shard_size: 2GB}
```

For one tensor and one model the parameters resolve as: preset < `parameters` < the first matching override's
`parameters` < the model's own `parameters` (as in mergekit, a model's own value wins).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from deltatune.engine.registry import did_you_mean
from deltatune.merging.checkpoint import parse_size
from deltatune.merging.task_arithmetic import (
    MERGE_METHODS,
    NEEDS_IMPORTANCE,
    PER_MODEL,
    Balance,
    TaskVectorMerge,
    get_merge_method,
)
from deltatune.training.recipe import Section, apply_override, describe, read_mapping, unknown_key, validated

LINEAR = "linear"  # model soup: needs no base model and takes no parameters


def method_names() -> list[str]:
    return [*MERGE_METHODS, LINEAR]


def methods_help() -> list[str]:
    """One line per merge method, from MERGE_METHODS (so help lists every registered preset)."""
    rows = [(name, f"{m.pretty_name or name}  {m.url}".rstrip()) for name, m in MERGE_METHODS.items()]
    rows.append((LINEAR, "a weighted model soup: needs no base model, takes no parameters"))
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {what}" for name, what in rows]


class ModelEntry(Section):
    path: str = Field(description="a Hugging Face model folder (safetensors), a deltatune or PEFT adapter "
                      "folder, or a built-in model: minilm, smollm2")
    weight: float = Field(1.0, description="the model's weight w_i")
    fisher: str | None = Field(None, description="a .safetensors file of per-tensor importance (e.g. "
                               "diagonal Fisher), names and shapes as the model's; null = none")
    parameters: dict[str, float] = Field({}, description="this model's own " + ", ".join(PER_MODEL) +
                                         " (over the method's parameters and overrides), as mergekit's "
                                         "per-model parameters; a `weight` here is the model's weight")

    @model_validator(mode="before")
    @classmethod
    def _mergekit_spelling(cls, data: Any) -> Any:
        """mergekit's `model: x` for path, and its `parameters: {weight: w}` for weight."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "model" in data:
            if "path" in data:
                raise ValueError("give a model's path once: `path` or mergekit's `model`, not both")
            data["path"] = data.pop("model")
        params = data.get("parameters")
        if isinstance(params, dict) and "weight" in params:
            if "weight" in data:
                raise ValueError("give a model's weight once: `weight` or `parameters.weight`, not both")
            params = dict(params)
            data["weight"], data["parameters"] = params.pop("weight"), params
        return data


class Override(Section):
    pattern: str = Field(description="tensors it applies to: a name or dotted suffix "
                         "('mlp.down_proj.weight'), or 're:<regex>' matching the whole name")
    parameters: dict[str, Any] = Field({}, description="merge parameters for these tensors, over the global "
                                       "ones")
    weights: list[float] | None = Field(None, description="one weight per model for these tensors; null = "
                                        "the models' weights")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"override pattern {pattern!r} is not a valid regex: {e}") from None
        return pattern


class OutputSection(Section):
    path: str = Field(description="the output folder; it must not exist or be empty (see overwrite)")
    dtype: Literal["same", "float32", "float16", "bfloat16"] = Field(
        "same", description="dtype of the merged float tensors; same = the base's")
    max_shard_size: int | str = Field(
        "2GB", description="largest shard: bytes, or '2GB' (10^9), '500MiB' (2^20)")
    format: Literal["auto", "hf", "deltatune", "peft"] = Field(
        "auto", description="hf for checkpoints; deltatune or peft for adapters; auto = as the inputs")
    overwrite: bool = Field(
        False, description="replace a non-empty output folder (once the merge has succeeded)")
    rank: int | None = Field(None, ge=1, description="adapter merges: truncate the merged delta to this rank")
    energy: float | None = Field(
        None, gt=0, le=1, description="adapter merges: keep this share of the spectrum instead")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, size: int | str) -> int | str:
        try:
            parse_size(size)
        except ValueError as err:
            raise ValueError(f"output.max_shard_size: {err}") from None
        return size

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


class MergeConfig(Section):
    """One merge: theta = theta_0 + lambda * combine_i(w_i * sparsify(theta_i - theta_0)), per tensor."""

    method: str = Field("task_arithmetic", description="a merge method: " + ", ".join(method_names()))
    base_model: str | None = Field(
        None, description="theta_0, a model folder or built-in; linear: only where config and tokenizer "
        "come from (default: the first model)")
    models: list[ModelEntry] = Field(min_length=1, description="the fine-tuned models (or adapters) to merge")
    parameters: dict[str, Any] = Field(
        {}, description="TaskVectorMerge fields (density, lambda_, ...) over the preset's")
    overrides: list[Override] = Field(
        [], description="per-tensor parameters or weights; the first match wins")
    seed: int = Field(
        0, description="seed of the random sparsifiers (DARE, DELLA), mixed with each tensor name")
    output: OutputSection = Field(description="where and how the merged model is written")

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        if self.method not in method_names():
            raise ValueError(f"unknown method '{self.method}'{did_you_mean(self.method, method_names())} "
                             f"(known: {', '.join(method_names())})")
        methods = [self.merge_method(self.parameters, "parameters")]
        for i, override in enumerate(self.overrides):
            where = f"overrides.{i}.parameters"
            methods.append(self.merge_method({**self.parameters, **override.parameters}, where))
            if override.weights is not None and len(override.weights) != len(self.models):
                raise ValueError(f"overrides.{i}.weights has {len(override.weights)} entries; give one per "
                                 f"model ({len(self.models)})")
        self._check_model_parameters(methods)
        with_fisher = [i for i, m in enumerate(self.models) if m.fisher]
        if with_fisher and self.method == LINEAR:
            raise ValueError("fisher files weight task vectors: use a task-vector method (fisher), not "
                             "linear")
        if not with_fisher and any(m is not None and m.balance is Balance.fisher for m in methods):
            raise ValueError(NEEDS_IMPORTANCE)
        if with_fisher and len(with_fisher) != len(self.models):
            raise ValueError(f"models {with_fisher} have a fisher file and the others do not: give "
                             "every model one, or none")
        return self

    def model_parameters(self) -> tuple[dict[str, float], ...] | None:
        """Each model's own parameters, for TaskVectorMerge.merge_tensor; None when no model has any."""
        params = tuple(dict(m.parameters) for m in self.models)
        return params if any(params) else None

    def _check_model_parameters(self, methods: list[TaskVectorMerge | None]) -> None:
        for i, m in enumerate(self.models):
            where = f"models.{i}.parameters"
            unknown = sorted(m.parameters.keys() - set(PER_MODEL))
            if unknown:
                raise ValueError(unknown_key(where, unknown[0], ["weight", *PER_MODEL]) +
                                 f" (a model's own parameters are weight, {', '.join(PER_MODEL)})")
            if m.parameters and self.method == LINEAR:
                raise ValueError(f"method 'linear' takes only a weight per model, not {where} "
                                 f"{sorted(m.parameters)}; use a task-vector method such as ties")
            for method in methods:  # with the global parameters and with each override's
                if method is None or not m.parameters:
                    continue
                params = [{}] * len(self.models)
                params[i] = m.parameters
                try:
                    method.for_models(params, len(self.models))
                except ValueError as err:
                    raise ValueError(f"{where}: {str(err).replace(f' of model {i}', '')}") from None

    def merge_method(self, parameters: dict[str, Any], where: str = "parameters") -> TaskVectorMerge | None:
        """The validated method for these parameters; None for linear (a soup has no parameters)."""
        if self.method == LINEAR:
            if parameters:
                raise ValueError(f"method 'linear' takes no {where} (got {sorted(parameters)}); remove them "
                                 "or use a task-vector method such as task_arithmetic")
            return None
        unknown = sorted(parameters.keys() - TaskVectorMerge.model_fields.keys())
        if unknown:
            raise ValueError(unknown_key(where, unknown[0], list(TaskVectorMerge.model_fields)))
        try:
            return get_merge_method(self.method, **parameters)
        except ValidationError as e:
            raise ValueError(describe(e, TaskVectorMerge, (where,))) from None

    def to_yaml(self) -> str:
        """The resolved config as YAML that `load_merge_config` reads back to an equal config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def validate_merge_config(data: dict) -> MergeConfig:
    """A `MergeConfig` from plain data, or a one-line ValueError."""
    return validated(MergeConfig, data)


def load_merge_config(path: str | Path, overrides: list[str] = ()) -> MergeConfig:
    """Read a merge config file, apply dotted `key=value` overrides, validate."""
    data = read_mapping(path, "merge config")
    for item in overrides:
        apply_override(data, item)
    return validate_merge_config(data)
