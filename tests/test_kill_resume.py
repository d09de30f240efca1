"""kill -9 property test: `deltatune train` killed anywhere, then `--resume`d, ends bitwise equal to an
uninterrupted run, and no checkpoint that loads was ever partially written.

Each run is `deltatune train` (the CLI's main()) in its own process (CPU, one thread), forked from a
server that has imported deltatune once. The child prints an event after every file write, fsync,
rename, unlink (so inside checkpoint writes and prunes), metrics row and step; the test SIGKILLs it
either while it sleeps just after event k ("pause", an exact point) or a random 0-0.2 s after it
("race", anywhere). The seed is random per run and shown on
failure; set DELTATUNE_KILL_SEED to replay one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.training import checkpoint

SRC = Path(deltatune.__file__).resolve().parents[1]
# 16 examples in batches of 4, 2 micro-batches a step: an epoch every 2 steps, a checkpoint every 2,
# pruned to the newest 2; dropout on, so the RNG state must survive the kill too
RECIPE = ["data.max_train=16", "data.max_eval=8", "train.batch_size=4", "train.grad_accum=2",
          "train.max_length=16", "train.steps=20", "train.save_every=2", "train.keep_checkpoints=2",
          "train.eval_every=5", "method.dropout=0.1", "optimizer.lr=1e-2"]
# a prompt adapter: P-tuning's LSTM encoder with dropout between its layers (the RNG state matters again),
# folded into its output when the run saves it
PROMPT_RECIPE = [*RECIPE[:-2], "method={name: p_tuning, num_virtual_tokens: 4, encoder_reparameterization_type: "
                 "LSTM, encoder_hidden_size: 16, encoder_dropout: 0.1}", "optimizer.lr=1e-2"]

# A fork server: imports deltatune once, then forks one child per `deltatune train` (its stdout and stderr
# go to a log file that the test reads), so each run costs its own work and not the ~6 s of imports.
# The child patches the writes it reports and runs the CLI's main(); SIGKILL hits it as it would any run.
SERVER = r"""
import json, os, shutil, sys, time, traceback
import torch
from deltatune.cli.main import main
from deltatune import assets
from deltatune.training import checkpoint, loop
import transformers.models.bert.modeling_bert  # loaded once here, not in every child
assets.rotten_tomatoes()  # cached: the children read it from memory

def child(argv, log, stop_at, snapshots):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = sys.stdout
    count = 0

    def event(name):
        nonlocal count
        count += 1
        print(f"EVENT {count} {name}", flush=True)
        if count == stop_at:
            print("PAUSED", flush=True)
            time.sleep(120)  # killed here

    def after(fn, name):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            event(name)
            return out
        return wrapped

    real_replace = os.replace

    def replaced(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if snapshots and os.path.basename(dst).startswith("ckpt-"):  # the reference keeps every checkpoint
            shutil.copytree(dst, os.path.join(snapshots, os.path.basename(dst)))
        event("replace")

    os.replace = replaced
    checkpoint.save_file = after(checkpoint.save_file, "safetensors")
    torch.save = after(torch.save, "torch.save")
    os.fsync = after(os.fsync, "fsync")
    os.unlink = after(os.unlink, "unlink")
    loop.Trainer._log = after(loop.Trainer._log, "metrics row")
    loop.Trainer.train_step = after(loop.Trainer.train_step, "step")
    code = 3
    try:
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        print(f"EXIT {code}", flush=True)
        os._exit(code)

for line in sys.stdin:
    cmd = json.loads(line)
    if "wait" in cmd:
        _, status = os.waitpid(cmd["wait"], 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        child(cmd["argv"], cmd["log"], cmd["stop_at"], cmd["snapshots"])
    print(json.dumps(pid), flush=True)
"""


class Runs:
    """`deltatune train` runs forked from one server process."""

    def __init__(self, tmp_path: Path, recipe: list[str]):
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)
        self.tmp, self.count, self.recipe = tmp_path, 0, recipe

    def ask(self, cmd: dict):
        self.server.stdin.write(json.dumps(cmd) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def start(self, out: Path, resume: bool, stop_at: int = 0, snapshots: Path | None = None) -> tuple[int, Path]:
        self.count += 1
        log = self.tmp / f"run{self.count}.log"
        log.write_text("")  # before the child starts, so that following it never finds no file
        argv = ["train", *self.recipe, f"train.output_dir={out}", *(["--resume"] if resume else [])]
        pid = self.ask({"argv": argv, "log": str(log), "stop_at": stop_at, "snapshots": snapshots and str(snapshots)})
        return pid, log

    def wait(self, pid: int) -> int:
        return self.ask({"wait": pid})

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def lines(log: Path, running: Callable[[], bool]) -> Iterator[str]:
    """The lines of a child's log as it writes them, until it exits."""
    pos, buffer, deadline = 0, "", time.monotonic() + 300
    while time.monotonic() < deadline:
        with open(log) as f:
            f.seek(pos)
            chunk = f.read()
            pos = f.tell()
        buffer += chunk
        *done, buffer = buffer.split("\n")
        yield from done
        if not chunk:
            if not running() and not buffer:
                return
            time.sleep(0.005)
    raise TimeoutError(f"{log}: no exit after 300 s")


def run_and_kill(runs: Runs, pid: int, log: Path, at: int, mode: str, rng: random.Random) -> tuple[bool, str]:
    """Follow the child's events and SIGKILL it at event `at`; (killed, its output)."""
    finished = []
    for line in lines(log, lambda: not finished):
        if line.startswith("EXIT"):
            finished.append(line)
        elif (mode == "pause" and line == "PAUSED") or (mode == "race" and line.startswith(f"EVENT {at} ")):
            if mode == "race":
                time.sleep(rng.uniform(0, 0.2))
            os.kill(pid, signal.SIGKILL)
            code = runs.wait(pid)
            return code == -signal.SIGKILL, log.read_text()
    runs.wait(pid)
    return False, log.read_text()  # it finished before event `at`


def loadable(root: Path) -> dict[str, dict]:
    """Every checkpoint under `root` that loads: name -> its tensors and trainer state (without wall time)."""
    found = {}
    for _, path in checkpoint.checkpoints(root):
        try:
            ckpt = checkpoint.load_checkpoint(path)
        except Exception:
            continue  # a torn one: load_latest skips it (with a warning)
        found[path.name] = {"params": ckpt.params, "state": {k: v for k, v in ckpt.trainer_state.items() if k not in ("elapsed", "recipe")}}
    return found


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in rows]


def check_kill_resume(tmp_path: Path, kills: int, recipe: list[str] = RECIPE) -> None:
    seed = int(os.environ.get("DELTATUNE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    whole, parts, snapshots = tmp_path / "whole", tmp_path / "parts", tmp_path / "snapshots"
    snapshots.mkdir()
    runs = Runs(tmp_path, recipe)
    try:
        reference, reference_log = runs.start(whole, resume=False, snapshots=snapshots)  # beside the killed ones
        seen_checkpoints, log = [], []
        for i in range(kills):
            mode = rng.choice(["pause", "race"])
            at = rng.randint(1, 45)  # a whole run has about 150 events: each kill lands in the next third or so
            pid, child_log = runs.start(parts, resume=i > 0, stop_at=at if mode == "pause" else 0)
            killed, out = run_and_kill(runs, pid, child_log, at, mode, rng)
            log.append(f"run {i}: {mode} at event {at}, killed={killed}, last: {out.strip().splitlines()[-1:]}")
            assert killed or "EXIT 0" in out, f"seed {seed}: {log}\n{out}"
            seen_checkpoints.append(loadable(parts / "checkpoints"))
        pid, child_log = runs.start(parts, resume=True)
        assert runs.wait(pid) == 0, f"seed {seed}: {log}\n{child_log.read_text()}"
        assert runs.wait(reference) == 0, reference_log.read_text()
    finally:
        runs.close()

    context = f"seed {seed}: {log}"
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(parts / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys(), context
    for key in a:
        assert torch.equal(a[key], b[key]), f"{context}: {key} differs"
    assert metric_rows(parts) == metric_rows(whole), context
    # no partially written checkpoint ever loads: whatever loaded after a kill is the reference's
    expected = loadable(snapshots)
    for found in seen_checkpoints:
        for name, ckpt in found.items():
            assert ckpt["state"] == expected[name]["state"], f"{context}: {name}"
            assert all(torch.equal(t, expected[name]["params"][k]) for k, t in ckpt["params"].items()), context
            assert ckpt["params"].keys() == expected[name]["params"].keys(), context


def test_killed_and_resumed_runs_end_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    check_kill_resume(tmp_path, kills=3)


@pytest.mark.slow
def test_many_kills_end_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    check_kill_resume(tmp_path, kills=10)


@pytest.mark.slow
def test_a_killed_and_resumed_prompt_adapter_run_ends_bitwise_equal(tmp_path):
    check_kill_resume(tmp_path, kills=3, recipe=PROMPT_RECIPE)
