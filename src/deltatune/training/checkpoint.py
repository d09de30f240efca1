"""Resumable checkpoints: trainable state, optimizer/scheduler/RNG state and trainer state, written atomically.

Layout of `<root>/ckpt-<step>/`:
    adapter.safetensors   trainable parameters by name
    optimizer.pt          {"optimizer", "scheduler", "rng"}: tensors and plain containers only
    trainer_state.json    step, data position, and whatever else the trainer records
A checkpoint is written into `ckpt-<step>.tmp/` and renamed into place, so a killed run leaves at worst
a `.tmp` directory, which loading ignores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

logger = logging.getLogger(__name__)

PARAMS, TORCH_STATE, TRAINER_STATE = "adapter.safetensors", "optimizer.pt", "trainer_state.json"
_NAME = re.compile(r"ckpt-(\d+)")


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint."""

    path: Path
    params: dict[str, Tensor]
    torch_state: dict
    trainer_state: dict


def rng_state() -> dict:
    """The torch RNG states (CPU, and every CUDA device when present) that dropout draws from."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, params: dict[str, Tensor], torch_state: dict, trainer_state: dict, keep: int
) -> Path:
    """Write `ckpt-<step>` atomically, then delete all but the newest `keep` checkpoints."""
    final = root / f"ckpt-{step}"
    tmp = root / f"ckpt-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in params.items()}, tmp / PARAMS)
    torch.save(torch_state, tmp / TORCH_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2), encoding="utf-8")
    for file in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # a stale checkpoint of the same step from a run that was resumed earlier
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)  # the rename itself reaches the disk before older checkpoints are pruned
    for _, old in checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the renamed (not `.tmp`) checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return sorted(found)


# what a trainer state must hold, and the types it must have
STATE_KEYS = {"step": int, "epoch": int, "batch_in_epoch": int, "elapsed": (int, float),
              "initial_eval": (dict, type(None)), "recipe": dict}
OPTIONAL_KEYS = {"metrics_rows": int}  # absent from checkpoints of older versions


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint and check that it is whole; never unpickles anything but tensors and plain containers."""
    trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    if not isinstance(trainer_state, dict):
        raise ValueError(f"{TRAINER_STATE} holds a {type(trainer_state).__name__}, not an object")
    if missing := sorted(STATE_KEYS.keys() - trainer_state.keys()):
        raise ValueError(f"{TRAINER_STATE} lacks {missing}")
    for key, kind in {**STATE_KEYS, **OPTIONAL_KEYS}.items():
        if key not in trainer_state:
            continue
        value = trainer_state[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ValueError(f"{TRAINER_STATE} has an invalid {key!r}: {value!r}")
    if trainer_state["step"] != int(_NAME.fullmatch(path.name).group(1)):
        raise ValueError(f"{TRAINER_STATE} step {trainer_state['step']} does not match the directory name")
    params = load_file(path / PARAMS)
    if bad := [name for name, t in params.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise ValueError(f"adapter tensors hold NaN or inf: {bad[:3]}")
    torch_state = torch.load(path / TORCH_STATE, weights_only=True, map_location="cpu")
    if not isinstance(torch_state, dict) or (missing := sorted({"optimizer", "scheduler", "rng"} - torch_state.keys())):
        raise ValueError(f"{TORCH_STATE} lacks {missing if isinstance(torch_state, dict) else 'its sections'}")
    return Checkpoint(path, params, torch_state, trainer_state)


def load_latest(root: Path, check: Callable[[Checkpoint], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint under `root` that loads and passes `check` (which raises to reject one);
    partial, corrupt and rejected ones are skipped with a warning that says why."""
    for partial in sorted(root.glob("ckpt-*.tmp")):
        logger.warning("ignoring partial checkpoint %s (a run stopped while writing it)", partial)
    skipped = []
    for _, path in reversed(checkpoints(root)):
        try:
            ckpt = load_checkpoint(path)
            if check is not None:
                check(ckpt)
        except Exception as e:  # any failure to read means the checkpoint cannot be trusted
            logger.warning("ignoring invalid checkpoint %s: %s", path, e)
            skipped.append(path.name)
            continue
        if skipped:
            logger.warning("resuming from %s, the newest valid checkpoint (skipped: %s)", path, ", ".join(skipped))
        return ckpt
    return None
