"""Merging evidence: full MiniLM fine-tunes on two real tasks, merged by every method, scored per task.

Each task (Rotten Tomatoes sentiment, Reuters "grain" topic) gets a full fine-tune of all-MiniLM-L6-v2 with a
fresh classification head. The fine-tuned encoders (every key under `bert.`) are merged with the pretrained
encoder as base by each preset in deltatune.merging.MERGE_METHODS, by uniform soup and by greedy soup; each task
then runs its own head on the merged encoder. lambda is picked per method on validation rows carved out of the
training data, never on the test rows. "Cross" rows put one task's fine-tuned encoder under the other's head.

    python benchmarks/merge_tasks.py                      # trains once (cached), then merges and scores
    python benchmarks/merge_tasks.py --retrain            # train the fine-tunes again
    python benchmarks/merge_tasks.py --lambdas 0.5 1 1.5  # another lambda grid

Writes benchmarks/results/merge_tasks.{json,md}; fine-tunes are cached under $DELTATUNE_CACHE/merge_tasks.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from deltatune import assets, merging
from deltatune.engine.atomic import atomic_path, atomic_write_text
from deltatune.training.data import split
from deltatune.training.loop import epoch_order, warmup_cosine
from deltatune.training.tasks import ClassificationTask

RESULTS = Path(__file__).parent / "results"
ENCODER = "bert."  # BertForSequenceClassification: encoder (with pooler) under bert., the head is `classifier`
CHECKED = "bert.encoder.layer.0."  # merged directly at the chosen lambda, to check the rescaled grid merge
VAL_SEED = 1  # the validation rows are split off the training rows with their own seed
StateDict = dict[str, Tensor]


# --- tasks -----------------------------------------------------------------------------------------
def rotten_tomatoes_splits(val_size: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Train / val / test; test is the 1,000 snippets the default recipe holds out (eval_size 1000, seed 0)."""
    pool, test = split(assets.rotten_tomatoes(), 1000, seed=0)
    train, val = split(pool, val_size, seed=VAL_SEED)
    return train, val, test


def reuters_splits(val_size: int, topic: str = "grain") -> tuple[list[dict], list[dict], list[dict]]:
    """Train / val from Reuters' train split; test is its official test split."""
    data = assets.reuters(topic)
    train, val = split(data["train"], val_size, seed=VAL_SEED)
    return train, val, data["test"]


@dataclass(frozen=True)
class TaskSpec:
    """One classification task and how its fine-tune is trained."""

    name: str
    load: Callable[[int], tuple[list[dict], list[dict], list[dict]]] = field(repr=False)
    label_names: tuple[str, ...]
    steps: int  # optimizer steps of batch_size examples
    batch_size: int = 32
    lr: float = 5e-5  # peak; 10% warmup, cosine decay to 0
    max_length: int = 64  # tokens; nearly every snippet fits, a news story is cut after its lead

    def training_config(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "load"}


TASKS = {
    "rotten_tomatoes": TaskSpec("rotten_tomatoes", rotten_tomatoes_splits, ("rotten", "fresh"), steps=150),
    "reuters_grain": TaskSpec("reuters_grain", reuters_splits, ("other", "grain"), steps=80),
}


@dataclass
class Prepared:
    """A task with its tokenizer, encoded splits (val/test sorted by length: less padding) and a scoring model."""

    spec: TaskSpec
    task: ClassificationTask
    train: list[dict]
    val: list[dict]
    test: list[dict]
    model: nn.Module  # re-weighted for every evaluation


def prepare(spec: TaskSpec, val_size: int) -> Prepared:
    train, val, test = spec.load(val_size)
    task = ClassificationTask(assets.minilm_path(), spec.max_length, list(spec.label_names))
    by_length = functools.partial(sorted, key=lambda e: len(e["input_ids"]))
    model = task.build_model().eval()
    return Prepared(spec, task, task.encode(train), by_length(task.encode(val)), by_length(task.encode(test)), model)


# --- fine-tuning -----------------------------------------------------------------------------------
def fine_tune(p: Prepared, seed: int) -> StateDict:
    """Full fine-tune (encoder and new head) with AdamW, 10% warmup + cosine decay, gradient clipping; seeded."""
    torch.manual_seed(seed)  # the new head's init and dropout
    model = p.task.build_model().train()
    # no weight decay: it would move every entry (unused embedding rows too), blurring what the task changed
    optimizer = AdamW(model.parameters(), lr=p.spec.lr, weight_decay=0.0)
    factor = functools.partial(warmup_cosine, total=p.spec.steps, warmup=p.spec.steps // 10, min_ratio=0.0)
    scheduler = LambdaLR(optimizer, factor)
    bs, per_epoch = p.spec.batch_size, len(p.train) // p.spec.batch_size  # drop the ragged last batch
    for step in range(p.spec.steps):
        epoch, i = divmod(step, per_epoch)
        idx = epoch_order(seed, epoch, len(p.train))[i * bs : (i + 1) * bs]
        loss = model(**p.task.collate([p.train[j] for j in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == p.spec.steps - 1:
            print(f"  {p.spec.name} step {step + 1}/{p.spec.steps} loss {loss.item():.4f}", flush=True)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def cache_file(cache: Path, spec: TaskSpec, seed: int) -> Path:
    """One file per training setup: a changed setup trains anew instead of reusing a stale fine-tune."""
    setup = json.dumps({**spec.training_config(), "seed": seed, "val_seed": VAL_SEED, "v": 1}, sort_keys=True)
    return cache / f"{spec.name}-{hashlib.sha256(setup.encode()).hexdigest()[:12]}.safetensors"


def load_or_train(p: Prepared, cache: Path, seed: int, retrain: bool) -> tuple[StateDict, dict]:
    """The task's fine-tuned state dict, from the cache unless `retrain`; with how long training took."""
    path = cache_file(cache, p.spec, seed)
    if path.is_file() and not retrain:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, {**json.loads(f.metadata()["info"]), "cached": True}
    start = time.perf_counter()
    state = fine_tune(p, seed)
    info = {"train_seconds": round(time.perf_counter() - start, 1), "config": p.spec.training_config(), "seed": seed}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"info": json.dumps(info)})
    return state, {**info, "cached": False}


def encoder(state: StateDict) -> StateDict:
    return {k: v for k, v in state.items() if k.startswith(ENCODER)}


def head(state: StateDict) -> StateDict:
    return {k: v for k, v in state.items() if not k.startswith(ENCODER)}


# --- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def score(p: Prepared, enc: StateDict, own_head: StateDict, examples: list[dict], batch_size: int = 64) -> dict:
    """Accuracy and macro-F1 of the task's head on top of encoder `enc`."""
    p.model.load_state_dict({**enc, **own_head}, strict=True)  # strict: every encoder and head key replaced
    preds = torch.cat([
        p.model(**{k: v for k, v in p.task.collate(examples[i : i + batch_size]).items() if k != "labels"})
        .logits.argmax(-1)
        for i in range(0, len(examples), batch_size)
    ])
    gold = torch.tensor([e["label"] for e in examples])
    f1 = []
    for c in range(len(p.spec.label_names)):
        tp, fp, fn = [int(((preds == c) & (gold == c)).sum()), int(((preds == c) & (gold != c)).sum()),
                      int(((preds != c) & (gold == c)).sum())]
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return {"accuracy": float((preds == gold).float().mean()), "macro_f1": sum(f1) / len(f1)}


def majority_accuracy(examples: list[dict]) -> float:
    labels = [e["label"] for e in examples]
    return max(labels.count(y) for y in set(labels)) / len(labels)


# --- merge methods ---------------------------------------------------------------------------------
@dataclass
class Context:
    """What a merge entry may use: base and fine-tuned encoders, and (lazily) Fishers and a val score."""

    base: StateDict
    encoders: list[StateDict]
    seed: int
    val_score: Callable[[StateDict], float]  # mean validation accuracy over the tasks, own heads
    fishers: Callable[[], list[StateDict]]
    notes: dict = field(default_factory=dict)  # what a method wants reported (greedy soup: its choice)


@dataclass(frozen=True)
class Preset:
    """A MERGE_METHODS preset at a given lambda, every model weighted 1."""

    name: str
    fisher: bool = False  # pass each fine-tune's diagonal Fisher as importance

    def __call__(self, c: Context, lam: float) -> StateDict:
        method = merging.get_merge_method(self.name, lambda_=lam)
        importance = c.fishers() if self.fisher else None
        return method.merge_state_dicts(c.base, c.encoders, [1.0] * len(c.encoders), c.seed, importance=importance)


def greedy(c: Context, lam: float) -> StateDict:
    from deltatune.merging.soup import greedy_soup

    result = greedy_soup(c.encoders, c.val_score)
    c.notes["greedy_soup"] = {"chosen_indices": result.chosen_indices, "val_scores": result.scores}
    return result.state_dict


@dataclass(frozen=True)
class Method:
    name: str
    merge: Callable[[Context, float], StateDict]
    searched: bool = True  # lambda from the grid on validation; soups have none
    needs: str = "deltatune.merging.task_arithmetic"  # module that must exist for the entry to run

    def available(self) -> bool:
        preset_missing = isinstance(self.merge, Preset) and self.merge.name not in merging.MERGE_METHODS
        return importlib.util.find_spec(self.needs) is not None and not preset_missing


METHODS = [
    Method("uniform_soup", lambda c, lam: merging.linear(c.encoders), searched=False),
    Method("greedy_soup", greedy, searched=False, needs="deltatune.merging.soup"),
    Method("task_arithmetic", Preset("task_arithmetic")),
    Method("ties", Preset("ties")),
    Method("dare_linear", Preset("dare_linear")),
    Method("dare_ties", Preset("dare_ties")),
    Method("breadcrumbs", Preset("breadcrumbs")),
    Method("breadcrumbs_ties", Preset("breadcrumbs_ties")),
    Method("della", Preset("della")),
    Method("della_linear", Preset("della_linear")),
    Method("fisher", Preset("fisher", fisher=True), needs="deltatune.merging.fisher"),
    Method("pcb", Preset("pcb"), needs="deltatune.merging.pcb"),
]


def rescaled(base: StateDict, at_one: StateDict, lam: float) -> StateDict:
    """theta_0 + lam * (merge at lambda 1 - theta_0): lambda is the pipeline's last stage, so this is the merge
    at `lam` without re-running the sparsifiers (checked against a real merge at the chosen lambda)."""
    return {k: b + lam * (at_one[k] - b) if b.is_floating_point() else b for k, b in base.items()}


def restricted(c: Context, prefix: str) -> Context:
    """The same merge inputs for the keys under `prefix` only (random drops are seeded per key, so they agree)."""

    def keep(sd: StateDict) -> StateDict:
        return {k: v for k, v in sd.items() if k.startswith(prefix)}

    return Context(keep(c.base), [keep(e) for e in c.encoders], c.seed, c.val_score,
                   lambda: [keep(f) for f in c.fishers()], c.notes)


def max_abs_diff(a: StateDict, b: StateDict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- report ----------------------------------------------------------------------------------------
def summarise(row: dict[str, dict], individual: dict[str, float]) -> dict:
    """Average accuracy and accuracy normalised by each task's own fine-tune."""
    norm = {t: row[t]["accuracy"] / individual[t] for t in individual}
    return {"average_accuracy": sum(r["accuracy"] for r in row.values()) / len(row),
            "normalized": norm, "normalized_average": sum(norm.values()) / len(norm)}


def checks(results: dict, tasks: Sequence[str]) -> list[dict]:
    """The relations the literature leads one to expect, each marked held or not."""
    merges, ft = results["merges"], results["fine_tunes"]
    out = []
    ta = merges.get("task_arithmetic")
    for name in ("ties", "dare_linear", "dare_ties"):
        if ta and name in merges:
            a, b = merges[name]["average_accuracy"], ta["average_accuracy"]
            out.append({"claim": f"{name} >= task_arithmetic on average test accuracy", "held": a >= b,
                        "detail": f"{a:.4f} vs {b:.4f}"})
    cross = {t: max(ft[s]["test"][t]["accuracy"] for s in ft if s != t) for t in tasks}
    beaten = {m: all(r["test"][t]["accuracy"] > cross[t] for t in tasks) for m, r in merges.items()}
    out.append({"claim": "every merge beats the cross fine-tune on every task (the other task's encoder "
                "under this task's head)", "held": all(beaten.values()),
                "detail": f"{sum(beaten.values())}/{len(beaten)} merges; failing: "
                          f"{[m for m, ok in beaten.items() if not ok] or 'none'}"})
    below = {m: r["normalized_average"] for m, r in merges.items()}
    best = max(below, key=below.get)
    out.append({"claim": "no merge reaches the individual fine-tunes (normalised average < 1)",
                "held": all(v < 1 for v in below.values()), "detail": f"best: {best} {below[best]:.4f}"})
    return out


def to_markdown(r: dict) -> str:
    tasks = list(r["tasks"])
    short = {t: t.replace("_", " ") for t in tasks}
    head_cells = [f"{short[t]} acc" for t in tasks] + ["avg acc"] + [f"{short[t]} norm" for t in tasks] + \
        ["avg norm"] + [f"{short[t]} macro-F1" for t in tasks]
    lines = [
        "# Merging two real MiniLM fine-tunes: per-task test accuracy", "",
        f"Command: `{r['command']}`  ",
        f"Base: all-MiniLM-L6-v2 (pretrained encoder = theta_0). Seeds: training {r['config']['seed']}, "
        f"merge {r['config']['merge_seed']}, validation split {VAL_SEED}. lambda grid {r['config']['lambdas']} "
        f"chosen per method by mean validation accuracy. Fisher: {r['config']['fisher_samples']} training "
        "examples per task, sampled labels (true Fisher).  ",
        f"Machine: {r['env']['machine']}; torch {r['env']['torch']}, transformers {r['env']['transformers']}; "
        f"load average {r['env']['load_start']} at start, {r['env']['load_end']} at end (other jobs shared the "
        f"cores). Total {r['seconds']['total']:.0f} s (training {r['seconds']['training']:.0f} s, merging and "
        f"scoring {r['seconds']['merging']:.0f} s).", "",
        "| task | train / val / test rows | fine-tune steps x batch, max_length, lr | train s | majority-class test acc |",
        "|---|---|---|---|---|",
    ]
    for t, info in r["tasks"].items():
        c = info["config"]
        trained = "cached" if info["cached"] else f"{info['train_seconds']:.0f}"
        lines.append(f"| {t} | {info['rows']['train']} / {info['rows']['val']} / {info['rows']['test']} | "
                     f"{c['steps']} x {c['batch_size']}, {c['max_length']}, {c['lr']:g} | {trained} | "
                     f"{info['majority_test_accuracy']:.4f} |")
    lines += ["", "Each row is an encoder; each task column uses that task's own fine-tuned head. \"norm\" = "
              "accuracy / the task's own fine-tune accuracy.", "",
              "| encoder | lambda | " + " | ".join(head_cells) + " |", "|---|---|" + "---|" * len(head_cells)]

    def cells(row: dict) -> str:
        vals = [row["test"][t]["accuracy"] for t in tasks] + [row["average_accuracy"]] + \
            [row["normalized"][t] for t in tasks] + [row["normalized_average"]] + \
            [row["test"][t]["macro_f1"] for t in tasks]
        return " | ".join(f"{v:.4f}" for v in vals)

    for name, row in r["fine_tunes"].items():
        lines.append(f"| fine-tune {name} | - | {cells(row)} |")
    for name, row in r["merges"].items():
        lam = "-" if row["lambda"] is None else f"{row['lambda']:g}"
        lines.append(f"| {name} | {lam} | {cells(row)} |")
    lines += ["", "## Expected relations", ""]
    lines += [f"- {'held' if c['held'] else 'did NOT hold'}: {c['claim']} ({c['detail']})" for c in r["checks"]]
    if r["skipped"]:
        lines += ["", f"Skipped (module or preset missing when this ran): {', '.join(r['skipped'])}"]
    if "greedy_soup" in r["notes"]:
        g = r["notes"]["greedy_soup"]
        lines += ["", f"Greedy soup kept fine-tunes {[tasks[i] for i in g['chosen_indices']]} "
                  f"(individual mean val accuracies {[round(s, 4) for s in g['val_scores']]})."]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.5, 0.75, 1.0, 1.25, 1.5])
    parser.add_argument("--val-size", type=int, default=200, help="validation rows per task, taken from train")
    parser.add_argument("--fisher-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--merge-seed", type=int, default=0, help="seed of DARE/DELLA's random drops")
    parser.add_argument("--retrain", action="store_true", help="train the fine-tunes even when cached")
    parser.add_argument("--cache", type=Path, default=None, help="default: $DELTATUNE_CACHE/merge_tasks")
    parser.add_argument("--out", type=Path, default=RESULTS / "merge_tasks")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # "classifier newly initialised" is the point here
    transformers.logging.disable_progress_bar()
    cache = args.cache or assets.cache_root() / "merge_tasks"
    env = {"machine": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "load_start": [round(x, 2) for x in os.getloadavg()]}
    start = time.perf_counter()

    prepared = {name: prepare(TASKS[name], args.val_size) for name in args.tasks}
    torch.manual_seed(args.seed)
    base = encoder(next(iter(prepared.values())).task.build_model().state_dict())  # pretrained: no random key
    states, infos = {}, {}
    for name, p in prepared.items():
        print(f"== fine-tune {name}", flush=True)
        states[name], infos[name] = load_or_train(p, cache, args.seed, args.retrain)
    trained = time.perf_counter()
    heads = {name: head(s) for name, s in states.items()}
    encoders = [encoder(states[name]) for name in prepared]

    def test_row(enc: StateDict) -> dict:
        return {t: score(p, enc, heads[t], p.test) for t, p in prepared.items()}

    def val_score(enc: StateDict) -> float:
        return sum(score(p, enc, heads[t], p.val)["accuracy"] for t, p in prepared.items()) / len(prepared)

    @functools.cache
    def fishers_cached() -> tuple[StateDict, ...]:
        from deltatune.merging.fisher import estimate_fisher

        out = []
        for name, p in prepared.items():
            print(f"  Fisher of {name} on {args.fisher_samples} training examples", flush=True)
            p.model.load_state_dict(states[name])
            fisher = estimate_fisher(p.model, [p.task.collate(p.train[: args.fisher_samples])], seed=args.seed)
            out.append(encoder(fisher))
        return tuple(out)

    results: dict = {"fine_tunes": {}, "merges": {}}
    for name, enc in zip(prepared, encoders):
        row = test_row(enc)
        results["fine_tunes"][name] = {"test": row}
    individual = {t: results["fine_tunes"][t]["test"][t]["accuracy"] for t in prepared}
    for row in results["fine_tunes"].values():
        row.update(summarise(row["test"], individual))

    context = Context(base, encoders, args.merge_seed, val_score, lambda: list(fishers_cached()))
    skipped = [m.name for m in METHODS if not m.available()]
    for m in (m for m in METHODS if m.available()):
        tick = time.perf_counter()
        entry: dict = {"lambda": None}
        if m.searched:
            at_one = m.merge(context, 1.0)
            entry["val"] = {lam: val_score(rescaled(base, at_one, lam)) for lam in args.lambdas}
            entry["lambda"] = max(args.lambdas, key=lambda lam: entry["val"][lam])  # first best on ties
            merged = rescaled(base, at_one, entry["lambda"])
            direct = m.merge(restricted(context, CHECKED), entry["lambda"])
            entry["rescaled_vs_direct_max_abs_diff"] = gap = max_abs_diff(direct, merged)
            assert gap < 1e-5, f"{m.name}: rescaled merge differs from a direct one by {gap}"
        else:
            merged = m.merge(context, 1.0)
        entry["test"] = test_row(merged)
        entry.update(summarise(entry["test"], individual))
        entry["seconds"] = round(time.perf_counter() - tick, 1)
        results["merges"][m.name] = entry
        accs = ", ".join(f"{t} {r['accuracy']:.4f}" for t, r in entry["test"].items())
        print(f"== {m.name}: lambda {entry['lambda']}, {accs} ({entry['seconds']} s)", flush=True)

    env["load_end"] = [round(x, 2) for x in os.getloadavg()]
    end = time.perf_counter()
    results.update({
        "command": shlex.join(["python", "benchmarks/merge_tasks.py", *sys.argv[1:]]),
        "env": env,
        "config": {"seed": args.seed, "merge_seed": args.merge_seed, "val_seed": VAL_SEED, "lambdas": args.lambdas,
                   "val_size": args.val_size, "fisher_samples": args.fisher_samples,
                   "merged_keys": f"every key under '{ENCODER}' ({len(base)} tensors)"},
        "tasks": {t: {"config": p.spec.training_config(), **infos[t],
                      "rows": {"train": len(p.train), "val": len(p.val), "test": len(p.test)},
                      "majority_test_accuracy": majority_accuracy(p.test)} for t, p in prepared.items()},
        "skipped": skipped,
        "notes": context.notes,
        "seconds": {"training": trained - start, "merging": end - trained, "total": end - start},
    })
    results["checks"] = checks(results, list(prepared))
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
