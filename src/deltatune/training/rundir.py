"""A run folder: one writer at a time (a pid lock file), and only deltatune's own files in it.

`deltatune train` writes into a folder only when it is empty or holds a run that deltatune wrote (its
`deltatune_run.json` says so); `--overwrite` replaces deltatune's files and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from pathlib import Path

from deltatune.engine.atomic import atomic_write_text

logger = logging.getLogger(__name__)

METRICS, ADAPTER, CHECKPOINTS, RECIPE = "metrics.jsonl", "adapter", "checkpoints", "recipe.yaml"
MARKER, LOCK = "deltatune_run.json", ".deltatune.lock"
OWN = (MARKER, METRICS, CHECKPOINTS, ADAPTER)  # what --overwrite may replace
ADAPTER_FILES = ("adapter.safetensors", "deltatune_config.json", RECIPE)
_CKPT = re.compile(r"ckpt-\d+(\.tmp)?")


def _leftover(name: str, files: tuple[str, ...]) -> bool:
    """Whether `name` is what engine.atomic leaves of one of `files` when killed mid-write (`.<file>.<random>.tmp`)."""
    return any(re.fullmatch(rf"\.{re.escape(file)}\.\w+\.tmp", name) for file in files)


_OWN_INSIDE = {  # what deltatune writes inside its folders
    CHECKPOINTS: lambda name: _CKPT.fullmatch(name) is not None,
    ADAPTER: lambda name: name in ADAPTER_FILES or _leftover(name, ADAPTER_FILES),
}
# keys that do not change what a run computes: a copied or moved run folder resumes as it is
IGNORED_KEYS = ("train.output_dir", "train.return_freed_memory")
# keys added to recipes later, with the value that runs recorded before them had: such a run resumes unchanged
ADDED_KEYS = {"model.dtype": "float32", "model.quantize": "none", "optimizer.name": "adamw",
              "train.gradient_checkpointing": False, "train.chunked_loss": None}


class RunLock:
    """An exclusive lock on a run folder: `<dir>/.deltatune.lock` holds the owner's pid.

    The file is flock()ed while held, so a lock whose owner died (kill -9) is free; its leftover pid
    only names the dead owner in the warning when the next run takes it over.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ValueError(f"train.output_dir {self.path.parent} is a file: choose a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"{self.path.parent} is in use by another deltatune run (pid {owner}, lock {self.path}): "
                    "wait for it to finish, or choose another train.output_dir"
                ) from None
            # the holder may have released and unlinked the file between our open and flock: retry
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        stale = os.read(fd, 64).decode(errors="replace").strip()
        if stale:
            logger.warning("taking over the stale lock %s of pid %s, which is no longer running", self.path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked; acquire() retries if it locked this inode
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that deltatune did not write (all of them when it holds no run marker)."""
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK) if folder.is_dir() else []
    if MARKER not in entries:  # a run killed while writing its first marker left only that write's temporary
        return [name for name in entries if not _leftover(name, (MARKER,))]
    foreign = [name for name in entries if name not in OWN and not _leftover(name, (MARKER, METRICS))]
    for name, ours in _OWN_INSIDE.items():
        sub = folder / name
        if sub.exists() and not sub.is_dir():
            foreign.append(name)
        elif sub.is_dir():
            foreign += [f"{name}/{p.name}" for p in sub.iterdir() if not ours(p.name)]
    if (folder / METRICS).exists() and not (folder / METRICS).is_file():
        foreign.append(METRICS)
    return foreign


def unused(folder: Path) -> bool:
    """Whether `folder` holds nothing but (perhaps) the lock and the run marker, or a killed write of it."""
    return not folder.is_dir() or all(p.name in (LOCK, MARKER) or _leftover(p.name, (MARKER,))
                                      for p in folder.iterdir())


def discard_if_unused(folder: Path, created: bool) -> None:
    """Remove the marker of a run that failed before it wrote anything, and the folder if the run created it."""
    if folder.is_dir() and unused(folder):
        (folder / MARKER).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # not empty after all: another run's lock appeared
                folder.rmdir()


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested recipe dicts, except IGNORED_KEYS."""
    changed = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, ADDED_KEYS.get(f"{prefix}{key}")), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in IGNORED_KEYS:
            changed.append(f"{prefix}{key}")
    return changed


def claim(folder: Path, recipe: dict, resume: bool, overwrite: bool) -> None:
    """Make `folder` this run's, or refuse with the way forward. Call while holding its RunLock.

    `recipe` is the run's recipe as given (plain data); it is recorded in the marker so that a later
    `train` into the same folder knows whether it is the same run.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it: pass one")
    marker = folder / MARKER
    if unused(folder):  # nothing to lose: a run that failed before it wrote anything is not a run
        marker.unlink(missing_ok=True)
    if foreign := sorted(foreign_entries(folder)):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        why = "files deltatune did not write" if marker.is_file() else f"files but no {MARKER} (not a deltatune run)"
        raise ValueError(f"{folder} holds {why}: {shown}; choose an empty or new train.output_dir "
                         "(--overwrite replaces only deltatune's own files)")
    for leftover in folder.glob(".*.tmp"):  # a killed write's; no other run writes here while we hold the lock
        if _leftover(leftover.name, (MARKER, METRICS)):
            leftover.unlink()
    if marker.is_file():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))["recipe"]
            changed = changed_keys(old, recipe)
            other = f" of a different recipe (changed: {', '.join(changed)})" if changed else ""
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            changed, other = True, f" whose {MARKER} is unreadable ({e})"
        if overwrite:
            logger.warning("--overwrite: replacing the run%s in %s", other, folder)
            for name in (CHECKPOINTS, ADAPTER):
                shutil.rmtree(folder / name, ignore_errors=True)
            (folder / METRICS).unlink(missing_ok=True)
        elif resume and changed:
            raise ValueError(f"{folder} holds a run{other}: resume it with its own recipe, "
                             "or pass --overwrite to replace it")
        elif resume:
            return
        else:
            raise ValueError(f"{folder} already holds a deltatune run{other}: pass --resume to continue it, "
                             "--overwrite to replace it, or choose another train.output_dir")
    atomic_write_text(marker, json.dumps({"recipe": recipe}, indent=2) + "\n")
