"""Bottleneck adapters, deltatune vs AdapterHub `adapters` 1.3: train step time and step peak memory on MiniLM.

Each library runs in its own long-lived worker process and venv (deltatune: this interpreter; AdapterHub:
.venv-adapters from benchmarks/setup_adapters.sh, through `adapterhub_peer.py --serve`), talking JSON lines
(benchmarks/step_worker.py). Both build every adapter once on all-MiniLM-L6-v2 with a 2-label classifier on
the pooler output, and train on the same real Rotten Tomatoes batch (32 x 64 tokens): forward, cross-entropy,
backward, AdamW. The driver alternates the workers block by block (a block: `--block` steps of one adapter on
one side; the side that goes first swaps every round), so machine load hits both alike; only one worker runs
at a time. Time: median over steps; ratio: deltatune / AdapterHub per round (min / median / max). Memory: each
worker's step-local peak resident memory (deltatune.bench.measure.PeakRSS: /proc/self/statm sampled every
millisecond after malloc_trim, the peak above the level just before one step), median over `--peaks` rounds.

    bash benchmarks/setup_adapters.sh   # once
    OMP_NUM_THREADS=1 python benchmarks/adapters_vs_adapterhub.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEER_PYTHON = HERE.parent / ".venv-adapters" / "bin" / "python"
# label -> (deltatune method options, the AdapterHub config with the same size, activation and placement)
PAIRS: dict[str, tuple[dict, str]] = {
    "houlsby": ({"name": "houlsby"}, "double_seq_bn"),  # m = 384 / 16, swish, after attention and FFN
    "pfeiffer": ({"name": "pfeiffer"}, "seq_bn"),  # m = 384 / 16, relu, after the FFN, reads N(h + r)
    "scaled_parallel_adapter": ({"name": "scaled_parallel_adapter"}, "par_bn"),  # m = 384 / 2, relu, s = 4
    "compacter": ({"name": "compacter"}, "compacter"),  # PHM n = 4, k = 1, m = 384 / 32, gelu, Houlsby's places
    "compacter++": ({"name": "compacter++"}, "compacter++"),  # the same, Pfeiffer's place
}


def deltatune_worker() -> None:
    """--worker: the deltatune side (same protocol as adapterhub_peer.py --serve)."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from step_worker import serve

    import deltatune as dt
    from deltatune import assets
    from deltatune.bench import cases

    state = {}

    def setup(request: dict) -> dict:
        case = state["case"] = cases.load("minilm")
        save_file(case.batch, request["batch"])  # the AdapterHub worker trains on these very tensors
        return {"model": str(assets.minilm_path()), "threads": torch.get_num_threads(),
                "versions": {"deltatune": dt.__version__, "transformers": transformers.__version__,
                             "torch": torch.__version__}}

    def build(request: dict):
        case = state["case"]
        options = dict(request["options"])
        torch.manual_seed(request.get("seed", 0))
        dm = dt.inject(copy.deepcopy(case.model), dt.make_config(options.pop("name"), **options),
                       train_modules=case.head)
        dm.train()
        params = [p for p in dm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=request.get("lr", 1e-5))

        def step() -> None:
            dm.on_train_step(0)
            (dm(**case.batch).loss + dm.regularization_loss()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, dm.trainable_parameters(), {"attention": case.model.config._attn_implementation}

    serve(setup, build)


class Worker:
    """One side's process; ask() sends a request and waits for its reply line."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name, self.log = name, log
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                     text=True, env=env, cwd=HERE)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line else {"error": "the worker exited"}
        if "error" in reply:
            tail = self.log.read_text()[-3000:]
            sys.exit(f"{self.name} worker failed on {request['op']}: {reply['error']}\n--- its stderr ---\n{tail}")
        return reply

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure(workers: dict[str, Worker], labels: list[str], rounds: int, block: int, peaks: int) -> dict:
    from deltatune.bench.measure import ratio, spread

    sides = list(workers)
    per_round = {(label, side): [] for label in labels for side in sides}  # each round's block median
    every = {(label, side): [] for label in labels for side in sides}
    memory = {(label, side): [] for label in labels for side in sides}
    for label in labels:  # warm-up: one untimed block each
        for side in sides:
            workers[side].ask(op="time", key=label, steps=block)
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for label in labels:
            for side in order:
                seconds = workers[side].ask(op="time", key=label, steps=block)["seconds"]
                per_round[label, side].append(statistics.median(seconds))
                every[label, side].extend(seconds)
        print(f"round {r + 1}/{rounds} timed", flush=True)
    for r in range(peaks):  # apart from timing: the sampler thread would slow the timed steps
        order = sides if r % 2 == 0 else sides[::-1]
        for label in labels:
            for side in order:
                memory[label, side].append(workers[side].ask(op="peak", key=label)["bytes"] / 2**20)
    a, b = sides
    return {label: {
        "step_s": {side: spread(every[label, side]) for side in sides},
        "time_ratio": ratio(per_round[label, a], per_round[label, b]),
        "peak_mib": {side: spread(memory[label, side]) for side in sides},
        "memory_ratio": ratio(memory[label, a], memory[label, b]),
    } for label in labels}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Bottleneck adapters: deltatune vs AdapterHub `adapters`", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"deltatune {meta['deltatune']['versions']} | AdapterHub {meta['adapterhub']['versions']}  ",
             f"Attention: deltatune side `{meta['attention']['deltatune']}`, AdapterHub side "
             f"`{meta['attention']['adapterhub']}`; threads {meta['deltatune']['threads']} / "
             f"{meta['adapterhub']['threads']}", "",
             f"all-MiniLM-L6-v2 + 2-label classifier, one real Rotten Tomatoes batch of 32 x 64 tokens, train step "
             f"= forward + cross-entropy + backward + AdamW. Two worker processes (one per library and venv), "
             f"alternated in blocks of {meta['block']} steps for {meta['rounds']} rounds. Time: median seconds per "
             f"step; ratio deltatune / AdapterHub, median (min-max) over rounds. Memory: step-local peak resident "
             f"memory of each worker (PeakRSS: the peak above the level before one step), median of "
             f"{meta['peaks']} steps. Trainable parameters include the 770 of the head and are equal on both "
             f"sides (checked).", "",
             "| adapter | AdapterHub config | trainable | step s deltatune | step s AdapterHub | time ratio | "
             "peak MiB deltatune | peak MiB AdapterHub | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in result["adapters"].items():
        t, m = r["time_ratio"], r["memory_ratio"]
        lines.append(f"| {label} | `{r['adapterhub_config']}` | {r['trainable']:,} | "
                     f"{r['step_s']['deltatune']['median']:.3f} | {r['step_s']['adapterhub']['median']:.3f} | "
                     f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) | "
                     f"{r['peak_mib']['deltatune']['median']:.0f} | {r['peak_mib']['adapterhub']['median']:.0f} | "
                     f"{m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=3, help="steps per block (one side, one adapter)")
    parser.add_argument("--peaks", type=int, default=4, help="memory rounds (one step per side and adapter)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return deltatune_worker()
    if not PEER_PYTHON.is_file():
        sys.exit(f"{PEER_PYTHON} is missing: run `bash benchmarks/setup_adapters.sh` first (AdapterHub's venv)")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        workers = {"deltatune": Worker("deltatune", [sys.executable, str(Path(__file__).resolve()), "--worker"],
                                       tmp / "deltatune.log"),
                   "adapterhub": Worker("AdapterHub", [str(PEER_PYTHON), str(HERE / "adapterhub_peer.py"),
                                                       "--serve"], tmp / "adapterhub.log")}
        batch = str(tmp / "batch.safetensors")
        setups = {"deltatune": workers["deltatune"].ask(op="setup", batch=batch)}
        setups["adapterhub"] = workers["adapterhub"].ask(op="setup", batch=batch, model=setups["deltatune"]["model"])
        adapters_out, attention = {}, {}
        for label in args.adapters:
            options, hub_config = PAIRS[label]
            ours = workers["deltatune"].ask(op="build", key=label, options=options)
            theirs = workers["adapterhub"].ask(op="build", key=label, config=hub_config)
            print(f"{label}: trainable deltatune {ours['trainable']:,}, AdapterHub {theirs['trainable']:,}", flush=True)
            if ours["trainable"] != theirs["trainable"]:
                sys.exit(f"{label}: the two sides train different parameter counts ({ours['trainable']:,} vs "
                         f"{theirs['trainable']:,}): their configs differ, fix PAIRS before timing")
            attention = {"deltatune": ours["attention"], "adapterhub": theirs["attention"]}
            adapters_out[label] = {"adapterhub_config": hub_config, "deltatune_options": options,
                                   "trainable": ours["trainable"], "adapterhub_resolved": theirs["config"]}
        costs = measure(workers, args.adapters, args.rounds, args.block, args.peaks)
        for w in workers.values():
            w.close()
    for label in args.adapters:
        adapters_out[label].update(costs[label])
    meta = {"command": " ".join(["python", "benchmarks/adapters_vs_adapterhub.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, CPU",
            "rounds": args.rounds, "block": args.block, "peaks": args.peaks, "attention": attention, **setups}
    result = {"meta": meta, "adapters": adapters_out}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapters_vs_adapterhub.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "adapters_vs_adapterhub.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
