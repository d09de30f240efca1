"""Run a merge config out of core: tensor by tensor from the input shards into streamed output shards.

For each tensor name of the base checkpoint: read it from the base and from every fine-tune (one tensor
each), pick the first override whose pattern matches the name, merge with `TaskVectorMerge.merge_tensor`
(or the `linear` soup), cast to the output dtype and write it to its planned shard. Peak memory is those
few tensors plus the merge's temporaries; `deltatune.merging.checkpoint` says how reading and writing keep
it so.

Methods whose every output entry depends only on the same entry of the inputs (no sparsifier, or none that
ranks or samples over the tensor: task arithmetic, linear, Fisher) merge large tensors in blocks of rows,
so even the embedding matrix never exists whole: peak memory is then bounded by `CHUNK_BYTES`, not by
the largest tensor. Ranking and sampling methods (TIES, DARE, DELLA, ...) see each tensor whole, as their
definitions (top-k over the tensor, one random stream per tensor) require.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from deltatune.engine.atomic import atomic_write_text
from deltatune.engine.io import CONFIG_NAME as DELTATUNE_ADAPTER_CONFIG
from deltatune.engine.targeting import matcher
from deltatune.merging.checkpoint import (
    CheckpointReader,
    ShardWriter,
    TensorSpec,
    check_output,
    copy_model_files,
    output_folder,
    weight_files,
)
from deltatune.merging.config import LINEAR, MergeConfig
from deltatune.merging.sparsify import Sparsify
from deltatune.merging.task_arithmetic import (
    Balance,
    TaskVectorMerge,
    check_importance,
    linear,
    tensor_generator,
)
from deltatune.training.tasks import resolve_model_path

logger = logging.getLogger(__name__)

PEFT_ADAPTER_CONFIG = "adapter_config.json"
MERGE_CONFIG_NAME = "deltatune_merge.yaml"  # the resolved config, written beside the merged weights
OUTPUT_DTYPES = {"same": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LISTED = 8  # how many offending keys an error names before it summarises
CHUNK_BYTES = 16 * 2**20  # float32 bytes of one input's block of rows, for methods that merge entry by entry


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote and what it cost."""

    output: Path
    tensors: int  # tensors in the output
    merged: int  # float tensors merged (adapter merges: layers)
    copied: int  # non-float tensors copied from the base
    bytes_written: int  # bytes of the output's safetensors files
    shards: int
    seconds: float
    peak_rss: int  # bytes: this process's peak resident memory so far (Linux ru_maxrss)
    adapter_report: Any = None  # merge_adapters' own report when the inputs were adapters


@dataclass(frozen=True)
class Rule:
    """How the tensors matching `pattern` are merged (pattern None: every tensor no override claims)."""

    pattern: str | None
    method: TaskVectorMerge | None  # None = linear soup
    weights: tuple[float, ...]
    model_parameters: tuple[dict[str, float], ...] | None = None  # each model's own density, ...

    def matches(self, name: str) -> bool:
        return self.pattern is None or matcher(self.pattern)(name, None)

    @property
    def elementwise(self) -> bool:
        """Whether each output entry depends only on the same entry of the inputs (rows merge separately)."""
        m = self.method
        return m is None or (m.sparsify is Sparsify.none and m.balance in (Balance.none, Balance.fisher))

    def blocks(self, spec: TensorSpec) -> list[slice | None]:
        """Row blocks of about CHUNK_BYTES (float32) to merge one after another; [None] = the tensor whole."""
        if not (self.elementwise and spec.dtype.is_floating_point and spec.shape and spec.shape[0] > 1):
            return [None]
        step = max(1, CHUNK_BYTES // (4 * max(1, math.prod(spec.shape[1:]))))
        n = spec.shape[0]
        return [None] if step >= n else [slice(i, min(i + step, n)) for i in range(0, n, step)]

    @property
    def plain(self) -> TaskVectorMerge | None:
        """The method for tensors without importance: Fisher merging falls back to the weighted mean there,
        as `TaskVectorMerge.merge_state_dicts` does."""
        if self.method is not None and self.method.balance is Balance.fisher:
            return self.method.model_copy(update={"balance": Balance.none})
        return self.method


def is_adapter(path: Path) -> bool:
    return (path / DELTATUNE_ADAPTER_CONFIG).is_file() or (path / PEFT_ADAPTER_CONFIG).is_file()


def resolve_input(path: str, key: str) -> Path:
    """An adapter folder, a Hugging Face model folder or a built-in model name; errors name the config key."""
    folder = Path(path).expanduser()
    if folder.is_dir() and is_adapter(folder):
        return folder
    try:
        return resolve_model_path(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}; fix the path (or give a deltatune/PEFT adapter folder)") \
            from None


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"{list(items[:_LISTED])}{more}"


def check_inputs(base: CheckpointReader, others: Sequence[CheckpointReader], names: Sequence[str],
                 labels: Sequence[str], base_label: str = "base") -> None:
    """Every `other` must hold every tensor of `names` with the base's shape; one error lists all problems."""
    problems = []
    for label, other in zip(labels, others):
        missing = [n for n in names if n not in other]
        shapes = [f"'{n}' {other.specs[n].shape} vs {base.specs[n].shape}"
                  for n in names if n in other and other.specs[n].shape != base.specs[n].shape]
        problems += [f"{label} is missing {len(missing)} tensors {_listed(missing)}"] if missing else []
        problems += [f"{label} has other shapes than the {base_label}: {_listed(shapes)}"] if shapes else []
        extra = [n for n in other.keys() if n not in base]
        if extra:  # e.g. an untied lm_head: the base decides what the output holds
            logger.warning("%s has %d tensors the %s lacks, ignored: %s", label, len(extra), base_label,
                           _listed(extra))
    if problems:
        raise ValueError("inputs do not match: " + "; ".join(problems)
                         + f". Merge only models of one architecture (fine-tunes of the {base_label})")


def build_rules(config: MergeConfig, names: Sequence[str]) -> list[Rule]:
    """Overrides first, in config order, then the default; an override that matches no tensor is an error."""
    weights, own = tuple(m.weight for m in config.models), config.model_parameters()
    rules = [Rule(o.pattern,
                  config.merge_method({**config.parameters, **o.parameters}, f"overrides.{i}.parameters"),
                  tuple(o.weights) if o.weights is not None else weights, own)
             for i, o in enumerate(config.overrides)]
    for i, rule in enumerate(rules):
        if not any(rule.matches(n) for n in names):
            raise ValueError(f"overrides.{i}.pattern {rule.pattern!r} matches no tensor; use a name or "
                             f"dotted suffix ('mlp.down_proj.weight') or 're:<regex>' matching whole names "
                             f"such as '{names[len(names) // 2]}'")
    return [*rules, Rule(None, config.merge_method(config.parameters), weights, own)]


def merge_one(name: str, rule: Rule, base: CheckpointReader, finetuned: Sequence[CheckpointReader],
              importance: Sequence[CheckpointReader] | None, seed: int, rows: slice | None = None) -> Tensor:
    """The merged tensor `name` (or its block `rows`); non-float tensors come from the base as they are."""
    if not base.specs[name].dtype.is_floating_point:
        return base.read(name, rows)
    tensors = [r.read(name, rows) for r in finetuned]
    if rule.method is None:
        return linear([{name: t} for t in tensors], rule.weights)[name]
    generator, own = tensor_generator(seed, name), rule.model_parameters
    if importance is None:
        return rule.method.merge_tensor(base.read(name, rows), tensors, rule.weights, generator, model_parameters=own)
    if name in importance[0]:
        return rule.method.merge_tensor(base.read(name, rows), tensors, rule.weights, generator,
                                        importance=[r.read(name, rows) for r in importance], model_parameters=own)
    return rule.plain.merge_tensor(base.read(name, rows), tensors, rule.weights, generator, model_parameters=own)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_merge(config: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge as `config` says and write the result; see the module docstring."""
    start = time.perf_counter()
    inputs = [resolve_input(m.path, f"models.{i}.path") for i, m in enumerate(config.models)]
    adapters = [is_adapter(p) for p in inputs]
    if all(adapters):
        return _merge_adapters(config, inputs, start)
    if any(adapters):
        kinds = ", ".join(f"models.{i}: {'adapter' if a else 'checkpoint'}" for i, a in enumerate(adapters))
        raise ValueError(f"cannot mix adapters and full checkpoints in one merge ({kinds}); merge the "
                         "adapters into their base first (deltatune merge-adapter), or merge adapters only")
    _check_checkpoint_options(config)
    if config.method != LINEAR and config.base_model is None:
        raise ValueError(f"method '{config.method}' merges task vectors theta_i - theta_0: set base_model")
    base_dir = resolve_input(config.base_model, "base_model") if config.base_model else inputs[0]
    out = Path(config.output.path)
    if out.resolve() in {p.resolve() for p in [base_dir, *inputs]}:
        raise ValueError(f"output.path '{out}' is one of the inputs; choose another folder")
    check_output(out, config.output.overwrite)  # fail before reading anything

    finetuned = [CheckpointReader(p) for p in inputs]
    base = CheckpointReader(base_dir) if config.method != LINEAR else finetuned[0]  # a soup's tensor list
    floats = [n for n, spec in base.specs.items() if spec.dtype.is_floating_point]
    labels = [f"models.{i} ('{m.path}')" for i, m in enumerate(config.models)]
    check_inputs(base, finetuned, floats, labels, "base" if config.method != LINEAR else "first model")
    importance = _importance_readers(config, base, floats)
    rules = build_rules(config, floats)

    dtype = OUTPUT_DTYPES[config.output.dtype]
    specs = [TensorSpec(n, dtype if dtype and s.dtype.is_floating_point else s.dtype, s.shape)
             for n, s in base.specs.items()]
    with output_folder(out, config.output.overwrite) as tmp:
        with ShardWriter(tmp, specs, config.output.shard_bytes, metadata={"format": "pt"}) as writer:
            for spec in tqdm(specs, desc="merging", unit="tensor", disable=None if progress else True):
                rule = next(r for r in rules if r.matches(spec.name))
                for rows in rule.blocks(spec):
                    merged = merge_one(spec.name, rule, base, finetuned, importance, config.seed, rows)
                    writer.write(spec.name, merged.to(spec.dtype))
                    del merged  # before the next block is read
        copy_model_files(base_dir, tmp, dtype)
        atomic_write_text(tmp / MERGE_CONFIG_NAME, config.to_yaml())
    return MergeReport(out, len(specs), len(floats), len(specs) - len(floats), writer.bytes_written,
                       len(writer.shards), time.perf_counter() - start, peak_rss())


def _check_checkpoint_options(config: MergeConfig) -> None:
    o = config.output
    if o.format not in ("auto", "hf"):
        raise ValueError(f"output.format={o.format} writes adapters, but the inputs are full checkpoints: "
                         "use hf")
    if o.rank is not None or o.energy is not None:
        raise ValueError("output.rank and output.energy truncate merged adapters; checkpoints take neither")


def _importance_readers(config: MergeConfig, base: CheckpointReader, names: Sequence[str]
                        ) -> list[CheckpointReader] | None:
    """Readers of the models' fisher files (None when no model has one), checked against the base.

    Like `merge_state_dicts(importance=...)`: every file covers the same tensors, all of them in the base;
    tensors no file covers merge without importance.
    """
    if not config.models[0].fisher:
        return None
    for i, m in enumerate(config.models):
        if not Path(m.fisher).is_file():
            raise FileNotFoundError(f"models.{i}.fisher: no file '{m.fisher}'; give a .safetensors of "
                                    "importances")
    readers = [CheckpointReader(m.fisher) for m in config.models]
    check_importance({n: base.specs[n] for n in names}, [r.specs for r in readers], len(readers))
    shapes = [f"models.{i}.fisher '{n}' {r.specs[n].shape} vs {base.specs[n].shape}"
              for i, r in enumerate(readers) for n in names
              if n in r and r.specs[n].shape != base.specs[n].shape]
    if shapes:
        raise ValueError(f"fisher files must match the model's shapes: {_listed(shapes)}")
    return readers


def _merge_adapters(config: MergeConfig, inputs: Sequence[Path], start: float) -> MergeReport:
    """Every input is an adapter: merge their deltas with `merge_adapters` (no full weights are built)."""
    try:
        from deltatune.merging.adapters import merge_adapters
    except ImportError:
        raise ValueError("merging adapters needs deltatune.merging.adapters, which this install lacks") \
            from None
    o = config.output
    unsupported = {"overrides": config.overrides, "fisher": any(m.fisher for m in config.models),
                   "output.dtype": o.dtype != "same", "output.format=hf": o.format == "hf"}
    if any(unsupported.values()):
        raise ValueError(f"adapter merges do not support {[k for k, v in unsupported.items() if v]}; remove "
                         "them, or merge each adapter into its base and merge the checkpoints")
    method = LINEAR if config.method == LINEAR else config.merge_method(config.parameters)
    report = merge_adapters(inputs, [m.weight for m in config.models], method, rank=o.rank, energy=o.energy,
                            out=o.path, format=o.format, seed=config.seed, overwrite=o.overwrite,
                            model_parameters=config.model_parameters())
    files = weight_files_of(Path(o.path))
    tensors = sum(len(CheckpointReader(f)) for f in files)
    return MergeReport(Path(o.path), tensors, len(report.layers), 0, sum(f.stat().st_size for f in files),
                       len(files), time.perf_counter() - start, peak_rss(), adapter_report=report)


def weight_files_of(folder: Path) -> list[Path]:
    """The safetensors files in a written folder (a checkpoint's shards or an adapter's weights)."""
    try:
        return weight_files(folder)
    except FileNotFoundError:
        return sorted(folder.glob("*.safetensors"))
