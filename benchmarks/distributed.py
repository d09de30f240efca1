"""Data-parallel training on CPU: 1 process vs 2 (DDP, FSDP) on MiniLM / Rotten Tomatoes, the embedded recipe.

Each setting is one `torchrun` launch of this file as its worker (imports, model load and data included, as a
user runs it); settings are interleaved round by round. All settings share the global batch (32), data order and
step count, and every run gets the same 2 cores: 1 process with 2 threads, or 2 processes with 1 thread each.
Per rank the worker records: training throughput (global samples/s, median over the steps after the first),
peak resident memory (ru_maxrss, which includes loading the whole model before FSDP shards it), resident
memory after training, and the bytes of frozen (base) and trainable parameters the rank holds.

    python benchmarks/distributed.py                 # 1 round of 8 steps, writes benchmarks/results/distributed.{json,md}
    python benchmarks/distributed.py --rounds 3 --steps 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parent.parent / "src"
CORES = 2
SETTINGS = {"1 process": (1, "none"), "2 processes, DDP": (2, "ddp"), "2 processes, FSDP": (2, "fsdp")}


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec_path: str) -> None:
    """One training run under torchrun; rank 0 writes every rank's measurements to spec["report"]."""
    from deltatune.training import distributed
    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if parallel:  # started here, so that it outlives the Trainer for the gather below
        torch.distributed.init_process_group("gloo")
    trainer = Trainer(load_recipe(None, spec["overrides"]))
    trainer.setup()
    held = {"base_bytes": distributed.local_parameter_bytes(trainer.model),
            "trainable_bytes": distributed.local_parameter_bytes(trainer.model, trainable=True)}
    result = trainer.train()
    rows = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # the first step warms up
    mine = {**held, "samples_per_s": statistics.median(speeds), "peak_rss_mib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "end_rss_mib": rss_mib(), "accuracy": result.after["accuracy"]}
    everyone = trainer.group.gather(mine)
    if trainer.group.main:
        Path(spec["report"]).write_text(json.dumps(everyone))
    if parallel:
        torch.distributed.destroy_process_group()


def launch(processes: int, mode: str, steps: int, work: Path, tag: str) -> list[dict]:
    report = work / f"{tag}.json"
    overrides = [f"train.steps={steps}", "data.max_train=2000", "data.max_eval=100",
                 f"train.distributed={mode}", f"train.output_dir={work / tag}"]
    spec = work / f"{tag}-spec.json"
    spec.write_text(json.dumps({"overrides": overrides, "threads": CORES // processes, "report": str(report)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(CORES // processes), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           __file__, "--worker", str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tag} failed:\n{proc.stderr[-4000:]}")
    return json.loads(report.read_text())


def table(runs: dict[str, list[list[dict]]]) -> tuple[list[dict], str]:
    """One row per setting: medians over rounds of each rank's figures (ranks shown as a / b)."""
    rows = []
    for name, rounds in runs.items():
        def per_rank(key: str, rounds: list[list[dict]] = rounds) -> list[float]:
            return [statistics.median(r[rank][key] for r in rounds) for rank in range(len(rounds[0]))]
        rows.append({"setting": name, "samples_per_s": statistics.median(r[0]["samples_per_s"] for r in rounds),
                     **{key: per_rank(key) for key in ("peak_rss_mib", "end_rss_mib", "base_bytes",
                                                       "trainable_bytes", "accuracy")}})
    one = rows[0]
    lines = ["| setting | samples/s (vs 1 process) | peak RSS per process, MiB | RSS after training, MiB "
             "| base parameters per process, MiB | trainable per process, KiB | held-out accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        def ranks(values: list[float], unit: float = 1.0, fmt: str = "{:.0f}") -> str:
            return " / ".join(fmt.format(v / unit) for v in values)
        lines.append(f"| {r['setting']} | {r['samples_per_s']:.1f} ({r['samples_per_s'] / one['samples_per_s']:.2f}x) "
                     f"| {ranks(r['peak_rss_mib'])} | {ranks(r['end_rss_mib'])} | {ranks(r['base_bytes'], 2**20, '{:.1f}')} "
                     f"| {ranks(r['trainable_bytes'], 2**10, '{:.0f}')} | {ranks(r['accuracy'], 1, '{:.3f}')} |")
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    runs: dict[str, list[list[dict]]] = {name: [] for name in SETTINGS}
    load_before = os.getloadavg()[0]  # other jobs on the same cores show up in every time measured
    with tempfile.TemporaryDirectory(prefix="deltatune-dist-") as tmp:
        for i in range(args.rounds):
            order = list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))  # interleaved
            for name in order:
                processes, mode = SETTINGS[name]
                runs[name].append(launch(processes, mode, args.steps, Path(tmp), f"{mode}-{processes}-{i}"))
                print(f"round {i + 1}: {name}: {runs[name][-1][0]['samples_per_s']:.1f} samples/s", flush=True)
    rows, md = table(runs)
    env = {"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
           "rounds": args.rounds, "steps": args.steps, "recipe": "embedded lora_minilm_rotten_tomatoes, batch 32",
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"env": env, "rows": rows, "runs": runs}, indent=1) + "\n")
    header = (f"# Data-parallel training on CPU: 1 vs 2 processes\n\n`python benchmarks/distributed.py --rounds "
              f"{args.rounds} --steps {args.steps}`; {env['recipe']}, {args.steps} steps; torch {env['torch']}, "
              f"{env['cores']} cores shared by both processes (1 process: 2 threads; 2 processes: 1 thread each). "
              "Figures are medians over rounds; per-process figures are rank 0 / rank 1. 1-minute load average "
              f"before / after: {env['load_average_1min'][0]} / {env['load_average_1min'][1]} (2 = both cores busy).\n\n")
    (RESULTS / "distributed.md").write_text(header + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
