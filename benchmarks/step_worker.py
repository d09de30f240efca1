"""A long-lived train-step worker for cross-library benchmarks: JSON lines on stdin, one JSON reply line each.

Imports only the stdlib and torch, so it runs in a peer's venv (.venv-adapters) as well as deltatune's. The
driver builds each contender once, then asks for blocks of timed steps and for step-local memory peaks,
alternating workers so machine load hits both libraries alike. Requests:

    {"op": "setup", ...}                     -> whatever the side's setup returns (versions, threads, ...)
    {"op": "build", "key": k, ...}           -> {"key": k, "trainable": n, ...}; the step is kept under k
    {"op": "time", "key": k, "steps": 3}     -> {"seconds": [s, s, s]}  (perf_counter around each step)
    {"op": "peak", "key": k}                 -> {"bytes": b}  (PeakRSS.excess of one step)
    {"op": "quit"}
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

MEASURE = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "bench" / "measure.py"


def load_measure():
    """deltatune's bench/measure.py loaded from its file (stdlib + torch only), so the peer's worker measures
    memory with the very same PeakRSS without importing deltatune."""
    spec = importlib.util.spec_from_file_location("deltatune_bench_measure", MEASURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(setup: Callable[[dict], dict], build: Callable[[dict], tuple[Callable[[], None], int, dict]]) -> None:
    """Answer requests until "quit" or end of input. build(request) -> (step, trainable parameters, extra)."""
    replies = os.fdopen(os.dup(1), "w")  # the protocol's channel ...
    os.dup2(2, 1)  # ... and everything libraries print goes to stderr, never into a reply
    peak_rss = load_measure().PeakRSS
    steps: dict[str, Callable[[], None]] = {}

    def handle(request: dict) -> dict:
        op = request["op"]
        if op == "setup":
            return setup(request)
        if op == "build":
            step, trainable, extra = build(request)
            steps[request["key"]] = step
            return {"key": request["key"], "trainable": trainable, **extra}
        if op == "time":
            seconds = []
            for _ in range(request["steps"]):
                t0 = time.perf_counter()
                steps[request["key"]]()
                seconds.append(time.perf_counter() - t0)
            return {"seconds": seconds}
        if op == "peak":
            with peak_rss() as peak:
                steps[request["key"]]()
            return {"bytes": peak.excess}
        raise ValueError(f"unknown op {op!r}: expected setup, build, time, peak or quit")

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            reply = handle(request)
        except Exception as err:  # the driver reports it and stops; the traceback is on stderr
            traceback.print_exc()
            reply = {"error": f"{type(err).__name__}: {err}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
