"""Checkpoint merging: `deltatune merge` vs `mergekit-yaml` on the same sharded inputs, time and peak memory.

Inputs: the real SmolLM2-135M-Instruct (fp32) saved as a sharded checkpoint (100 MB shards), and variants
= base + deterministic Gaussian noise with std 0.005 x each tensor's std. The variants are not fine-tunes:
the benchmark measures the merge engines (IO, memory, arithmetic), not the quality of the merged model.

Each merge is its own subprocess, as a user runs it (imports and start-up included). Rounds are
interleaved (deltatune, mergekit; next round mergekit, deltatune), after one pass that reads every input
file so that both tools find the page cache warm. Peak memory is the merge process's peak resident set
(`ru_maxrss` from `os.wait4`, taken by a small spawner process: see `run`). For the deterministic methods
(linear, task_arithmetic, ties) the outputs are compared tensor by tensor; dare_ties and della draw random
masks that differ between the tools, so they are compared on time and memory only.

    bash benchmarks/setup_mergekit.sh                    # mergekit in its own venv, .venv-mergekit
    python benchmarks/merge_vs_mergekit.py               # 3 rounds, all methods
    python benchmarks/merge_vs_mergekit.py --rounds 1 --methods ties
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from torch import Tensor

from deltatune import assets
from deltatune.merging.checkpoint import CheckpointReader

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DELTATUNE = Path(sys.executable).parent / "deltatune"
MERGEKIT = ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"
SHARD = "100MB"  # both tools: 10^8 bytes (mergekit's --out-shard-size counts bytes despite its help text)
NOISE = 0.005  # variant = base + N(0, (NOISE * std(tensor))^2), per tensor
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5
EXACT = ("linear", "task_arithmetic", "ties")  # deterministic in both tools: outputs must agree
METHODS = (*EXACT, "dare_ties", "della")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOLERANCE = 1e-5  # max |deltatune - mergekit| for fp32 outputs to count as agreeing


# --- inputs --------------------------------------------------------------------------------------
def make_inputs(work: Path, variants: int) -> list[Path]:
    """base + `variants` noisy copies as sharded HF checkpoints with tokenizer files; built once, reused."""
    folders = [work / "base", *[work / f"variant{i}" for i in range(1, variants + 1)]]
    stamp = work / "inputs.json"
    spec = {"noise": NOISE, "variants": variants, "shard": SHARD}
    complete = all((f / "config.json").is_file() for f in folders)
    if complete and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return folders
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shutil.rmtree(work, ignore_errors=True)
    source = assets.smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    base = {k: p.detach().clone() for k, p in model.named_parameters()}  # tied weights appear once
    for i, folder in enumerate(folders):
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = torch.Generator().manual_seed(1000 * i + sum(map(ord, name)))
                std = base[name].std().item() if base[name].numel() > 1 else 1.0
                noise = torch.randn(p.shape, generator=g) * (NOISE * std) if i else 0.0
                p.copy_(base[name] + noise)
        model.save_pretrained(folder, max_shard_size=SHARD)
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, folder / file)
    stamp.write_text(json.dumps(spec))
    return folders


def warm_page_cache(folders: list[Path]) -> None:
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


# --- configs -------------------------------------------------------------------------------------
def deltatune_config(method: str, base: Path, models: list[Path], out: Path) -> dict:
    cfg = {"method": method, "models": [{"path": str(m), "weight": w} for m, w in zip(models, WEIGHTS)],
           "seed": 0, "output": {"path": str(out), "dtype": "float32", "max_shard_size": SHARD}}
    if method != "linear":
        cfg["base_model"] = str(base)
        cfg["parameters"] = {"density": DENSITY} if method != "task_arithmetic" else {}
    return cfg


def mergekit_config(method: str, base: Path, models: list[Path]) -> dict:
    def params(w: float) -> dict:
        return {"weight": w} if method in ("linear", "task_arithmetic") else {"weight": w, "density": DENSITY}

    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(m), "parameters": params(w)} for m, w in zip(models, WEIGHTS)]}
    if method != "linear":
        cfg["base_model"] = str(base)
    return cfg


def commands(method: str, base: Path, models: list[Path], work: Path) -> dict[str, tuple[list[str], Path]]:
    """tool -> (command line, output folder)."""
    runs = {}
    for tool in ("deltatune", "mergekit"):
        out = work / "out" / f"{tool}-{method}"
        cfg = (deltatune_config(method, base, models, out) if tool == "deltatune"
               else mergekit_config(method, base, models))
        path = work / "configs" / f"{tool}-{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if tool == "deltatune":
            cmd = [str(DELTATUNE), "merge", str(path), "--no-progress"]
        else:  # same device, dtype and shard size; no model card (deltatune writes none)
            cmd = [str(MERGEKIT), str(path), str(out), "--no-cuda", "--lazy-unpickle", "--out-shard-size",
                   SHARD.removesuffix("B"), "--copy-tokenizer", "--no-write-model-card", "--quiet"]
        runs[tool] = (cmd, out)
    return runs


# --- measuring -----------------------------------------------------------------------------------
# Linux folds the parent's peak RSS into a child's ru_maxrss at exec (vfork/fork share or copy its memory),
# so this large benchmark process cannot wait4 the merge directly: a fresh, small interpreter spawns it,
# waits for it alone, and reports (seconds, peak RSS, exit code). Its ~10 MiB floor is far below any merge.
TIMER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
json.dump([time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)],
          open(sys.argv[1], "w"))
"""


def run(cmd: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command; raises with its log tail when it fails."""
    stats = log.with_suffix(".json")
    with open(log, "wb") as f:
        subprocess.run([sys.executable, "-I", "-S", "-c", TIMER, str(stats), *cmd], stdout=f,
                       stderr=subprocess.STDOUT, cwd=ROOT, check=True)
    seconds, peak, code = json.loads(stats.read_text())
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}):\n{log.read_text()[-3000:]}")
    return seconds, peak


def at_magnitude_ties(base: Tensor, finetuned: list[Tensor]) -> Tensor:
    """Entries whose |task vector| equals the k-th largest in some model (k = density * numel): where TIES
    must break a tie to keep exactly k entries, and the two tools break it differently."""
    tied = torch.zeros(base.numel(), dtype=torch.bool)
    for t in finetuned:
        magnitude = (t - base).abs().flatten()
        tied |= magnitude == magnitude.topk(int(DENSITY * magnitude.numel())).values[-1]
    return tied.reshape(base.shape)


def compare(method: str, ours: Path, theirs: Path, folders: list[Path]) -> dict:
    """max |deltatune - mergekit| over the tensors both wrote, next to max |merged - base| for scale."""
    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    ref, variants = CheckpointReader(folders[0]), [CheckpointReader(f) for f in folders[1:]]
    common = [k for k in a.keys() if k in b]
    diff = change = 0.0
    differing = unexplained = entries = 0
    for k in common:
        x, y = a.read(k), b.read(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            raise RuntimeError(f"'{k}': deltatune {x.dtype} {tuple(x.shape)}, "
                               f"mergekit {y.dtype} {tuple(y.shape)}")
        gap = (x.double() - y.double()).abs()
        diff, entries = max(diff, gap.max().item()), entries + x.numel()
        change = max(change, (x.double() - ref.read(k).double()).abs().max().item())
        off = gap > TOLERANCE
        differing += int(off.sum())
        if off.any() and method == "ties":
            off &= ~at_magnitude_ties(ref.read(k), [v.read(k) for v in variants])
        unexplained += int(off.sum())
    return {"max_abs_diff": diff, "max_abs_change_from_base": change, "tensors_compared": len(common),
            "entries": entries, "entries_differing": differing,
            "differing_not_at_magnitude_ties": unexplained,
            "only_deltatune": sorted(set(a.keys()) - set(b.keys())),
            "only_mergekit": sorted(set(b.keys()) - set(a.keys())),
            "agree": unexplained == 0 and set(a.keys()) == set(b.keys())}


def startup_rss(work: Path) -> dict[str, int]:
    """Peak RSS of each tool's command doing nothing but parse --help: the import floor under every merge."""
    return {"deltatune": run([str(DELTATUNE), "merge", "--help"], work / "help-deltatune.log")[1],
            "mergekit": run([str(MERGEKIT), "--help"], work / "help-mergekit.log")[1]}


def measure(methods: list[str], rounds: int, work: Path, folders: list[Path]) -> dict:
    base, models = folders[0], folders[1:]
    raw: dict[str, dict[str, list[dict]]] = {m: {"deltatune": [], "mergekit": []} for m in methods}
    agreement, cmdlines = {}, {}
    for r in range(rounds):
        for method in methods:
            runs = commands(method, base, models, work)
            cmdlines[method] = {tool: " ".join(cmd) for tool, (cmd, _) in runs.items()}
            order = ["deltatune", "mergekit"] if r % 2 == 0 else ["mergekit", "deltatune"]
            for tool in order:
                cmd, out = runs[tool]
                shutil.rmtree(out, ignore_errors=True)
                seconds, peak = run(cmd, work / f"{tool}-{method}.log")
                raw[method][tool].append({"round": r, "seconds": seconds, "peak_rss": peak})
                print(f"round {r} {method:16s} {tool:9s} {seconds:7.1f} s {peak / 2**20:7.0f} MiB")
            if r == 0 and method in EXACT:
                agreement[method] = compare(method, runs["deltatune"][1], runs["mergekit"][1], folders)
                print(f"  {agreement_text(agreement[method])}", flush=True)
            for _, out in runs.values():
                shutil.rmtree(out, ignore_errors=True)
    return {"raw": raw, "agreement": agreement, "commands": cmdlines}


def summarise(raw: dict) -> dict:
    summary = {}
    for method, tools in raw.items():
        ours, theirs = tools["deltatune"], tools["mergekit"]
        summary[method] = {
            **{f"{tool}_{key}": statistics.median(x[k] for x in runs) for tool, runs in tools.items()
               for key, k in (("seconds", "seconds"), ("peak_mib", "peak_rss"))},
            "time_ratio": statistics.median(a["seconds"] / b["seconds"] for a, b in zip(ours, theirs)),
            "memory_ratio": statistics.median(a["peak_rss"] / b["peak_rss"] for a, b in zip(ours, theirs)),
        }
        for tool in tools:
            summary[method][f"{tool}_peak_mib"] /= 2**20
    return summary


def agreement_text(a: dict) -> str:
    text = (f"max abs diff {a['max_abs_diff']:.2g} "
            f"(max abs change from base {a['max_abs_change_from_base']:.2g})")
    if a["entries_differing"]:
        text += (f"; {a['entries_differing']:,} of {a['entries']:,} entries differ by > {TOLERANCE}, "
                 + ("all at top-k magnitude ties" if not a["differing_not_at_magnitude_ties"]
                    else f"{a['differing_not_at_magnitude_ties']:,} of them not at magnitude ties"))
    return ("yes: " if a["agree"] else "NO: ") + text


def to_markdown(result: dict) -> str:
    env, summary, agreement = result["env"], result["summary"], result["agreement"]
    lines = [
        f"# Checkpoint merging: deltatune vs mergekit ({env['model']}, fp32, {env['device']})", "",
        f"deltatune {env['deltatune']} vs mergekit {env['mergekit']}; torch {env['torch']}, "
        f"{env['threads']} threads; {env['rounds']} interleaved rounds (medians). Inputs: base + "
        f"{env['variants']} variants (base + N(0, ({NOISE} x tensor std)^2) per tensor: this measures the "
        f"merge engine, not model quality), each {env['model_mib']:.0f} MiB in {env['input_shards']} shards "
        f"of <= {SHARD}; weights {list(WEIGHTS)}, density {DENSITY} where it applies; output fp32 in {SHARD} "
        f"shards. Load average {env['load_start']} at start, {env['load_end']} at end: the 2 cores are "
        "shared with other work, so times are noisy.", "",
        "| method | deltatune s | mergekit s | time ratio | deltatune peak MiB | mergekit peak MiB "
        "| memory ratio | outputs agree? |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method, s in summary.items():
        diff = agreement_text(agreement[method]) if method in agreement else "n/a: random masks differ"
        lines.append(f"| {method} | {s['deltatune_seconds']:.1f} | {s['mergekit_seconds']:.1f} "
                     f"| {s['time_ratio']:.2f} | {s['deltatune_peak_mib']:.0f} "
                     f"| {s['mergekit_peak_mib']:.0f} | {s['memory_ratio']:.2f} | {diff} |")
    floor = result["startup_peak_mib"]
    lines += [
        "", "Ratios are deltatune / mergekit, medians of per-round ratios. Peak memory is each merge "
        "subprocess's peak RSS, start-up included; `--help` alone peaks at "
        f"{floor['deltatune']:.0f} MiB (deltatune) and {floor['mergekit']:.0f} MiB (mergekit). "
        f"Outputs agree when both write the same tensors and every entry is within {TOLERANCE}. TIES keeps "
        "int(density x numel) entries per tensor and breaks ties at the top-k cut with the same torch sort as "
        "mergekit, so on the same torch build its output is identical.", "",
        "Command lines (round 0):", "",
    ]
    for method, cmds in result["commands"].items():
        lines += [f"- {method}: `{cmds['deltatune']}`", f"  vs `{cmds['mergekit']}`"]
    lines += ["", "The configs are in the work folder's configs/ (deltatune and mergekit YAML side by side).", "",
              "Why the memory differs: deltatune reads each tensor through its own safetensors handle (an open "
              "handle keeps every page it touched resident), streams every tensor into shards laid out in "
              "advance (no output shard is assembled in memory), and merges entry-wise methods (linear, "
              "task_arithmetic) in 16 MiB row blocks, so not even the 113 MiB embedding exists whole. "
              "mergekit keeps one input shard open per model and builds each output shard in memory. "
              "TIES, DARE and DELLA need each tensor whole in both tools (top-k over the tensor, one random "
              "stream per tensor), so there the largest tensor's temporaries set the peak."]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up as they happen
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--work", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "deltatune-merge-bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "merge_vs_mergekit")
    args = parser.parse_args()
    if not MERGEKIT.is_file():
        sys.exit(f"{MERGEKIT} is missing: run `bash benchmarks/setup_mergekit.sh` first")
    import transformers

    import deltatune

    folders = make_inputs(args.work, args.variants)
    warm_page_cache(folders)
    version = "import importlib.metadata as m; print(m.version('mergekit'))"
    mk_version = subprocess.run([str(MERGEKIT.parent / "python"), "-c", version], capture_output=True,
                                text=True).stdout.strip()
    base = CheckpointReader(folders[0])
    env = {"model": "SmolLM2-135M-Instruct", "deltatune": deltatune.__version__, "mergekit": mk_version,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(),
           "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "rounds": args.rounds,
           "variants": args.variants, "model_mib": base.nbytes / 2**20,
           "input_shards": len(list(folders[0].glob("*.safetensors"))),
           "load_start": " / ".join(f"{x:.1f}" for x in os.getloadavg())}
    startup = startup_rss(args.work)
    result = measure(args.methods, args.rounds, args.work, folders)
    env["load_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    result = {"env": env, "startup_peak_mib": {k: v / 2**20 for k, v in startup.items()},
              "summary": summarise(result["raw"]), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    bad = [m for m, a in result["agreement"].items() if not a["agree"]]
    if bad:
        sys.exit(f"outputs disagree for {bad}")


if __name__ == "__main__":
    main()
