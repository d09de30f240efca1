"""The `deltatune` command: train, eval, export, merge-adapter, info, methods, validate."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import deltatune as dt
from deltatune.cli import bench as bench_cli
from deltatune.cli import compress as compress_cli
from deltatune.cli import merge as merge_cli
from deltatune.training.distributed import RemoteError
from deltatune.training.loop import ADAPTER, RECIPE, Trainer, build_model, evaluate, load_data, make_task
from deltatune.training.recipe import (
    DEFAULT_RECIPE,
    Recipe,
    apply_override,
    builtin_recipe,
    load_recipe,
    validate,
)
from deltatune.training.tasks import BUILTIN_MODELS, TASKS, Task, resolve_model_path

console = Console(soft_wrap=True, markup=False)  # long paths stay on one line; brackets in paths stay text
RECIPE_HELP = "an optional recipe .yaml, then section.key=value overrides"


def _recipe_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Split positional items into (recipe file or None, key=value overrides)."""
    files = [item for item in items if "=" not in item]
    for item in files:  # a key without "=" would otherwise be looked for as a file
        if not item.endswith((".yaml", ".yml")) and not Path(item).is_file():
            raise ValueError(f"{item!r} is neither a recipe .yaml file nor a key=value override "
                             f"(e.g. {item}=VALUE)")
    if len(files) > 1:
        raise ValueError(f"expected one recipe file and key=value overrides, got several files: {files}")
    return (files[0] if files else None), [item for item in items if "=" in item]


def _adapter_dir(path: str) -> Path:
    """The adapter folder that `deltatune train` wrote: given itself, or the run folder holding it."""
    for candidate in (Path(path) / ADAPTER, Path(path)):
        if (candidate / RECIPE).is_file():
            return candidate
    raise FileNotFoundError(f"no trained adapter in {path!r}: expected {RECIPE} beside it, as `deltatune train` saves")


# what can change how a trained adapter is evaluated; the method, head and training keys are fixed by training
EVAL_KEYS = ("data", "eval", "train.max_length", "model.path")


def _applies(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in EVAL_KEYS)


def _adapter_recipe(adapter: Path, items: list[str]) -> Recipe:
    """The adapter's stored recipe, with the evaluation keys (EVAL_KEYS) of another recipe or of overrides."""
    path, overrides = _recipe_args(items)
    if ignored := [item.partition("=")[0] for item in overrides if not _applies(item.partition("=")[0])]:
        raise ValueError(f"cannot apply {', '.join(ignored)} to a trained adapter (fixed when it was trained); "
                         f"eval applies: {', '.join(k if '.' in k else k + '.*' for k in EVAL_KEYS)}")
    data = load_recipe(adapter / RECIPE).model_dump(mode="json")
    if path is not None:
        other = load_recipe(path).model_dump(mode="json")
        for key in EVAL_KEYS:  # a section, or one key of a section
            section, _, leaf = key.partition(".")
            if leaf:
                data[section][leaf] = other[section][leaf]
            else:
                data[section] = other[section]
    for item in overrides:
        apply_override(data, item)
    return validate(data)


def _load_adapter(adapter: Path, recipe: Recipe) -> tuple[Task, dt.DeltaModel]:
    """(task, model with the saved adapter) rebuilt from the stored recipe, without reading data."""
    task = make_task(recipe, recipe.model.labels)
    return task, build_model(recipe, task, adapter)


def _metrics(label: str, metrics: dict[str, float]) -> None:
    console.print(f"{label:<7} " + "   ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _trainable(dm: dt.DeltaModel) -> str:
    t, n = dm.trainable_parameters(), dm.total_parameters()
    return f"{t:,} of {n:,} ({100 * t / n:.2f}%)"


# --- commands ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune as a recipe says (default: the embedded MiniLM / Rotten Tomatoes recipe)."""
    path, overrides = _recipe_args(args.items)
    recipe = load_recipe(path, overrides)
    trainer = Trainer(recipe, resume=args.resume, overwrite=args.overwrite)
    if not trainer.group.main:  # under torchrun, rank 0 alone reports (and writes)
        logging.getLogger("deltatune").setLevel(logging.ERROR)
        trainer.setup()
        trainer.train()
        return 0
    trainer.setup()
    r, g = trainer.recipe, trainer.group
    console.print(f"{r.name}: {r.method.name} on {r.model.path} ({r.model.task}), data {r.data.source}")
    console.print(f"trainable parameters: {_trainable(trainer.model)}")
    on = f"{g.world} processes ({g.mode}), {trainer.device}" if g.parallel else str(trainer.device)
    console.print(f"examples: {len(trainer.train_set):,} train, {len(trainer.eval_set):,} eval; "
                  f"{trainer.total_steps} steps on {on}")
    result = trainer.train()
    _metrics("before", result.before)
    _metrics("after", result.after)
    console.print(f"wall time {result.seconds:.1f} s for {result.steps} steps")
    console.print(f"adapter saved to {result.adapter_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained adapter on the held-out split of its recipe's data."""
    adapter = _adapter_dir(args.adapter)
    recipe = _adapter_recipe(adapter, args.items)
    splits = load_data(recipe)
    task = make_task(recipe, splits.label_names)
    model = build_model(recipe, task, adapter)
    metrics = evaluate(model, task, task.encode(splits.eval), recipe.eval.batch_size)
    _metrics(f"eval on {len(splits.eval):,} held-out examples:", metrics)
    return 0


def _check_export_out(out: Path, overwrite: bool) -> None:
    """Refuse to write PEFT files among a user's files: --out must be new, empty or a previous export."""
    from deltatune.engine import peft_format

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the PEFT adapter")
    own = (peft_format.CONFIG_NAME, peft_format.WEIGHTS_NAME)

    def exported(name: str) -> bool:  # an export's files, or the temp files an interrupted one left
        return name in own or (name.endswith(".tmp") and name.startswith(tuple(f".{n}." for n in own)))

    others = sorted(p.name for p in out.iterdir() if not exported(p.name)) if out.is_dir() else []
    if others and not overwrite:
        raise ValueError(f"--out {out} holds files that are not a PEFT export ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder, or pass --overwrite "
                         "to write the PEFT files beside them")


def cmd_export(args: argparse.Namespace) -> int:
    """Write a trained adapter in another library's format."""
    adapter = _adapter_dir(args.adapter)
    _check_export_out(Path(args.out), args.overwrite)  # before the model loads: a refusal costs nothing
    _, model = _load_adapter(adapter, _adapter_recipe(adapter, []))
    model.export_peft(args.out)  # atomic files; a killed export never pairs an old config with new weights
    console.print(f"PEFT adapter written to {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold the adapter into its base model and save a standalone Hugging Face model."""
    from deltatune.merging.checkpoint import parse_size
    from deltatune.merging.stream_merge import has_checkpoint, merge_adapter_streaming

    shard = parse_size(args.max_shard_size)  # a bad size fails before the model loads
    adapter = _adapter_dir(args.adapter)
    recipe = _adapter_recipe(adapter, [])
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new folder or remove it first")
    base = resolve_model_path(recipe.model.path)
    quantized = recipe.model.quantize != "none"
    if quantized and args.stream:
        raise ValueError(f"--stream merges into the base's float checkpoint, but this adapter was trained on its "
                         f"{recipe.model.quantize} quantization: leave --stream out to merge into the dequantised "
                         "base it was trained on (written in model.dtype)")
    if args.stream if args.stream is not None else has_checkpoint(base) and not quantized:
        # layer by layer from the base's safetensors: never the whole model in memory
        task = make_task(recipe, recipe.model.labels)
        merge_adapter_streaming(base, adapter, out, shard, model_class=task.auto_class,
                                model_kwargs=task.model_kwargs())
        console.print(f"merged model written to {args.out}, layer by layer (loads with transformers alone)")
        return 0
    task, model = _load_adapter(adapter, recipe)
    # a quantized base is dequantised layer by layer into plain Linears of model.dtype, then merged unrounded
    merged = model.merge_and_unload(dtype=getattr(torch, recipe.model.dtype) if quantized else None)
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a killed run leaves no half model
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, max_shard_size=shard)
    task.tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    console.print(f"merged model written to {args.out} (loads with transformers alone)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter table of a trained adapter, or of the adapter a recipe would train."""
    if Path(args.target).is_dir():
        adapter = _adapter_dir(args.target)
        _, model = _load_adapter(adapter, _adapter_recipe(adapter, []))
    else:
        recipe = load_recipe(args.target)
        labels = recipe.model.labels
        if labels is None and "label" in TASKS[recipe.model.task].fields:  # the head's size comes from the data
            labels = load_data(recipe).label_names
        model = build_model(recipe, make_task(recipe, labels))
    model.print_parameters()
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Table of the registered methods."""
    table = Table(title="deltatune methods")
    specs = dt.list_methods()
    # names must stay copyable whole: never cut to "…"
    table.add_column("name", no_wrap=True, min_width=max(len(s.name) for s in specs))
    for column in ("family", "trainable parameters per layer", "paper"):
        table.add_column(column, no_wrap=column == "paper")
    for spec in specs:
        table.add_row(spec.name, spec.family, spec.formula, spec.paper)
    console.print(table)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a recipe, its model and its data columns without training."""
    path, overrides = _recipe_args(args.items)
    recipe = load_recipe(path, overrides)
    if recipe.model.path not in BUILTIN_MODELS:  # a built-in may need building first; its name is enough
        resolve_model_path(recipe.model.path)
    splits = load_data(recipe)
    console.print(f"recipe {recipe.name!r} is valid: {len(splits.train):,} train / {len(splits.eval):,} eval "
                  f"examples, output to {recipe.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per command."""
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning with deltas.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help=cmd_train.__doc__,
                       description=f"{cmd_train.__doc__} Embedded recipe: {builtin_recipe(DEFAULT_RECIPE)}")
    p.add_argument("items", nargs="*", metavar="RECIPE|key=value", help=RECIPE_HELP)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output dir that holds an earlier run (replaces only deltatune's files)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="a run folder or its adapter/ folder")
    p.add_argument("items", nargs="*", metavar="RECIPE|key=value", help="another recipe, or overrides of the stored one")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--format", choices=["peft"], default="peft", help="peft: adapter_config.json + safetensors")
    p.add_argument("--out", required=True, help="output folder: new, empty, or a previous export (replaced)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files too")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("merge-adapter", help=cmd_merge.__doc__)
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--out", required=True, help="output folder for the merged model and its tokenizer")
    p.add_argument("--max-shard-size", default="50GB",
                   help="split the weights into safetensors shards of at most this size, with an index "
                        "(model.safetensors.index.json), e.g. 2GB or 500MiB")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="merge layer by layer from the base's safetensors, never holding the whole model (default "
                        "when the base has them); --no-stream loads base + adapter in memory and merges there")
    p.set_defaults(handler=cmd_merge)

    merge_cli.add_parser(sub)

    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.add_argument("target", metavar="ADAPTER_DIR|RECIPE")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("methods", help=cmd_methods.__doc__)
    p.set_defaults(handler=cmd_methods)

    p = sub.add_parser("validate", help=cmd_validate.__doc__)
    p.add_argument("items", nargs="+", metavar="RECIPE|key=value", help=RECIPE_HELP)
    p.set_defaults(handler=cmd_validate)
    compress_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """Show deltatune's warnings plainly; silence Hugging Face's per-load reports and progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    log = logging.getLogger("deltatune")
    if not log.handlers:
        log.addHandler(RichHandler(console=Console(stderr=True), show_time=False, show_path=False))
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints one line and returns 2."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse stops filling `items` at an option (`train --resume a=1`), so the rest arrive here
        if extra and (not hasattr(args, "items") or any(item.startswith("-") for item in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)
    if extra:
        args.items += extra
    _quiet_libraries()
    try:
        return args.handler(args)
    except RemoteError:  # rank 0 of a distributed run has printed it
        return 2
    except (ValueError, OSError) as e:
        print(f"deltatune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
