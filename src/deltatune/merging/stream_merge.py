"""Merge a saved adapter into its base checkpoint layer by layer, never holding the whole base model.

The model is built without weights (on the meta device) only to learn each target module's class, its
parameter names, how checkpoint keys map to module paths (a task model's prefix, e.g. 'bert.') and which
parameters are tied. Then, in the output's order, every tensor is read from the base checkpoint alone:
a tensor of an adapted layer comes from that layer, materialised from its own checkpoint tensors, with the
method's delta built from the adapter's tensors and merged by the engine's own rule (DeltaLayer.merge);
every other tensor is copied through unchanged. Peak memory: one layer, the adapter, and the tensor being
written (ShardWriter streams into the planned shards).

Adapter-wide tensors (`__shared__`: VeRA's bases, VB-LoRA's bank) are built once, from shape-only stand-ins
of the target layers, as the engine builds them at load time, then filled from the adapter's state.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import AutoConfig

from deltatune.engine.io import adapter_config, check_fingerprint, read_adapter
from deltatune.engine.kinds import target_kind, weight_of
from deltatune.engine.layer import DeltaLayer
from deltatune.engine.model import SHARED, StateMismatch, _copy_state, build_delta
from deltatune.engine.registry import get_method, method_of
from deltatune.engine.targeting import require_layers
from deltatune.merging.checkpoint import (
    CheckpointReader,
    ShardWriter,
    TensorSpec,
    copy_model_files,
    output_folder,
    weight_files,
)

logger = logging.getLogger(__name__)
NAME = "default"  # the adapter's name inside its layers; not written anywhere
COPY_BLOCK_BYTES = 32 * 2**20  # tensors copied through unchanged move in row blocks of about this size


def has_checkpoint(base_dir: str | os.PathLike) -> bool:
    """Whether `base_dir` holds a safetensors checkpoint the streaming merge can read."""
    try:
        weight_files(base_dir)
    except FileNotFoundError:
        return False
    return True


def empty_model(base_dir: str | os.PathLike, model_class: Any, model_kwargs: dict[str, Any] | None = None
                ) -> nn.Module:
    """The model `model_class` (a transformers class or Auto class) from the base's config.json, on the meta
    device: shapes, names and tied parameters without any memory. float32, as the in-memory merge builds it."""
    config = AutoConfig.from_pretrained(base_dir, **(model_kwargs or {}))
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # an Auto class
            return model_class.from_config(config, dtype=torch.float32)
        return model_class._from_config(config, dtype=torch.float32)


def model_class_of(meta: dict[str, Any], adapter_dir: Any) -> type:
    """The transformers class the adapter was trained on (recorded when it was saved)."""
    name = meta["base_model"].get("class")
    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"adapter '{adapter_dir}' was trained on a {name!r}, which is not a transformers model "
                         "class; pass model_class= (e.g. transformers.AutoModelForCausalLM)")
    return cls


@dataclass(frozen=True)
class Entry:
    """One tensor of the output: where it comes from in the base checkpoint, and which adapted module owns it."""

    spec: TensorSpec  # as written: the model's name, the checkpoint's dtype, the model's shape
    stored: str | None  # its name in the base checkpoint (None: a train module's tensor the base lacks)
    owner: str | None  # the adapted or trained module whose merge produces it (None: copied as it is)


class StreamMerge:
    """The plan of one streaming merge: the output's tensors in order, and the adapted modules to merge."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, meta: dict[str, Any], state: dict[str, Tensor],
                 where: Any):
        self.model, self.reader, self.meta, self.where = model, reader, meta, where
        self.config = adapter_config(meta, where)
        spec = method_of(self.config)
        if not spec.delta.mergeable:
            raise ValueError(f"adapter '{where}' ({spec.name}) changes activations, not weights, so it cannot be "
                             "merged into the base model; serve it with the base model and deltatune.load")
        self.targets, self.heads = list(meta["targets"]), list(meta["train_modules"])
        require_layers(model, self.targets + self.heads, f"adapter '{where}'")
        self.state, self._used = state, set()  # the adapter's tensors, and those merged so far
        self.names = self._canonical_names()
        self.entries = self._plan()
        self.stored = {e.spec.name: e.stored for e in self.entries}
        # shape-only stand-ins of every target: build_shared sees the layers the engine would give it, and each
        # layer keeps its identity (shared tensors key per-layer draws by it) when its real weights arrive
        self.layers = {path: self._stand_in(path) for path in self.targets + self.heads}
        self.shared = spec.delta.build_shared(self.config, [self.layers[p] for p in self.targets])
        if self.shared is not None:
            own = {f"{SHARED}.{k}": t for k, t in self.shared.state_dict().items()}
            self._fill(own)

    # --- the plan --------------------------------------------------------------------------
    def _canonical_names(self) -> dict[int, str]:
        """id(tensor) -> the name it is written under: the first of its tied names, as save_pretrained keeps."""
        names: dict[int, str] = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            names.setdefault(id(t), name)
        return names

    def _stored_name(self, name: str, aliases: list[str]) -> str | None:
        """The checkpoint's key for a model tensor: its own name or a tied alias, with or without the task
        model's prefix (a base saved as `BertModel` lacks the 'bert.' of `BertForSequenceClassification`)."""
        prefix = getattr(self.model, "base_model_prefix", "")
        for n in [name, *aliases]:
            keys = [n, n.removeprefix(f"{prefix}."), f"{prefix}.{n}"] if prefix else [n]
            if key := next((k for k in keys if k in self.reader), None):
                return key
        return None

    def _plan(self) -> list[Entry]:
        aliases: dict[str, list[str]] = {}
        tensors: dict[str, Tensor] = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            first = self.names[id(t)]
            tensors.setdefault(first, t)
            if name != first:
                aliases.setdefault(first, []).append(name)
        owners: dict[str, str] = {}
        for path in self.targets + self.heads:
            for t in self.model.get_submodule(path).state_dict(keep_vars=True).values():
                name = self.names[id(t)]
                if name in owners:
                    raise ValueError(f"'{owners[name]}' and '{path}' share the tensor '{name}' (tied weights), and "
                                     "the adapter changes both; the streaming merge folds one layer at a time: merge "
                                     "in memory instead (deltatune merge-adapter --no-stream)")
                owners[name] = path
        entries, missing = [], []
        for name, t in tensors.items():
            stored, owner = self._stored_name(name, aliases.get(name, [])), owners.get(name)
            fresh_head_param = owner in self.heads and isinstance(t, nn.Parameter)  # written from the adapter
            if stored is None and not fresh_head_param:
                missing.append((name, owner))
                continue
            if stored is not None and self.reader.specs[stored].shape != tuple(t.shape):
                raise ValueError(f"'{stored}' is {self.reader.specs[stored].shape} in the base checkpoint "
                                 f"'{self.reader.path}' but {tuple(t.shape)} in the {type(self.model).__name__} its "
                                 "config.json builds; is this the adapter's base model?")
            dtype = self.reader.specs[stored].dtype if stored is not None else t.dtype
            entries.append(Entry(TensorSpec(name, dtype, tuple(t.shape)), stored, owner))
        if missing:
            self._refuse_missing(missing)
        return entries

    def _refuse_missing(self, missing: list[tuple[str, str | None]]) -> None:
        names = [n for n, _ in missing]
        shown = f"{names[:4]}{' ...' if len(names) > 4 else ''}"
        target = next((o for _, o in missing if o in self.targets), None)
        if target is not None:
            raise ValueError(f"the base checkpoint '{self.reader.path}' lacks tensors of the adapted layer "
                             f"'{target}' ({shown}): it is not the base model the adapter '{self.where}' was "
                             "trained on; pass that model's folder")
        raise ValueError(f"the base checkpoint '{self.reader.path}' lacks {len(names)} tensors of the "
                         f"{type(self.model).__name__} ({shown}) that the adapter does not hold either (a new head "
                         "that was not saved as a train module?); merge in memory instead "
                         "(deltatune merge-adapter --no-stream)")

    # --- one module at a time --------------------------------------------------------------
    def _stand_in(self, path: str) -> DeltaLayer:
        """A DeltaLayer over a copy of the meta module whose tensors are zero-strided CPU views (no memory)."""
        module = copy.deepcopy(self.model.get_submodule(path))
        fake = {k: torch.zeros((), dtype=t.dtype).expand(t.shape) for k, t in module.state_dict().items()}
        module.load_state_dict(fake, assign=True)
        layer = DeltaLayer(module, target_kind(module))
        layer.path = path
        return layer

    def _materialise(self, path: str) -> nn.Module:
        """A copy of the meta module holding its real tensors (float32, as the in-memory merge loads them)."""
        meta_module = self.model.get_submodule(path)
        tensors = {}
        for local, t in meta_module.state_dict(keep_vars=True).items():
            key = self.stored[self.names[id(t)]]
            value = self.reader.read(key) if key is not None else torch.empty(t.shape, dtype=t.dtype)
            tensors[local] = value.float() if value.is_floating_point() else value
        module = copy.deepcopy(meta_module)
        module.load_state_dict(tensors, assign=True)
        return module

    def _fill(self, own: dict[str, Tensor]) -> None:
        """Copy the adapter's tensors into `own`, checked for keys, shapes and dtypes."""
        try:
            _copy_state(own, {k: self.state[k] for k in own if k in self.state}, self.meta["name"])
        except StateMismatch as err:
            raise ValueError(f"the adapter '{self.where}' does not match its config: {err}; save it again") from None
        self._used.update(own)

    def merged(self, path: str) -> dict[str, Tensor]:
        """The tensors of module `path` with the adapter merged, keyed by their output names."""
        layer, real = self.layers[path], self._materialise(path)
        layer.base_layer = real  # the same DeltaLayer the shared tensors were built with
        if path in self.targets:
            if (w := weight_of(real)) is not None:
                check_fingerprint(self.meta, path, w, self.where)
            delta = build_delta(self.config, layer, initialize=False, shared=self.shared)
        else:
            full = get_method("full")
            delta = full.delta(full.config(), layer)
        self._fill({f"{path}.{k}": t for k, t in delta.state_dict().items()})
        layer.deltas[NAME] = delta
        layer.merge(NAME)
        meta_module = self.model.get_submodule(path)
        by_id = {local: self.names[id(t)] for local, t in meta_module.state_dict(keep_vars=True).items()}
        out = {by_id[local]: t for local, t in real.state_dict().items() if local in by_id}
        del layer.deltas[NAME]
        layer.base_layer = self._stand_in(path).base_layer  # free the real tensors once written
        return out

    def main_dtype(self) -> torch.dtype:
        """The floating dtype most of the output's bytes have (what config.json records)."""
        sizes: dict[torch.dtype, int] = {}
        for e in self.entries:
            if e.spec.dtype.is_floating_point:
                sizes[e.spec.dtype] = sizes.get(e.spec.dtype, 0) + e.spec.nbytes
        return max(sizes, key=sizes.get, default=torch.float32)

    def _copied(self, e: Entry) -> Iterator[tuple[str, Tensor]]:
        """A base tensor as it is stored, in row blocks: an embedding table never has to be held whole."""
        shape = e.spec.shape
        row_bytes = e.spec.nbytes // shape[0] if shape and shape[0] else 0
        if not row_bytes or e.spec.nbytes <= COPY_BLOCK_BYTES:
            yield e.spec.name, self.reader.read(e.stored)
            return
        step = max(1, COPY_BLOCK_BYTES // row_bytes)
        for start in range(0, shape[0], step):
            yield e.spec.name, self.reader.read(e.stored, slice(start, start + step))

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every output tensor in order, merged where an adapted module owns it; one module held at a time."""
        held: dict[str, Tensor] = {}
        for e in self.entries:
            if e.owner is None:
                yield from self._copied(e)
                continue
            if e.spec.name not in held:
                held = self.merged(e.owner)
            yield e.spec.name, held.pop(e.spec.name).to(e.spec.dtype)
        unused = sorted(self.state.keys() - self._used)
        if unused:
            raise ValueError(f"the adapter '{self.where}' holds tensors for no adapted layer ({unused[:3]}): it does "
                             "not match its config; save it again")


def merge_adapter_streaming(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            max_shard_size: int | str = "5GB", *, model_class: Any = None,
                            model_kwargs: dict[str, Any] | None = None, overwrite: bool = False,
                            check_integrity: bool = True) -> Path:
    """Fold a saved deltatune adapter into its base checkpoint, tensor by tensor, into a sharded HF folder.

    Args:
        base_dir: the base model's Hugging Face folder (config.json and safetensors, sharded or not).
        adapter_dir: a folder written by DeltaModel.save (deltatune_config.json + adapter.safetensors).
        out_dir: the output folder (new or empty, unless `overwrite`); written whole, then renamed into place.
        max_shard_size: largest shard, in bytes or as "2GB" / "500MiB"; an index is written when it splits.
        model_class: the transformers class or Auto class to build (default: the class the adapter was saved on).
        model_kwargs: config options beyond config.json (a head's num_labels, id2label, label2id).
    Tensors keep the base checkpoint's dtypes (the in-memory merge writes float32); merges run in float32.
    """
    meta, state = read_adapter(adapter_dir, check_integrity)
    reader = CheckpointReader(base_dir)
    model = empty_model(base_dir, model_class or model_class_of(meta, adapter_dir), model_kwargs)
    plan = StreamMerge(model, reader, meta, state, adapter_dir)
    with output_folder(out_dir, overwrite) as tmp:
        with ShardWriter(tmp, [e.spec for e in plan.entries], max_shard_size) as writer:
            for name, tensor in plan.tensors():
                writer.write(name, tensor)
        copy_model_files(base_dir, tmp)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = plan.main_dtype()
        config.save_pretrained(tmp)  # the task's config (labels), in place of the base's
        if model.can_generate() and not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(tmp)
    logger.info("merged %s into %s: %d tensors, %.1f MB", adapter_dir, out_dir, len(plan.entries),
                sum(e.spec.nbytes for e in plan.entries) / 1e6)
    return Path(out_dir)
