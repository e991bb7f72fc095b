"""Command line: ``regkern <command>`` or ``python -m regkern <command>``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regkern", description="Fused attention kernels for register ViTs.")
    parser.add_argument("--version", action="version", version=f"regkern {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .demo import add_demo_arguments

    demo = commands.add_parser(
        "demo", help="patch a timm ViT with registers, compare with timm, print residual-norm table"
    )
    add_demo_arguments(demo)
    from .bench import add_bench_arguments

    bench = commands.add_parser(
        "bench", help="run the benchmark suite, print speedups and targets, write JSON, markdown and a PNG plot"
    )
    add_bench_arguments(bench)
    from .inspect_cli import add_inspect_arguments

    inspect = commands.add_parser(
        "inspect", help="run a patched, monitored ViT over images; write norm tables, histograms, norm and attention maps"
    )
    add_inspect_arguments(inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args)
        elif args.command == "bench":
            from .bench import run_bench

            run_bench(args)
        elif args.command == "inspect":
            from .inspect_cli import run_inspect

            run_inspect(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"regkern {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
