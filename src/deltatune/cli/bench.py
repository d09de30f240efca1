"""`deltatune bench`: methods x models, deltatune beside PEFT and the frozen floor (deltatune.bench)."""

from __future__ import annotations

import argparse
import shlex

import torch
from rich.console import Console

from ..bench import cases, quantized, suite
from ..bench.peers import peer

DTYPES = ("float32", "bfloat16", "float16")


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark train steps, memory, inference and quality against PEFT; write JSON, Markdown and plots."""
    overrides = {k: v for k, v in {"models": args.models, "methods": args.methods, "rounds": args.rounds,
                                   "device": args.device, "dtype": args.dtype, "out": args.out}.items()
                 if v is not None}
    if args.methods is not None:
        overrides["lm_methods"] = None  # the methods asked for, on every model
        for m in args.methods:
            if not (args.update and m in ("inference", "compile")):
                peer(m)  # unknown method: fails now, with the close names, not after an hour
    implied = {}  # settings that follow from the flags, not written back into the command line
    if args.bases:
        quantized.contenders(args.bases, torch.float32, False, [])  # an unknown base fails now, with the choices
        overrides["bases"] = args.bases
        for key in ("quantized_dtype", "resident_only"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        if args.methods is None:  # the quantized cells alone, on both LMs unless --models says otherwise
            implied = {"methods": [], "lm_methods": None, "inference": False, "models": ["smollm2", "qwen_coder"]}
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype '{args.dtype}'; choose from {list(DTYPES)}")
    if args.device is not None:
        if args.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"unknown --device '{args.device}'; use cpu or cuda (cuda:N)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} asked for, but torch sees no CUDA device; use --device cpu")
    for m in args.models or []:
        if m not in cases.CASES:
            raise ValueError(f"unknown benchmark model '{m}'; choose from {list(cases.CASES)}")
    settings = implied | overrides
    cfg = suite.quick_config(**settings) if args.quick else suite.BenchConfig(**settings)
    cfg.compile = args.compile if args.compile is not None else not args.quick
    cfg.peft = not args.no_peft
    cfg.checkpointing = args.checkpointing
    cfg.chunked_loss = args.chunked_loss
    if args.no_quality:
        cfg.quality_steps = {name: 0 for name in cases.CASES}
    cfg.update = args.update
    if args.update and args.methods is None:
        raise ValueError("--update reruns the cells of the methods you name: add --methods METHOD ...")
    if cfg.peft:
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise ValueError("the side-by-side needs PEFT: pip install 'deltatune[bench]', or pass --no-peft") from e
    console = Console(stderr=True)
    flags = [("--quick", args.quick), ("--no-peft", args.no_peft), ("--no-quality", args.no_quality),
             ("--update", args.update), ("--checkpointing", args.checkpointing),
             (f"--chunked-loss {args.chunked_loss}", bool(args.chunked_loss))]
    if args.compile is not None:
        flags.append(("--compile" if args.compile else "--no-compile", True))
    options = [f"--{k.replace('_', '-')} " + " ".join(shlex.quote(str(x)) for x in (v if isinstance(v, list) else [v]))
               for k, v in overrides.items() if k != "lm_methods"]
    command = " ".join(["deltatune bench"] + [f for f, on in flags if on] + options)
    suite.run(cfg, log=lambda line: console.print(line, highlight=False), command=command)
    console.print(f"results: {cfg.out}/bench.md, bench.json, bench_*.png")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__)
    p.add_argument("--quick", action="store_true", help="minutes on 2 CPU cores: MiniLM, LoRA / dropout / DoRA, few rounds")
    p.add_argument("--models", nargs="+", metavar="MODEL", help=f"from {list(cases.CASES)}")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="PEFT-paired: " + ", ".join(suite.DEFAULT_METHODS) + "; any other registered method runs "
                        "deltatune-only")
    p.add_argument("--rounds", type=int, help="timed rounds per cell (default 10, quick 4)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd LoRA steps (default: on, off with --quick)")
    p.add_argument("--no-peft", action="store_true", help="deltatune only (PEFT not installed)")
    p.add_argument("--no-quality", action="store_true", help="time and memory only: skip the short training runs")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--out", help="output folder (default bench_results)")
    p.add_argument("--bases", nargs="+", metavar="BASE",
                   help=f"LoRA r=16 on all linear layers of the LMs over these bases, from {list(quantized.BASES)}, "
                        "beside PEFT's QLoRA on int8/nf4 (alone unless --methods is given too)")
    p.add_argument("--quantized-dtype", choices=["float32", "bfloat16"],
                   help="int8/nf4 bases: compute dtype and dtype of the parts not quantized (default float32; "
                        "bfloat16 is QLoRA's recipe, fast only with native bf16)")
    p.add_argument("--resident-only", nargs="+", metavar="BASE",
                   help="bases built and weighed but not stepped (bf16 on a CPU without native bf16)")
    p.add_argument("--checkpointing", action="store_true",
                   help="quantized bases: gradient checkpointing on every contender (PEFT's too) but the plain fp32 "
                        "LoRA reference, plus an fp32 + checkpointing row")
    p.add_argument("--chunked-loss", type=int, metavar="TOKENS",
                   help="quantized bases: the same contenders' loss over chunks of TOKENS tokens (train.chunked_loss; "
                        "PEFT's model through the same function)")
    p.add_argument("--update", action="store_true",
                   help="rerun only the --methods cells into the results already in --out (after a fix), keep the rest; "
                        "'inference' and 'compile' name those cells")
    p.set_defaults(handler=cmd_bench)
