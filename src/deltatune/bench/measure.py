"""Timing and memory that survive a noisy machine: interleaved rounds, per-round ratios, step-local peaks.

Contenders run round-robin (A B C A B C ...), so drift in machine load hits all of them alike, and each
comparison is the median of per-round ratios with its min and max. Memory is the step's peak above the
level just before it: on CPU resident memory sampled every millisecond from /proc/self/statm after
`malloc_trim(0)` has handed memory freed by earlier steps back to the system (otherwise the allocator's
cache hides a step's footprint); on CUDA `torch.cuda.max_memory_allocated` after a reset.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: no trim, peaks then include the allocator's cache
        return None


LIBC = _libc()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread."""

    def __enter__(self) -> PeakRSS:
        if LIBC is not None:
            LIBC.malloc_trim(0)
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.excess = self.peak - self.start


class PeakCUDA:
    """Peak allocated CUDA memory above the level at entry."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.excess = torch.cuda.max_memory_allocated() - self.start


def peak_meter(device: torch.device) -> type:
    return PeakCUDA if device.type == "cuda" else PeakRSS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _round_order(keys: list[str], i: int) -> list[str]:
    return keys if i % 2 == 0 else keys[::-1]


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, in `rounds` round-robin rounds after `warmup` untimed ones (odd
    rounds reversed, as `peak_samples`: neighbours follow each other alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + rounds):
        for key in _round_order(list(fns), i):
            _sync(device)
            t0 = time.perf_counter()
            fns[key]()
            _sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


def interleaved_peaks(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median step-local peak memory (MiB) of each function, round-robin (separate from timing: the sampler
    thread would slow the timed steps). Odd rounds run in reverse order, so of two neighbours (deltatune and its
    peer on one base) each follows the other as often: what a step finds free in the heap depends on the step
    before it."""
    return {k: statistics.median(v) / 2**20 for k, v in peak_samples(fns, rounds, device).items()}


def peak_samples(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list[int]]:
    """Each function's step-local peak (bytes) in each of `rounds` round-robin rounds, odd ones reversed."""
    meter = peak_meter(device)
    keys = list(fns)
    peaks: dict[str, list[int]] = {k: [] for k in keys}
    for i in range(rounds):
        for key in _round_order(keys, i):
            with meter() as m:
                fns[key]()
            peaks[key].append(m.excess)
    return peaks


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """min / median / max over rounds of a[i] / b[i] (the same round, so the same machine state)."""
    return spread([x / y for x, y in zip(a, b)])
