"""`deltatune prune` configs: frozen sections that reject unknown keys, read from YAML plus `a.b=v` overrides.

A config names a model, the calibration and held-out evaluation data, a list of compression steps
applied in order, optional PERP recovery, and where the result goes. Each step is a small frozen model
keyed by its `method`, and knows whether it needs calibration data and how to apply itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator
from torch import nn

from deltatune.engine.registry import did_you_mean
from deltatune.training.recipe import ModelSection, Section, apply_override, describe, read_mapping, validated

Batches = list[dict[str, Any]]


# --- steps ---------------------------------------------------------------------------------------
class Step(Section):
    method: str

    def requires_data(self) -> bool:
        """Whether the step reads calibration batches."""
        return True

    def apply(self, model: nn.Module, batches: Batches | None) -> str:
        """Compress `model` in place; a one-line summary of what changed."""
        raise NotImplementedError


class UnstructuredStep(Step):
    """Zero individual weights (deltatune.compression.pruning)."""

    method: Literal["magnitude", "wanda", "gblm"]
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of each scope's weights set to zero")
    n_m: tuple[int, int] | None = Field(None, description="[N, M]: keep N of every M consecutive weights (2:4); "
                                                          "overrides sparsity")
    scope: Literal["row", "layer", "global"] = Field("row", description="where weights compete: per output row "
                                                                        "(Wanda's choice), per layer, or globally")
    targets: list[str] | None = Field(None, description="layers to prune (names, 're:<regex>'); null = default")
    exclude: list[str] | None = Field(None, description="layers to leave dense")
    sequential: bool = Field(True, description="calibrate each block on the pruned blocks before it, as the "
                                               "official code (true), or all on the dense model in one pass "
                                               "(false: one forward instead of one per block)")

    @model_validator(mode="after")
    def _pattern(self) -> UnstructuredStep:  # checked here, not after the model and data have loaded
        if self.n_m is not None:
            from deltatune.compression.pruning import _check_nm

            _check_nm(*self.n_m)
            if self.scope != "row":
                raise ValueError(f"n_m={list(self.n_m)} keeps N weights in groups of each row; use scope row, "
                                 f"not {self.scope}")
        return self

    def requires_data(self) -> bool:
        return self.method != "magnitude"

    def apply(self, model: nn.Module, batches: Batches | None) -> str:
        from deltatune.compression.pruning import prune

        masks = prune(model, self.method, self.sparsity, targets=self.targets, exclude=self.exclude,
                      scope=self.scope, n_m=self.n_m, calibration=batches, sequential=self.sequential)
        pattern = f"{self.n_m[0]}:{self.n_m[1]}" if self.n_m else f"sparsity {self.sparsity} per {self.scope}"
        return f"{self.method}: {pattern} on {len(masks)} layers"


class ShortGPTStep(Step):
    """Remove whole blocks with the lowest Block Influence (deltatune.compression.layers)."""

    method: Literal["shortgpt"]
    n_layers: int | None = Field(None, ge=1, description="how many layers to remove")
    fraction: float | None = Field(None, gt=0, lt=1, description="or: this fraction of all layers")

    @model_validator(mode="after")
    def _one_size(self) -> ShortGPTStep:
        if (self.n_layers is None) == (self.fraction is None):
            raise ValueError("a shortgpt step takes exactly one of n_layers or fraction")
        return self

    def apply(self, model: nn.Module, batches: Batches | None) -> str:
        from deltatune.compression.layers import shortgpt

        result = shortgpt(model, batches, self.n_layers, fraction=self.fraction)
        return f"shortgpt: removed layers {result.removed} (lowest Block Influence)"


class StructuredStep(Step):
    """Remove attention heads or FFN neurons of BERT-style encoders (deltatune.compression.structured)."""

    method: Literal["heads", "channels"]
    fraction: float = Field(..., gt=0, lt=1, description="fraction of the heads / FFN neurons removed per layer")
    importance: Literal["magnitude", "gradient"] = Field(
        "magnitude", description="rank units by weight norm, or by Michel et al.'s gradient score (needs data)")

    def requires_data(self) -> bool:
        return self.importance == "gradient"

    def apply(self, model: nn.Module, batches: Batches | None) -> str:
        from deltatune.compression import structured

        prune = structured.prune_heads if self.method == "heads" else structured.prune_channels
        removed = prune(model, self.fraction, importance=self.importance, batches=batches)
        count = sum(len(units) for units in removed.values())
        return f"{self.method}: removed {count} ({self.importance} importance) across {len(removed)} layers"


class LowRankStep(Step):
    """Replace linear layers by truncated-SVD factors (deltatune.compression.lowrank)."""

    method: Literal["lowrank"]
    rank: int | None = Field(None, ge=1, description="singular values kept per layer")
    energy: float | None = Field(None, gt=0, le=1, description="or: keep this fraction of ||W||_F^2")
    targets: list[str] | None = Field(None, description="layers to factorise; null = all inside the blocks")
    exclude: list[str] | None = Field(None, description="layers to leave dense")

    @model_validator(mode="after")
    def _one_size(self) -> LowRankStep:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("a lowrank step takes exactly one of rank or energy")
        return self

    def requires_data(self) -> bool:
        return False

    def apply(self, model: nn.Module, batches: Batches | None) -> str:
        from deltatune.compression.lowrank import factorize

        report = factorize(model, self.targets, rank=self.rank, energy=self.energy, exclude=self.exclude)
        report.require_change(self.rank, self.energy)  # an unchanged model is never what a lowrank step asks for
        return report.to_markdown().splitlines()[0]


STEPS: dict[str, type[Step]] = {
    "magnitude": UnstructuredStep, "wanda": UnstructuredStep, "gblm": UnstructuredStep,
    "shortgpt": ShortGPTStep, "heads": StructuredStep, "channels": StructuredStep, "lowrank": LowRankStep,
}


def steps_help() -> list[str]:
    """Help lines for the step methods of STEPS, grouped by step type: what each does and its options."""
    groups: dict[type[Step], list[str]] = {}
    for name, step in STEPS.items():
        groups.setdefault(step, []).append(name)
    lines = []
    for step, names in groups.items():
        lines.append(f"{', '.join(names)}: {(step.__doc__ or '').strip().splitlines()[0]}")
        lines.append("    options: " + (", ".join(k for k in step.model_fields if k != "method") or "none"))
    return lines


def parse_step(item: Any, index: int) -> Step:
    """One step from its mapping, with errors naming `steps.<index>.<key>` and the closest valid word."""
    where = f"steps.{index}"
    if not isinstance(item, dict):
        raise ValueError(f"'{where}' must be a mapping with a method, got {item!r}")
    method = item.get("method")
    if method not in STEPS:
        raise ValueError(f"unknown method '{where}.method={method}'{did_you_mean(str(method), STEPS)} "
                         f"(known: {', '.join(STEPS)})")
    try:
        return STEPS[method].model_validate(item)
    except ValidationError as e:
        raise ValueError(describe(e, STEPS[method], ("steps", str(index)))) from None


# --- sections ------------------------------------------------------------------------------------
class DataSection(Section):
    dataset: str | None = Field(None, description="built-in dataset (rotten_tomatoes, chatterbot) or a "
                                                  ".csv/.jsonl file")
    text_column: str = Field("text", description="column with the text; rows with prompt/response columns "
                                                 "(chatterbot) use prompt + newline + response instead")
    label_column: str = Field("label", description="column with the class (classification)")
    seq_len: int = Field(128, ge=2, description="tokens per sequence (longer: more context, slower)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")


class CalibrationSection(DataSection):
    dataset: str | None = Field(None, description="data for activation statistics, Block Influence, gradient "
                                                  "importance and recovery; null = none (magnitude steps only)")
    n_samples: int = Field(32, ge=1, description="calibration sequences (more: steadier statistics, slower)")


class EvaluationSection(DataSection):
    dataset: str | None = Field(None, description="held-out data for quality before/after; null = the "
                                                  "calibration dataset (rows split off and never calibrated on, "
                                                  "read with the calibration columns)")
    n_texts: int = Field(64, ge=1, description="held-out texts (perplexity) or labelled examples (accuracy)")


class RecoverSection(Section):
    steps: int = Field(0, ge=0, description="PERP retraining steps after compression (0 = no recovery)")
    lr: float = Field(2e-4, gt=0, description="learning rate of the recovery LoRA, biases and norms")
    rank: int = Field(8, ge=1, description="rank of the mask-consistent recovery LoRA")


class OutputSection(Section):
    path: str | None = Field(None, description="folder for the compressed model and report; null = runs/<name>")
    overwrite: bool = Field(False, description="replace a non-empty output folder")


class PruneConfig(Section):
    """A whole `deltatune prune` run."""

    name: str = Field("prune", description="the run's name; default output is runs/<name>")
    model: ModelSection = ModelSection(path="smollm2", task="causal_lm")
    calibration: CalibrationSection = CalibrationSection()
    evaluation: EvaluationSection = EvaluationSection()
    steps: list[SerializeAsAny[Step]] = Field(..., min_length=1, description="compression steps, applied in order")
    recover: RecoverSection = RecoverSection()
    output: OutputSection = OutputSection()
    seed: int = Field(0, description="seed of the data split, calibration sampling and recovery")

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> list[Step]:
        if not isinstance(value, list):
            raise ValueError(f"'steps' must be a list of steps, got {value!r}")
        return [item if isinstance(item, Step) else parse_step(item, i) for i, item in enumerate(value)]

    @model_validator(mode="after")
    def _calibration_present(self) -> PruneConfig:
        if self.calibration.dataset is not None:
            return self
        fix = "set calibration.dataset (e.g. calibration.dataset=chatterbot)"
        for i, step in enumerate(self.steps):
            if step.requires_data():
                raise ValueError(f"step {i} ({step.method}) needs calibration data: {fix}")
        if self.recover.steps:
            raise ValueError(f"recover.steps={self.recover.steps} trains on calibration data: {fix}")
        return self

    @property
    def output_path(self) -> Path:
        return Path(self.output.path or Path("runs") / self.name)

    def to_yaml(self) -> str:
        """The resolved config as YAML that `load_prune_config` reads back to an equal config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading -------------------------------------------------------------------------------------
def apply_indexed_override(data: dict, item: str) -> None:
    """`apply_override` that also walks list entries by number: `steps.0.sparsity=0.6`."""
    key, sep, raw = item.partition("=")
    parts = key.split(".")
    node, i = data, 0
    while i < len(parts) - 1 and isinstance(node, dict) and isinstance(node.get(parts[i]), (dict, list)):
        child = node[parts[i]]
        if isinstance(child, dict):
            node, i = child, i + 1
        elif parts[i + 1].isdigit() and i + 2 < len(parts):
            index = int(parts[i + 1])
            if index >= len(child) or not isinstance(child[index], dict):
                raise ValueError(f"cannot set '{key}': '{parts[i]}' has no mapping at position {index} "
                                 f"(it has {len(child)} entries)")
            node, i = child[index], i + 2
        else:
            break
    apply_override(node, ".".join(parts[i:]) + sep + raw)


def load_prune_config(path: str | Path, overrides: list[str] = ()) -> PruneConfig:
    """Read a prune config file, apply `key=value` overrides, validate."""
    data = read_mapping(path, "prune config")
    data.setdefault("name", Path(path).stem)
    for item in overrides:
        apply_indexed_override(data, item)
    return validate_prune_config(data)


def validate_prune_config(data: dict) -> PruneConfig:
    """A `PruneConfig` from plain data, or a one-line ValueError."""
    return validated(PruneConfig, data)
