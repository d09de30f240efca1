"""`deltatune merge CONFIG.yaml [key=value ...]`: merge checkpoints or adapters as a merge config says."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(soft_wrap=True, markup=False)
MiB = 2**20


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge models or adapters tensor by tensor as a merge config says."""
    # imported here, so that other commands need not pay for them
    from deltatune.merging.config import load_merge_config
    from deltatune.merging.run import run_merge

    config = load_merge_config(args.config, args.items)
    r = run_merge(config, progress=not args.no_progress)
    if r.adapter_report is not None:
        console.print(r.adapter_report.to_markdown().splitlines()[0])
    else:
        console.print(f"{config.method}: merged {r.merged:,} tensors of {len(config.models)} models, "
                      f"copied {r.copied:,} non-float tensors from the base")
    console.print(f"wrote {r.tensors:,} tensors, {r.bytes_written / MiB:,.1f} MiB in {r.shards} shard(s) "
                  f"to {r.output} in {r.seconds:.1f} s (peak RSS {r.peak_rss / MiB:,.0f} MiB)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `merge` command; its help lists the methods from the registry, so it cannot drift."""
    from deltatune.merging.config import methods_help  # the registry itself (cheap: no merge runs)

    methods = "\n".join(["methods (the config's `method:`):", *(f"  {line}" for line in methods_help())])
    p = subparsers.add_parser("merge", help=cmd_merge.__doc__, description=cmd_merge.__doc__, epilog=methods,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog is a table
    p.add_argument("config", metavar="CONFIG.yaml", help="a merge config: method, base_model, models, output")
    p.add_argument("items", nargs="*", metavar="key=value", help="dotted overrides: parameters.density=0.3")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when not a TTY)")
    p.set_defaults(handler=cmd_merge)
