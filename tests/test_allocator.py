"""train.return_freed_memory (training/allocator.py): glibc's mmap threshold fixed, checked in a child process so
this one's allocator is left as it is; the trainer applies it from the recipe key; bad input is refused."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from deltatune.training import allocator


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_threshold_takes_and_freed_large_blocks_leave_the_process():
    # after the call an 8 MiB block is mmapped: freeing it gives its pages back at once (without it, glibc's
    # dynamic threshold, raised by the 16 MiB block freed first, keeps such blocks in the heap)
    code = """
import ctypes, sys
from deltatune.training.allocator import return_freed_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free(ctypes.c_void_p(libc.malloc(16 << 20)))  # raises the dynamic threshold to 16 MiB
if len(sys.argv) > 1:
    assert return_freed_memory()
block = libc.malloc(8 << 20)
keep = libc.malloc(1 << 10)  # above the block, so a heap block cannot be trimmed off the top either
ctypes.memset(block, 1, 8 << 20)
before = rss()
libc.free(ctypes.c_void_p(block))
print(before - rss())
"""
    freed = {}
    for arg in ([], ["fixed"]):
        out = subprocess.run([sys.executable, "-c", code, *arg], capture_output=True, text=True, check=True)
        freed[bool(arg)] = int(out.stdout.split()[-1])
    assert freed[True] >= 7 << 20, freed  # the block's pages left the process
    assert freed[True] > freed[False], freed


def test_a_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="positive number of bytes"):
        allocator.return_freed_memory(0)


def test_the_recipe_key_reaches_the_allocator(monkeypatch, tmp_path):
    from test_training_precision import MINILM_SHORT

    from deltatune.training import loop
    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    calls = []
    monkeypatch.setattr(loop, "return_freed_memory", lambda: calls.append(1) or True)
    Trainer(load_recipe(None, [*MINILM_SHORT, "train.return_freed_memory=true", f"train.output_dir={tmp_path / 'a'}"])
            ).setup()
    assert calls == [1]
    Trainer(load_recipe(None, [*MINILM_SHORT, f"train.output_dir={tmp_path / 'b'}"])).setup()
    assert calls == [1]

