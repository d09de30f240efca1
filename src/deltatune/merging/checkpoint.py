"""Out-of-core checkpoint IO: read a safetensors checkpoint one tensor at a time, stream tensors into shards.

Peak memory of a merge stays near the few tensors being merged, never a whole model or a whole shard:

- `CheckpointReader` reads names, dtypes and shapes from the shard headers, and each tensor through a fresh
  `safe_open` handle. safetensors maps the file; an open handle keeps every page it has touched resident,
  so a handle kept per shard would grow to the shard's size. A handle per tensor releases the pages with
  the tensor.
- `ShardWriter` lays out all shards up front (the output's names, dtypes and shapes are known before any
  merging), so each tensor is written to disk as soon as it is computed; no shard is assembled in memory.
- `output_folder` builds the whole output in a temporary folder beside the target and renames it into place,
  so a killed merge never leaves a half-written model where a model is expected.

File layout follows Hugging Face: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` (https://huggingface.co/docs/safetensors/index for the format).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from deltatune.engine.atomic import atomic_path, atomic_write_text

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype codes (the format's spec)
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
# files of a model folder that are not weights: config, generation config, tokenizer, chat template
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NOT_MODEL_FILES = ("adapter_config.json", "deltatune_config.json")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a Hugging Face-style size string: "2GB" (10^9), "500MiB" (2^20), "1000"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"size {size!r} is not a number of bytes or a size like '2GB', '500MB', '1GiB'")
        value = int(float(match[1]) * _UNITS[(match[2] or "B").lower()])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """What a stored tensor is, without its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# --- reading -------------------------------------------------------------------------------------
def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: a folder (single file or index) or one .safetensors file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
        files = [path / name for name in dict.fromkeys(sorted(index.get("weight_map", {}).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise FileNotFoundError(f"{path / INDEX_NAME} lists missing shards: {missing or 'none listed'}")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    hint = ""
    if others:
        hint = (f"; it holds {others}: deltatune reads only safetensors (never pickles), so convert it "
                "first, e.g. load it with transformers and save_pretrained(safe_serialization=True)")
    raise FileNotFoundError(f"no safetensors checkpoint at '{path}': expected {WEIGHTS_NAME} or "
                            f"{INDEX_NAME}{hint}")


class CheckpointReader:
    """A checkpoint's tensor specs from its shard headers; `read(name)` loads one tensor and nothing else."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: dict[str, Path] = {}
        self.specs: dict[str, TensorSpec] = {}
        for file in weight_files(self.path):
            with _open(file) as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    self._file[name] = file
                    self.specs[name] = TensorSpec(name, DTYPES[piece.get_dtype()], tuple(piece.get_shape()))

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    def keys(self) -> list[str]:
        return list(self.specs)

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        """One tensor, or the block `rows` of its leading dimension, through its own handle (see the module
        docstring for why); a block touches only its own pages of the file."""
        if name not in self.specs:
            raise KeyError(f"'{name}' is not in checkpoint '{self.path}'")
        with _open(self._file[name]) as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]


@contextlib.contextmanager
def _open(file: Path) -> Iterator:
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise ValueError(f"corrupt safetensors file '{file}': {err}") from None


# --- writing -------------------------------------------------------------------------------------
def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Fill shards in order up to `max_shard_size` bytes; a larger tensor gets a shard of its own (as HF)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[-1] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file holding `specs` back to back, in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as the reference writer pads it
    return struct.pack("<Q", len(text)) + text


def _write_data(f: BinaryIO, tensor: Tensor) -> None:
    """A tensor's bytes (little-endian, row-major) without an intermediate copy of the data."""
    f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class ShardWriter:
    """Streams tensors, in the order of `specs`, into shards laid out in advance inside `folder`.

    Use as a context manager; every tensor must be written, in order, with its planned dtype and shape,
    either whole or as consecutive blocks of rows (so a tensor too large to merge at once never exists whole).
    Each shard goes through `atomic_path`, and the index is written last.
    """

    def __init__(self, folder: str | os.PathLike, specs: Sequence[TensorSpec], max_shard_size: int | str,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = plan_shards(specs, parse_size(max_shard_size))
        self.names = shard_names(len(self.shards))
        self.metadata = metadata
        self._order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._rows = 0  # rows of the next tensor written so far, when it comes in blocks
        self._stack = contextlib.ExitStack()
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._stack.__exit__(exc_type, *exc)  # atomic_path removes the partial shard
            return
        try:
            self.close()
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor of the plan, whole or as its next block of rows (a leading-dim slice)."""
        if self._next >= len(self._order):
            raise ValueError(f"'{name}' is past the end of the plan ({len(self._order)} tensors)")
        shard, spec = self._order[self._next]
        shape = tuple(tensor.shape)
        whole = shape == spec.shape and self._rows == 0
        rows = len(spec.shape) > 0 and shape[1:] == spec.shape[1:] and self._rows + shape[0] <= spec.shape[0]
        if name != spec.name or tensor.dtype != spec.dtype or not (whole or rows):
            at = f" from row {self._rows}" if self._rows else ""
            raise ValueError(f"expected tensor '{spec.name}' {spec.dtype} {spec.shape}{at} next, "
                             f"got '{name}' {tensor.dtype} {shape}")
        if self._rows == 0 and (self._next == 0 or self._order[self._next - 1][0] != shard):
            self._start_shard(shard)
        _write_data(self._file, tensor)
        self.bytes_written += tensor.numel() * tensor.dtype.itemsize
        done = whole or self._rows + shape[0] == spec.shape[0]
        self._rows = 0 if done else self._rows + shape[0]
        self._next += done

    def _start_shard(self, shard: int) -> None:
        self._finish_shard()
        tmp = self._stack.enter_context(atomic_path(self.folder / self.names[shard]))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        self._file.write(safetensors_header(self.shards[shard], self.metadata))

    def _finish_shard(self) -> None:
        self._stack.close()  # closes the file, then fsyncs and renames it into place
        self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index (sharded checkpoints only)."""
        if self._next != len(self._order):
            missing = [spec.name for _, spec in self._order[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[:3]}")
        self._finish_shard()
        if len(self.shards) > 1:
            weight_map = {spec.name: file for file, shard in zip(self.names, self.shards) for spec in shard}
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            atomic_write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, Tensor],
                    max_shard_size: int | str = "2GB") -> None:
    """Write an in-memory state dict as a (possibly sharded) checkpoint; handy for tests and small models."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ShardWriter(folder, specs, max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


# --- the output folder ---------------------------------------------------------------------------
def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path` as an output folder: refuse a file, or a non-empty folder unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path '{path}' is a file; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output folder '{path}' is not empty; choose a new folder or set "
                         "output.overwrite=true")
    return path


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path` in one rename."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():  # empty, or overwrite: move the old one aside, so one rename publishes the new
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_model_files(source: str | os.PathLike, dest: str | os.PathLike,
                     dtype: torch.dtype | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files; record `dtype` in config.json when given."""
    source, dest = Path(source), Path(dest)
    copied = []
    for file in sorted(source.iterdir()):
        if (file.is_file() and file.suffix in MODEL_FILE_SUFFIXES and file.name not in NOT_MODEL_FILES
                and not file.name.endswith(".index.json")):
            shutil.copyfile(file, dest / file.name)
            copied.append(file.name)
    config = dest / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", older versions "torch_dtype"
            if key in data:
                data[key] = str(dtype).removeprefix("torch.")
        atomic_write_text(config, json.dumps(data, indent=2) + "\n")
    return copied
