"""Freed CPU memory back to the system: glibc's malloc keeps freed blocks below its mmap threshold in the heap,
and by default raises that threshold (up to 32 MiB) each time a large block is freed. A training step allocates
and frees activations and dequantised weights of a few MiB each, so the heap fills with holes that stay resident:
on a checkpointed QLoRA step of Qwen2.5-0.5B about 300 MiB of the step's peak RSS (one probe run: 829 -> 507
MiB with transformers' loss, 651-724 -> 302-335 MiB with the chunked loss). A fixed threshold serves blocks of that size from mmap, which returns them on free; the
results are unchanged (only where the bytes live). Linux with glibc only; elsewhere a no-op that says so.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more from mmap for the rest of the process (glibc's
    M_MMAP_THRESHOLD, which also stops its dynamic raise). Returns whether it took effect."""
    if threshold < 1:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold}")
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        logger.warning("train.return_freed_memory needs Linux with glibc (mallopt); the allocator is unchanged")
        return False
    if not mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)):
        logger.warning("glibc refused an mmap threshold of %d bytes (too large for this build's heaps); "
                       "the allocator is unchanged", threshold)
        return False
    return True
